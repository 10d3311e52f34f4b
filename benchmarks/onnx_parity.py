"""ONNX exports of trained captioners against PyTorch on the synthetic test split: token agreement on 20
test images (fp32 must be exact; int8 should agree on 90%+) and CIDEr of each precision (int8 within 5%
of PyTorch's is the goal), plus the graphs' sizes.

    python benchmarks/prefix_captioner.py --n 1500 --budget 90 --pretrain 90 --seeds 0 \
        --methods ours,vit-gpt2 --work /tmp/pc          # trains the captioners (~15 min on 2 cores)
    python benchmarks/onnx_parity.py --work /tmp/pc     # exports and scores them

Each captioner in WORK (ours-SEED: `loracap train`'s SigLIP -> projector -> Llama; vit-gpt2-SEED) is
exported by `loracap export-onnx --quantize int8,fp16` (whose own parity check must pass), then every
side captions the test split greedily through the backend `loracap caption --model` loads.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path


def score(
    folder: Path, quant: str | None, examples: list, references: dict, limit: int
) -> tuple[float, list[list[int]]]:
    from loracap.backends import load_backend
    from loracap.backends.base import GenerationSettings
    from loracap.train.metrics import caption_metrics, generate_for

    backend = load_backend(str(folder), device="cpu", quant=quant)
    captions = generate_for(backend, examples, batch_size=16, max_new_tokens=limit).captions
    ids: list[list[int]] = []
    if hasattr(backend, "token_ids"):  # onnxruntime: the token ids of the first 20 images
        images = [e.image() for e in examples[:20]]
        ids = backend.token_ids(backend.prepare(images, "caption"), GenerationSettings(max_new_tokens=limit))
    return caption_metrics(captions, references)["cider"], ids


def torch_ids(folder: Path, examples: list, runtime: object) -> list[list[int]]:
    """PyTorch's greedy token ids of the first 20 test images, from the same pixels."""
    from loracap.onnx_export.architectures import architecture

    arch = architecture(folder)
    inputs = runtime.prepare([e.image() for e in examples[:20]], "caption")
    return arch.reference(arch.load(folder), inputs, runtime.max_new_tokens, runtime)[1]


def agreement(want: list[list[int]], have: list[list[int]]) -> float:
    same = sum(a == b for x, y in zip(want, have, strict=True) for a, b in zip(x, y, strict=False))
    return same / max(1, sum(max(len(x), len(y)) for x, y in zip(want, have, strict=True)))


def main(argv: list[str] | None = None) -> None:
    import torch

    from loracap.backends.onnx_captioner import load_onnx_captioner
    from loracap.onnx_export import ExportOnnxConfig, export_onnx
    from loracap.train.data import load_examples

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="prefix_captioner.py's --work folder")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    everything = {e.key: e for e in load_examples(args.work / "data")}
    rows = []
    # The synthetic data's own test split (data/splits.json), the one prefix_captioner.py scores on.
    test = json.loads((args.work / "data" / "splits.json").read_text())["test"]
    examples = [everything[k] for k in test if k in everything]
    references = {e.key: e.caption.splitlines() for e in examples}
    for folder in sorted(p for p in args.work.iterdir() if re.fullmatch(r"(ours|vit-gpt2)-\d+", p.name)):
        out = args.work / f"{folder.name}-onnx"
        export = export_onnx(
            ExportOnnxConfig(model=str(folder), out=out, quantize="int8,fp16", check_images=20)
        )
        runtime = load_onnx_captioner(out, "probe")
        limit = runtime.max_new_tokens
        want = torch_ids(folder, examples, runtime)
        cider = {"pytorch": score(folder, None, examples, references, limit)[0]}
        for quant in (None, "int8", "fp16"):
            value, ids = score(out, quant, examples, references, limit)
            cider[quant or "fp32"] = value
            cider[f"{quant or 'fp32'} agreement"] = agreement(want, ids)
        sizes = export["files"]
        rows.append((folder.name, len(examples), cider, sizes))
    print(
        "| captioner | test images | PyTorch CIDEr | fp32 CIDEr (agreement) | int8 CIDEr (agreement) "
        "| fp16 CIDEr (agreement) | graphs fp32 / int8 / fp16 MB |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, count, c, sizes in rows:
        int8 = sum(v for k, v in sizes.items() if k.endswith("_quantized.onnx"))
        fp16 = sum(v for k, v in sizes.items() if k.endswith("_fp16.onnx"))
        fp32 = sum(sizes.values()) - int8 - fp16
        print(f"| {name} | {count} | {c['pytorch']:.3f} | {c['fp32']:.3f} ({c['fp32 agreement']:.0%}) "
              f"| {c['int8']:.3f} ({c['int8 agreement']:.0%}) | {c['fp16']:.3f} ({c['fp16 agreement']:.0%}) "
              f"| {fp32 / 1e6:.1f} / {int8 / 1e6:.1f} / {fp16 / 1e6:.1f} |")  # fmt: skip
        print(f"  int8 CIDEr / PyTorch CIDEr: {c['int8'] / max(c['pytorch'], 1e-9):.3f}", file=sys.stderr)


if __name__ == "__main__":
    main()
