"""A tiny WD14-style tagger: `model.onnx` (a small convolutional net exported by torch) and
`selected_tags.csv`, laid out as SmilingWolf's wd-*-tagger repositories are.

The graph takes what the real ones take, float32 NHWC images 0-255 (BGR) at a fixed side (64 here, 448
there), with a dynamic batch, and gives one sigmoid probability per row of the csv. The tag list has the
real layout: 4 rating tags (category 9) first, then general tags (0), then character tags (4), with
underscores in the names. Random weights: which tags come out is junk; thresholds, order and batching
behave as with a real tagger. onnxruntime reads it; torch writes it (with onnxscript), only at build time.

`size="full"` (for benchmarks/tagger_throughput.py, not offered by `make_tiny_model`) builds a graph of
wd-vit-tagger-v3's size instead: a ViT-B/16 at 448 px (784 patches, 12 blocks of width 768) with a
10,861-tag head, about 94 M parameters (376 MB); its head's biases are drawn low so that, as with a real
tagger, a few tens of tags pass the default threshold instead of thousands.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

TAGGER_ARCHS: tuple[str, ...] = ("wd-tagger",)
SIDE = 64
FULL_SIDE, FULL_PATCH, FULL_WIDTH, FULL_DEPTH, FULL_HEADS = 448, 16, 768, 12, 12
FULL_GENERAL, FULL_CHARACTERS = 8004, 2853  # with the 4 ratings, wd-vit-tagger-v3's 10,861 rows
RATINGS = ("general", "sensitive", "questionable", "explicit")
GENERAL = (
    "1girl", "solo", "long_hair", "short_hair", "smile", "open_mouth", "outdoors", "indoors", "sky", "tree",
    "red_dress", "blue_eyes", "hat", "holding", "looking_at_viewer", "simple_background", "white_background",
    "^_^", "upper_body", "full_body",
)  # fmt: skip
CHARACTERS = ("hatsune_miku", "kirisame_marisa", "hakurei_reimu")


def build_tagger(arch: str, out: Path, *, seed: int = 0, size: str = "tiny") -> None:
    if size == "full":
        general = [f"general_tag_{i:04d}" for i in range(FULL_GENERAL)]
        characters = [f"character_{i:04d}_(series)" for i in range(FULL_CHARACTERS)]
        _export(_full_vit(len(RATINGS) + len(general) + len(characters), seed), FULL_SIDE, out)
        _write_tags(out, general, characters)
        return
    tags = len(RATINGS) + len(GENERAL) + len(CHARACTERS)
    _export(_tiny_convnet(tags, seed), SIDE, out)
    _write_tags(out, GENERAL, CHARACTERS)


def _tiny_convnet(tags: int, seed: int) -> torch.nn.Module:
    import torch

    from loracap.testing.seeding import seeded_model

    class Tagger(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 5, stride=4)
            self.head = torch.nn.Linear(8, tags)

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            x = self.conv(images.permute(0, 3, 1, 2) / 255.0 - 0.5).relu().mean(dim=(2, 3))
            return torch.sigmoid(3.0 * self.head(x))

    return seeded_model(seed, Tagger, spread=None)


def _full_vit(tags: int, seed: int) -> torch.nn.Module:
    import torch
    import torch.nn.functional as F

    from loracap.testing.seeding import seeded_model

    width, heads, tokens = FULL_WIDTH, FULL_HEADS, (FULL_SIDE // FULL_PATCH) ** 2 + 1

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm1, self.norm2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
            self.qkv, self.proj = torch.nn.Linear(width, 3 * width), torch.nn.Linear(width, width)
            self.fc1, self.fc2 = torch.nn.Linear(width, 4 * width), torch.nn.Linear(4 * width, width)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            batch, length, _ = x.shape
            q, k, v = self.qkv(self.norm1(x)).reshape(batch, length, 3, heads, -1).permute(2, 0, 3, 1, 4)
            attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, length, width)
            x = x + self.proj(attended)
            return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))

    class ViTTagger(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.patches = torch.nn.Conv2d(3, width, FULL_PATCH, stride=FULL_PATCH)
            self.cls = torch.nn.Parameter(torch.zeros(1, 1, width))
            self.position = torch.nn.Parameter(torch.randn(1, tokens, width) * 0.02)
            self.blocks = torch.nn.ModuleList(Block() for _ in range(FULL_DEPTH))
            self.norm = torch.nn.LayerNorm(width)
            self.head = torch.nn.Linear(width, tags)
            with torch.no_grad():  # most tags unlikely, a few tens above 0.35 (about 0.15% of them)
                self.head.bias.normal_(-4.5, 1.3)

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            x = self.patches(images.permute(0, 3, 1, 2) / 127.5 - 1.0).flatten(2).transpose(1, 2)
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.position
            for block in self.blocks:
                x = block(x)
            return torch.sigmoid(self.head(self.norm(x).mean(dim=1)))

    return seeded_model(seed, ViTTagger, spread=None)


def _export(model: torch.nn.Module, side: int, out: Path) -> None:
    """The graph as SmilingWolf's: input "input" float32 NHWC at a fixed side, dynamic batch; one output."""
    import torch

    example = torch.rand(2, side, side, 3) * 255
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.onnx.export(
        model,
        (example,),
        str(out / "model.onnx"),
        input_names=["input"],
        output_names=["output"],
        dynamic_shapes={"images": {0: batch}},
        dynamo=True,
        external_data=False,
    )


def _write_tags(out: Path, general: Sequence[str], characters: Sequence[str]) -> None:
    tags = (
        [(name, 9) for name in RATINGS] + [(name, 0) for name in general] + [(name, 4) for name in characters]
    )
    lines = ["tag_id,name,category,count"] + [
        f"{i},{name},{kind},{100_000 - i}" for i, (name, kind) in enumerate(tags)
    ]
    (out / "selected_tags.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
