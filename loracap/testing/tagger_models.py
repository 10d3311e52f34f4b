"""A tiny WD14-style tagger: `model.onnx` (a small convolutional net exported by torch) and
`selected_tags.csv`, laid out as SmilingWolf's wd-*-tagger repositories are.

The graph takes what the real ones take, float32 NHWC images 0-255 (BGR) at a fixed side (64 here, 448
there), with a dynamic batch, and gives one sigmoid probability per row of the csv. The tag list has the
real layout: 4 rating tags (category 9) first, then general tags (0), then character tags (4), with
underscores in the names. Random weights: which tags come out is junk; thresholds, order and batching
behave as with a real tagger. onnxruntime reads it; torch writes it (with onnxscript), only at build time.
"""

from __future__ import annotations

from pathlib import Path

TAGGER_ARCHS: tuple[str, ...] = ("wd-tagger",)
SIDE = 64
RATINGS = ("general", "sensitive", "questionable", "explicit")
GENERAL = (
    "1girl", "solo", "long_hair", "short_hair", "smile", "open_mouth", "outdoors", "indoors", "sky", "tree",
    "red_dress", "blue_eyes", "hat", "holding", "looking_at_viewer", "simple_background", "white_background",
    "^_^", "upper_body", "full_body",
)  # fmt: skip
CHARACTERS = ("hatsune_miku", "kirisame_marisa", "hakurei_reimu")


def build_tagger(arch: str, out: Path, *, seed: int = 0) -> None:
    import torch

    from loracap.testing.seeding import seeded_model

    tags = (
        [(name, 9) for name in RATINGS] + [(name, 0) for name in GENERAL] + [(name, 4) for name in CHARACTERS]
    )

    class Tagger(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 5, stride=4)
            self.head = torch.nn.Linear(8, len(tags))

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            x = self.conv(images.permute(0, 3, 1, 2) / 255.0 - 0.5).relu().mean(dim=(2, 3))
            return torch.sigmoid(3.0 * self.head(x))

    model = seeded_model(seed, Tagger, spread=None).eval()
    example = torch.rand(2, SIDE, SIDE, 3) * 255
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
    lines = ["tag_id,name,category,count"] + [
        f"{i},{name},{kind},{1000 - i}" for i, (name, kind) in enumerate(tags)
    ]
    (out / "selected_tags.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
