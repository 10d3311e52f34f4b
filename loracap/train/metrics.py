"""Caption metrics: BLEU-4, ROUGE-L and CIDEr (pycocoevalcap, the COCO caption evaluation code), plus
CLIPScore through `loracap.quality.clipscore`, and `loracap eval MODEL DATA` which puts them together.

pycocoevalcap's own tokenizer shells out to Java (Stanford PTB); captions are tokenized here instead the
way it does in effect for plain English: lower case, punctuation dropped, split on whitespace.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from loracap.backends import GenerationSettings, load_backend
from loracap.files import atomic_write_text
from loracap.inputs import DecodedBatch, ImageDecodeError, map_ahead
from loracap.quality.clipscore import clip_scores
from loracap.train.data import load_examples, read_split

__all__ = ["Generated", "caption_metrics", "evaluate_captioner", "evaluate_examples", "generate_for"]

_PUNCT = re.compile(r"[^\w\s]")


def _tokenize(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def caption_metrics(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]
) -> dict[str, float]:
    """Corpus BLEU-4, ROUGE-L and CIDEr (CIDEr-D as in the COCO evaluation) of `predictions` against
    `references` (several per key allowed). Keys missing a prediction count as empty captions."""
    # pycocoevalcap is the optional `train` extra: imported when scoring, not with this module.
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    keys = sorted(references)
    if not keys:
        raise ValueError("no references to score against")
    # An empty hypothesis breaks BLEU's and ROUGE's arithmetic; a lone placeholder scores as wrong.
    res = {k: [_tokenize(predictions.get(k, "")) or "<empty>"] for k in keys}
    gts = {k: [_tokenize(r) for r in references[k]] for k in keys}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": float(bleu[3]), "rouge_l": float(rouge), "cider": float(cider)}


@dataclass
class Generated:
    captions: dict[str, str]
    """{key: caption} for every example whose image decoded."""
    errors: dict[str, str]
    """{key: reason} for the images that could not be decoded; they are left out of the scores."""


def generate_for(
    backend: Any,
    examples: Sequence[Any],
    *,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    progress: bool = False,
    workers: int = 2,
) -> Generated:
    """Caption `examples` (loracap.train.data.Example) with a loaded backend. Images are decoded at the
    backend's input side as `loracap caption` decodes them, `workers` threads a few batches ahead of the
    model; one that cannot be decoded is reported in `errors` and the rest are captioned."""
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    side = getattr(backend, "image_side", 0) or None
    batches = [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]
    out = Generated({}, {})
    bar = tqdm(total=len(examples), unit="img", desc="captioning", disable=not progress, file=sys.stderr)
    try:
        for batch in map_ahead(lambda b: _decode(backend, b, side), batches, workers, name="loracap-eval"):
            out.errors.update((example.key, reason) for example, reason in batch.errors)
            if batch.items:
                captions = backend.generate(batch.inputs, settings)
                out.captions.update((e.key, c) for e, c in zip(batch.items, captions, strict=True))
            bar.update(len(batch.items) + len(batch.errors))
    finally:
        bar.close()
    return out


def _decode(backend: Any, examples: Sequence[Any], min_side: int | None) -> Any:
    """A batch's images decoded and prepared for `backend` (in a worker thread); the bad ones reported."""
    good, images, errors = [], [], []
    for example in examples:
        try:
            images.append(example.image(min_side=min_side))
            good.append(example)
        except ImageDecodeError as exc:
            errors.append((example, exc.reason))
    return DecodedBatch(good, backend.prepare(images, "caption") if images else None, errors)


def evaluate_captioner(
    model: str | Path,
    data: str | Path,
    *,
    split: str = "test",
    image_column: str = "image",
    caption_column: str = "text",
    clip_model: str | None = None,
    batch_size: int = 16,
    device: str | None = None,
    out_file: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Caption `split` of `data` with `model` and score the captions (see `evaluate_examples`).
    `split="all"` scores every example; a named split comes from MODEL/split.json, written when it was
    trained. `image_column` / `caption_column` name a Hugging Face dataset's columns."""
    examples = load_examples(data, image_column=image_column, caption_column=caption_column)
    if split != "all":
        saved = read_split(Path(model)) if Path(model).is_dir() else None
        if saved is None:
            raise ValueError(f"{model} has no split.json to take the {split!r} split from; use --split all")
        wanted = set(saved[split])
        examples = [e for e in examples if e.key in wanted]
    if not examples:
        raise ValueError(f"no captioned images of split {split!r} in {data}")
    return evaluate_examples(
        model,
        examples,
        data=str(data),
        split=split,
        clip_model=clip_model,
        batch_size=batch_size,
        device=device,
        out_file=out_file,
        progress=progress,
    )


def evaluate_examples(
    model: str | Path,
    examples: Sequence[Any],
    *,
    data: str,
    split: str,
    clip_model: str | None = None,
    batch_size: int = 16,
    device: str | None = None,
    out_file: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Caption `examples` (loracap.train.data.Example, already loaded) with `model`, loaded the way
    `loracap caption --model` loads it, and score the captions; written to `out_file` as JSON (default
    MODEL/eval-<split>.json when MODEL is a folder). `data` and `split` only label the result."""
    started = time.perf_counter()
    backend = load_backend(str(model), device=device)
    generated = generate_for(backend, examples, batch_size=batch_size, progress=progress)
    predictions = generated.captions
    examples = [e for e in examples if e.key in predictions]  # the undecodable ones are listed, not scored
    if not examples:
        raise ValueError(f"none of the {len(generated.errors)} images of split {split!r} could be decoded")
    result: dict[str, Any] = {
        "model": str(model),
        "data": data,
        "split": split,
        "images": len(examples),
        **caption_metrics(predictions, {e.key: e.references for e in examples}),
    }
    if clip_model:
        pairs = [(e.path, predictions[e.key]) for e in examples if e.path is not None]
        run = clip_scores(pairs, model=clip_model, device=device, progress=progress)
        scores = [p.score for p in run.pairs if p.score is not None]
        result["clip_score"] = sum(scores) / len(scores) if scores else None
        result["clip_model"] = clip_model
    result["seconds"] = round(time.perf_counter() - started, 2)
    result["captions"] = [
        {"key": e.key, "reference": e.caption, "prediction": predictions[e.key]} for e in examples
    ]
    result["errors"] = [{"key": key, "reason": reason} for key, reason in generated.errors.items()]
    target = (
        Path(out_file) if out_file else (Path(model) / f"eval-{split}.json" if Path(model).is_dir() else None)
    )
    if target is not None:
        atomic_write_text(target, json.dumps(result, indent=1, ensure_ascii=False) + "\n")
        result["written_to"] = str(target)
    return result
