"""Three ways to train a small captioner, same data, same CPU, same wall-clock budget each:

    (a) ours       loracap train: frozen vision tower -> MLP projector over the patch tokens -> LM + LoRA
    (b) ViT-GPT2   a VisionEncoderDecoderModel (vision tower + GPT-2 with cross-attention), all trained
    (c) ClipCap    frozen vision tower's pooled embedding -> MLP -> 10 prefix tokens -> frozen LM

scored by CIDEr and BLEU-4 on the synthetic test split, whose compositions (a shape in a reserved colour,
a texture on a reserved shape) never occur in training (see loracap.data.synthetic).

    python benchmarks/prefix_captioner.py                       # ~40 min on 2 CPU cores (3 seeds)
    python benchmarks/prefix_captioner.py --budget 30 --n 1500 --seeds 0   # a quick look
    python benchmarks/prefix_captioner.py --results benchmarks/RESULTS.md   # append the table there
    python benchmarks/prefix_captioner.py --methods ours,ours-unfrozen,vit-gpt2-frozen   # diagnostics

The diagnostics swap the one thing the two best designs differ in most, whether the vision tower trains:
ours with every SigLIP layer trained too, and ViT-GPT2 with SigLIP frozen.

As SigLIP and SmolLM2 are pre-trained before anyone captions with them, the towers are pre-trained here
first, once, and shared: a tiny SigLIP (sigmoid contrastive loss on the train split's image-caption pairs)
and two tiny LMs of the same width and depth, a SmolLM2-shaped Llama for (a) and (c) and a GPT-2 for (b)
(GPT-2 because VisionEncoderDecoderModel needs a decoder with cross-attention; Llama has none), each trained
on the train split's captions as plain text. Nothing of the test compositions is seen by any of them.

Each method then gets `--budget` seconds of training, measured in the training loop. The baselines'
learning rates follow a cosine of the time spent; ours runs `loracap train` as a user would, for a step
count set from the speed of two short timing runs, so its cosine schedule ends where the budget does.
Run it on an otherwise idle machine: the timing runs assume the speed holds. All three
read the images through loracap's own training data loader; (a) and (b) are scored through the folders
they save, loaded as `loracap caption --model` loads them; (c), not a loracap model, decodes greedily
with the LM's own `generate`. Random weights are seeded; numbers vary a little between machines.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loracap.data import synthetic
from loracap.train.batches import CaptionDataset, Collate, EpochSampler
from loracap.train.data import Example, load_examples
from loracap.train.loop import train
from loracap.train.metrics import caption_metrics, evaluate_examples
from loracap.train.settings import TrainSettings

IMAGE_SIZE, PATCH = 64, 8  # 64 patch tokens (16 after ours' 2x2 pixel shuffle)
WIDTH, LAYERS, HEADS = 128, 4, 4
CLIPCAP_PREFIX = 10  # ClipCap's prefix length for a frozen LM
BATCH = 32
WARMUP = 50  # steps
CALIBRATION = 100  # steps of ours' shorter timing run (the other runs three times as many)
MAX_TOKENS = 32
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # SmolLM2's first three: eos == bos == pad == 0


# --- data and pre-trained towers ---------------------------------------------------------------------------


def split_examples(data: Path) -> dict[str, list[Example]]:
    splits = json.loads((data / "splits.json").read_text())
    by_key = {e.key: e for e in load_examples(str(data))}
    return {name: [by_key[k] for k in keys] for name, keys in splits.items()}


def train_captions() -> list[str]:
    """Every caption of the train compositions: the LMs' text corpus (no test composition among them)."""
    return [synthetic.caption(s) for s in synthetic.all_scenes() if synthetic.split_of(s) == "train"]


def make_tokenizer(corpus: list[str], out: Path) -> Any:
    """A SmolLM2-style byte-level BPE learnt on the captions (each word ends up a token or two)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Tokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    eos = SPECIALS[0]
    tokenizer = GPT2Tokenizer(
        tokenizer_object=tok, unk_token=eos, bos_token=eos, eos_token=eos, pad_token=eos, model_max_length=256
    )
    tokenizer.save_pretrained(out)
    return tokenizer


def pretrain_vision(examples: list[Example], tokenizer: Any, seconds: float, out: Path) -> float:
    """A tiny SiglipModel trained with its sigmoid contrastive loss; returns the final loss."""
    from transformers import SiglipConfig, SiglipImageProcessorPil, SiglipModel

    processor = SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    tower = {"hidden_size": WIDTH, "num_attention_heads": HEADS, "intermediate_size": 4 * WIDTH}
    config = SiglipConfig(
        vision_config={**tower, "num_hidden_layers": LAYERS, "image_size": IMAGE_SIZE, "patch_size": PATCH},
        text_config={
            **tower,
            "num_hidden_layers": 2,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": MAX_TOKENS,
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.eos_token_id,
        },
    )
    torch.manual_seed(0)
    model = SiglipModel(config)
    pixels = processor(images=[e.image() for e in examples], return_tensors="pt")["pixel_values"]
    # SigLIP pools the text at its last position, so texts are padded to one fixed length, as it was trained.
    ids = tokenizer(
        [e.caption for e in examples], padding="max_length", max_length=MAX_TOKENS, return_tensors="pt"
    )["input_ids"]

    def step(rows: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids[rows], pixel_values=pixels[rows], return_loss=True).loss

    run = fit(model.parameters(), step, len(examples), seconds, lr=1e-3, batch=128, label="vision (SigLIP)")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return run["loss"]


def pretrain_lm(kind: str, tokenizer: Any, corpus: list[str], seconds: float, out: Path) -> float:
    """A tiny causal LM ("llama": SmolLM2-shaped; "gpt2") trained on the captions as text."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    ids = dict(bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    if kind == "llama":
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=WIDTH,
            intermediate_size=3 * WIDTH,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            num_key_value_heads=HEADS // 2,
            max_position_embeddings=256,
            tie_word_embeddings=True,
            **ids,
        )
        model = LlamaForCausalLM(config)
    else:
        config = GPT2Config(
            vocab_size=len(tokenizer), n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS, n_positions=256, **ids
        )
        model = GPT2LMHeadModel(config)
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    batch = tokenizer([c + tokenizer.eos_token for c in corpus], padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)

    def step(rows: torch.Tensor) -> torch.Tensor:
        mask = batch["attention_mask"][rows]
        return model(input_ids=batch["input_ids"][rows], attention_mask=mask, labels=labels[rows]).loss

    run = fit(model.parameters(), step, len(corpus), seconds, lr=2e-3, batch=64, label=f"LM ({kind})")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return run["loss"]


# --- a plain training loop for the pre-training and the two baselines --------------------------------------


def fit(
    params: Any,
    step: Callable[[Any], torch.Tensor],
    n: int,
    seconds: float,
    *,
    lr: float,
    batch: int,
    label: str,
    batches: Callable[[], Iterator[Any]] | None = None,
) -> dict[str, float]:
    """AdamW with clipped gradients for `seconds` of wall clock, the learning rate warmed up over the first
    WARMUP steps and then decayed on a cosine of the time spent, so it reaches zero when the budget ends
    whatever the speed. `step(batch)` returns the loss; batches are random rows of range(n) unless
    `batches` yields them."""
    params = [p for p in params if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    generator = torch.Generator().manual_seed(0)

    def rows() -> Iterator[Any]:
        while True:
            if batches is not None:
                yield from batches()
            else:
                order = torch.randperm(n, generator=generator)
                yield from (order[i : i + batch] for i in range(0, n - batch + 1, batch))

    source, done, loss = rows(), 0, float("nan")
    started = time.perf_counter()
    while (spent := time.perf_counter() - started) < seconds:
        scale = min(1.0, (done + 1) / WARMUP) * 0.5 * (1 + math.cos(math.pi * spent / seconds))
        for group in optimizer.param_groups:
            group["lr"] = lr * scale
        loss_t = step(next(source))
        loss_t.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        done += 1
        loss = loss_t.item()
    took = time.perf_counter() - started
    print(f"  {label}: {done} steps in {took:.0f} s, final loss {loss:.3f}", file=sys.stderr)
    return {"loss": loss, "steps": done, "seconds": took}


# --- (a) ours --------------------------------------------------------------------------------------------


def run_ours(
    data: Path, vision: Path, lm: Path, seconds: float, out: Path, *, seed: int, unfrozen: bool = False
) -> dict[str, Any]:
    """`loracap train` as a user runs it, with `--cache-features` (the frozen tower's features computed
    once, then read from disk; training on them equals training on the images, a test checks), the time
    to fill the cache counted in the budget. `unfrozen`: the diagnostic run with every vision layer
    trained too (`--unfreeze-vision-layers`, which reads the images: no cache)."""
    name = f"ours-{'unfrozen-' if unfrozen else ''}{seed}"
    tower = {"unfreeze_vision_layers": LAYERS, "lr_vision": 5e-4} if unfrozen else {"cache_features": True}
    settings = dict(
        data=str(data),
        vision=str(vision),
        lm=str(lm),
        projector="mlp",
        pixel_shuffle=2,
        lora_r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        lora_targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        lr_projector=2e-3,
        lr_lora=2e-3,
        batch_size=BATCH,
        max_caption_tokens=MAX_TOKENS,
        val_metrics=False,
        workers=1,
        progress=False,
        seed=seed,
        checkpoint_every=10**9,  # no resumable checkpoints: the timing runs have none, the baselines neither
        **tower,
    )
    if not unfrozen:
        settings["feature_cache_dir"] = str(out / f"{name}-features")  # empty: every seed pays for its fill
    # Two short runs time a step without the loop's start-up (data loader workers, first batches); the
    # first one also fills the cache, which the second one finds full. Each validates once, at its end,
    # as the real run does: a validation inside the longer probe would be charged to every step.
    short, long = (
        train(
            TrainSettings(
                out=str(out / f"{name}-probe-{n}"), max_steps=n, eval_every=n, test_metrics=False, **settings
            )
        )
        for n in (CALIBRATION, 3 * CALIBRATION)
    )
    fill = max(0.0, (short.seconds - short.train_seconds) - (long.seconds - long.train_seconds))
    per_step = (long.train_seconds - short.train_seconds) / (long.steps - short.steps)
    steps = max(CALIBRATION, round((seconds - fill - short.train_seconds) / per_step) + CALIBRATION)
    result = train(
        TrainSettings(out=str(out / name), max_steps=steps, warmup_steps=WARMUP, eval_every=steps, **settings)
    )
    print(
        f"  ours: {result.steps} steps in {result.train_seconds:.0f} s (+{fill:.0f} s fill)", file=sys.stderr
    )
    metrics = result.test_metrics or {}
    return {
        "steps": result.steps,
        "train_seconds": result.train_seconds + fill,
        "trainable": result.trainable_parameters,
        "total": result.total_parameters,
        **{k: metrics[k] for k in ("cider", "bleu4", "rouge_l")},
        "examples": metrics["captions"][:3],
    }


# --- (b) ViT-GPT2 style ------------------------------------------------------------------------------------


def run_vision_encoder_decoder(
    splits: dict[str, list[Example]],
    vision: Path,
    gpt2: Path,
    seconds: float,
    out: Path,
    *,
    seed: int,
    frozen: bool = False,
) -> dict[str, Any]:
    """`frozen`: the diagnostic run with the vision tower frozen, as it is in ours."""
    from transformers import (
        AutoImageProcessor,
        AutoTokenizer,
        GPT2LMHeadModel,
        SiglipVisionModel,
        VisionEncoderDecoderModel,
    )

    tokenizer = AutoTokenizer.from_pretrained(gpt2)
    processor = AutoImageProcessor.from_pretrained(vision)
    encoder = quiet_load(SiglipVisionModel, vision)
    torch.manual_seed(seed)  # the new cross-attention layers
    decoder = quiet_load(GPT2LMHeadModel, gpt2, add_cross_attention=True)
    model = VisionEncoderDecoderModel(encoder=encoder, decoder=decoder)
    model.encoder.requires_grad_(not frozen)
    eos = tokenizer.eos_token_id
    model.config.decoder_start_token_id = model.config.pad_token_id = model.config.eos_token_id = eos
    model.generation_config.decoder_start_token_id = eos
    model.generation_config.pad_token_id = model.generation_config.eos_token_id = eos
    model.train()

    loader = _loader(splits["train"], processor, tokenizer, seed)

    def step(batch: dict[str, Any]) -> torch.Tensor:
        # The text half as loracap batches it: caption + eos, -100 on padding; the model shifts it right
        # behind its start token for the decoder's input.
        return model(pixel_values=batch["pixel_values"], labels=batch["labels"]).loss

    run = fit(model.parameters(), step, 0, seconds, lr=5e-4, batch=BATCH, label="ViT-GPT2", batches=loader)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    metrics = evaluate_examples(out, splits["test"], data="synthetic", split="test", progress=False)
    return {
        "train_seconds": run["seconds"],
        "steps": run["steps"],
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total": sum(p.numel() for p in model.parameters()),
        **{k: metrics[k] for k in ("cider", "bleu4", "rouge_l")},
        "examples": metrics["captions"][:3],
    }


# --- (c) ClipCap ---------------------------------------------------------------------------------------


class ClipCap(nn.Module):
    """The pooled image embedding -> MLP -> `length` prefix embeddings for a frozen LM (Mokady et al. 2021,
    the MLP variant)."""

    def __init__(self, encoder: nn.Module, lm: nn.Module, length: int = CLIPCAP_PREFIX) -> None:
        super().__init__()
        self.encoder, self.lm, self.length = encoder, lm, length
        self.encoder.requires_grad_(False)
        self.lm.requires_grad_(False)
        width = lm.config.hidden_size
        pooled = encoder.config.hidden_size
        self.mlp = nn.Sequential(
            nn.Linear(pooled, width * length // 2), nn.Tanh(), nn.Linear(width * length // 2, width * length)
        )

    def prefix(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            pooled = self.encoder(pixel_values=pixel_values).pooler_output
        return self.mlp(pooled).view(pooled.shape[0], self.length, -1)

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels
    ):
        prefix = self.prefix(pixel_values)
        embeds = torch.cat([prefix, self.lm.get_input_embeddings()(input_ids)], dim=1)
        ones = torch.ones(prefix.shape[:2], dtype=attention_mask.dtype)
        ignore = torch.full(prefix.shape[:2], -100, dtype=labels.dtype)
        return self.lm(
            inputs_embeds=embeds,
            attention_mask=torch.cat([ones, attention_mask], dim=1),
            labels=torch.cat([ignore, labels], dim=1),
        ).loss

    @torch.inference_mode()
    def caption(self, pixel_values: torch.Tensor, tokenizer: Any) -> list[str]:
        prefix = self.prefix(pixel_values)
        out = self.lm.generate(
            inputs_embeds=prefix,
            attention_mask=torch.ones(prefix.shape[:2], dtype=torch.long),
            max_new_tokens=MAX_TOKENS,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.eos_token_id,
        )
        return [t.strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True)]


def run_clipcap(
    splits: dict[str, list[Example]], vision: Path, lm: Path, seconds: float, *, seed: int
) -> dict[str, Any]:
    from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer, SiglipVisionModel

    tokenizer = AutoTokenizer.from_pretrained(lm)
    processor = AutoImageProcessor.from_pretrained(vision)
    torch.manual_seed(seed)
    model = ClipCap(quiet_load(SiglipVisionModel, vision), AutoModelForCausalLM.from_pretrained(lm))
    loader = _loader(splits["train"], processor, tokenizer, seed)

    def step(batch: dict[str, Any]) -> torch.Tensor:
        return model(**{k: v for k, v in batch.items() if k != "captions"})

    run = fit(model.mlp.parameters(), step, 0, seconds, lr=2e-3, batch=BATCH, label="ClipCap", batches=loader)
    model.eval()
    predictions, test = {}, splits["test"]
    for i in range(0, len(test), 64):
        chunk = test[i : i + 64]
        pixels = processor(images=[e.image() for e in chunk], return_tensors="pt")["pixel_values"]
        predictions.update(zip([e.key for e in chunk], model.caption(pixels, tokenizer), strict=True))
    metrics = caption_metrics(predictions, {e.key: [e.caption] for e in test})
    return {
        "train_seconds": run["seconds"],
        "steps": run["steps"],
        "trainable": sum(p.numel() for p in model.mlp.parameters()),
        "total": sum(p.numel() for p in model.parameters()),
        **metrics,
        "examples": [
            {"key": e.key, "reference": e.caption, "prediction": predictions[e.key]} for e in test[:3]
        ],
    }


def quiet_load(cls: Any, folder: Path, **kwargs: Any) -> Any:
    """`cls.from_pretrained` without the table of the text tower's weights a vision-only load skips (or the
    new cross-attention weights a decoder gains)."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        return cls.from_pretrained(folder, **kwargs)
    finally:
        logging.set_verbosity(level)


def _loader(
    examples: list[Example], processor: Any, tokenizer: Any, seed: int
) -> Callable[[], Iterator[Any]]:
    """loracap train's own dataset, sampler and collate, so every method pays the same for its data."""
    from torch.utils.data import DataLoader

    sampler = EpochSampler(len(examples), seed=seed)
    loader = DataLoader(
        CaptionDataset(examples, processor),
        batch_size=BATCH,
        sampler=sampler,
        collate_fn=Collate(tokenizer, processor, "", MAX_TOKENS),
        num_workers=1,
        persistent_workers=True,
    )

    def epochs() -> Iterator[Any]:
        epoch = 0
        while True:
            sampler.set_epoch(epoch)
            yield from (b for b in loader if b is not None)
            epoch += 1

    return epochs


# --- the run ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--n", type=int, default=6000, help="synthetic images (80%% train, 10%% val, 10%% test)"
    )
    parser.add_argument("--budget", type=float, default=180, help="training seconds per method")
    parser.add_argument("--pretrain", type=float, default=120, help="seconds for each tower's pre-training")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--seeds", type=lambda v: [int(x) for x in v.split(",")], default=[0, 1, 2], help="e.g. 0,1,2"
    )
    parser.add_argument(
        "--methods",
        type=lambda v: v.split(","),
        default=["ours", "vit-gpt2", "clipcap"],
        help="any of ours, vit-gpt2, clipcap and the diagnostics ours-unfrozen, vit-gpt2-frozen",
    )
    parser.add_argument("--work", type=Path, help="keep the data and models here (default: a temp folder)")
    parser.add_argument("--results", type=Path, help="append the table to this markdown file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        data = work / "data"
        if not data.is_dir():
            synthetic.write_dataset(data, args.n, size=IMAGE_SIZE)
        splits = split_examples(data)
        counts = {k: len(v) for k, v in splits.items()}
        print(f"data: {counts}", file=sys.stderr)

        print("pre-training the towers", file=sys.stderr)
        corpus = train_captions()
        tokenizer = make_tokenizer(corpus, work / "tokenizer")
        done = work / "pretrained.json"  # a --work folder keeps its towers: re-runs compare the methods only
        if done.is_file():
            pre = json.loads(done.read_text())
        else:
            pre = {
                "vision_loss": pretrain_vision(splits["train"], tokenizer, args.pretrain, work / "vision"),
                "llama_loss": pretrain_lm("llama", tokenizer, corpus, args.pretrain / 2, work / "llama"),
                "gpt2_loss": pretrain_lm("gpt2", tokenizer, corpus, args.pretrain / 2, work / "gpt2"),
                "seconds": args.pretrain,
            }
            done.write_text(json.dumps(pre))

        print(f"training each method for {args.budget:.0f} s", file=sys.stderr)
        vision, llama, gpt2 = work / "vision", work / "llama", work / "gpt2"
        every = {
            "ours": lambda seed: run_ours(data, vision, llama, args.budget, work, seed=seed),
            "vit-gpt2": lambda seed: run_vision_encoder_decoder(
                splits, vision, gpt2, args.budget, work / f"vit-gpt2-{seed}", seed=seed
            ),
            "clipcap": lambda seed: run_clipcap(splits, vision, llama, args.budget, seed=seed),
            # Diagnostics: is the gap between ours and ViT-GPT2 the frozen tower or the rest of the design?
            "ours-unfrozen": lambda seed: run_ours(
                data, vision, llama, args.budget, work, seed=seed, unfrozen=True
            ),
            "vit-gpt2-frozen": lambda seed: run_vision_encoder_decoder(
                splits, vision, gpt2, args.budget, work / f"vit-gpt2-frozen-{seed}", seed=seed, frozen=True
            ),
        }
        methods = {name: every[name] for name in args.methods}
        results: dict[str, list[dict[str, Any]]] = {name: [] for name in methods}
        for seed in args.seeds:  # seeds outermost: a run cut short still compares every method
            for name, run in methods.items():
                print(f"{name}, seed {seed}", file=sys.stderr)
                results[name].append(run(seed))
        table = render(results, counts, pre, args, time.perf_counter() - started)
    print(table)
    if args.results:
        with args.results.open("a", encoding="utf-8") as f:
            f.write("\n" + table)
    return 0


def render(
    results: dict[str, list[dict[str, Any]]],
    counts: dict[str, int],
    pre: dict[str, float],
    args: Any,
    total: float,
) -> str:
    names = {
        "ours": "(a) ours: frozen SigLIP patches -> MLP (2x2 shuffle) -> Llama + LoRA, `--cache-features`",
        "vit-gpt2": "(b) ViT-GPT2 style: SigLIP + GPT-2 cross-attention, all trained",
        "clipcap": "(c) ClipCap: frozen SigLIP pooled -> MLP -> 10 tokens -> frozen Llama",
        "ours-unfrozen": "diagnostic: (a) with every SigLIP layer trained too (`--unfreeze-vision-layers`)",
        "vit-gpt2-frozen": "diagnostic: (b) with SigLIP frozen",
    }
    seeds = ",".join(map(str, args.seeds))
    methods = ",".join(args.methods)
    methods = "" if methods == "ours,vit-gpt2,clipcap" else f" --methods {methods}"
    lines = [
        f"### Prefix captioner vs ViT-GPT2 vs ClipCap ({time.strftime('%Y-%m-%d')}, "
        f"{platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__})",
        "",
        f"`python benchmarks/prefix_captioner.py --n {args.n} --budget {args.budget:.0f} "
        f"--pretrain {pre['seconds']:.0f} --seeds {seeds}{methods}`: {counts['train']} train / "
        f"{counts['val']} val / {counts['test']} test images, {IMAGE_SIZE} px; the test split's compositions "
        f"never occur in training. Towers: width {WIDTH}, {LAYERS} layers; pre-training losses: SigLIP "
        f"{pre['vision_loss']:.3f}, Llama {pre['llama_loss']:.3f}, GPT-2 {pre['gpt2_loss']:.3f}. "
        f"Whole run {total / 60:.1f} min. Scores are means over the seeds; CIDEr of each seed in brackets.",
        "",
        "| method | trainable / total params | train s | steps | CIDEr | BLEU-4 | ROUGE-L |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, runs in results.items():
        r = runs[0]
        per_seed = ", ".join(f"{run['cider']:.2f}" for run in runs)
        lines.append(
            f"| {names[key]} | {r['trainable']:,} / {r['total']:,} | {_mean(runs, 'train_seconds'):.0f} | "
            f"{_mean(runs, 'steps'):.0f} | **{_mean(runs, 'cider'):.3f}** ({per_seed}) | "
            f"{_mean(runs, 'bleu4'):.3f} | {_mean(runs, 'rouge_l'):.3f} |"
        )
    lines += ["", "Test captions, first seed (reference -> prediction):", ""]
    for key, runs in results.items():
        for e in runs[0]["examples"][:2]:
            lines.append(f"- {key}: `{e['reference']}` -> `{e['prediction']}`")
    return "\n".join(lines) + "\n"


def _mean(runs: list[dict[str, Any]], key: str) -> float:
    return sum(run[key] for run in runs) / len(runs)


if __name__ == "__main__":
    sys.exit(main())
