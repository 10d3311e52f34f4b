"""Training examples and their split: from a loracap-captioned folder or a Hugging Face dataset.

The split is seeded and written to `split.json` in the output folder, and a later run (a resume, a run
continuing `--from` the captioner, or `loracap eval`) reads it back instead of drawing again, so the test
images never leak into training. A
dataset folder that carries its own `splits.json` ({"train": [...], "val": [...], "test": [...]}, as
`loracap.data.synthetic` writes) keeps those splits: they may hold out compositions on purpose.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loracap.data.splits import DATASET_SPLITS_FILE, SPLITS
from loracap.dataset.record import caption_lines
from loracap.files import atomic_write_text
from loracap.inputs import load_image, to_rgb

__all__ = [
    "Example",
    "TableImage",
    "assign_splits",
    "extend_split",
    "load_examples",
    "read_split",
    "visit_of",
    "write_split",
]

SPLIT_FILE = "split.json"


@dataclass(frozen=True)
class Example:
    key: str
    """Stable id: the image path relative to the dataset folder, or "dataset[index]"."""
    caption: str
    """The caption; alternatives a line each (`loracap caption --captions-per-image`), of which an epoch
    trains one (`caption_for`) and evaluation takes all as references."""
    path: Path | None = None
    """The image file, when there is one."""
    loader: Callable[[], Any] | None = None
    """Returns the PIL image when there is no file (Hugging Face datasets)."""

    def image(self, min_side: int | None = None) -> Any:
        """The RGB image; a file is shrunk while decoding to `min_side` on its short side, as `loracap
        caption` decodes it (an image in memory is left as it is: the processor resizes it anyway).
        Raises ImageDecodeError for a file that is not a readable image."""
        if self.path is not None:
            return load_image(self.path, min_side=min_side)
        # to_rgb, not .convert("RGB"): alpha goes on the same mid-grey as in image files (load_image), not
        # on black, so a transparent image looks the same to the model whichever way it was stored.
        return to_rgb(self.loader())

    @property
    def references(self) -> list[str]:
        """Its captions: each line of a caption of several (what a generated caption is scored against)."""
        return caption_lines(self.caption) or [self.caption]

    def caption_for(self, visit: int) -> str:
        """The caption one visit trains with: one of its lines, drawn from `visit` (the run's seed and the
        epoch, see `visit_of`) and the example's key, so every epoch draws anew and a resume draws the same,
        as OneTrainer draws a line per epoch. A one-line caption is itself."""
        lines = self.references
        if len(lines) == 1:
            return self.caption
        return lines[random.Random(f"{visit}:{self.key}").randrange(len(lines))]


def visit_of(index: int, examples: int) -> tuple[int, int]:
    """(example index, visit) from a sampler's index: `EpochSampler` yields `i + examples * visit`, so the
    dataset knows which epoch of which run it serves without being told (its workers are copies)."""
    return index % examples, index // examples


def load_examples(
    data: str | Path,
    *,
    image_column: str = "image",
    caption_column: str = "text",
    hf_split: str = "train",
    ext: str = ".txt",
) -> list[Example]:
    """Every captioned image in `data`: a folder loracap wrote (sidecar, metadata.jsonl, kohya JSON), or a
    Hugging Face dataset id / saved dataset. Images with no or an empty caption are left out."""
    folder = Path(data)
    saved_dataset = (folder / "dataset_info.json").is_file() or (folder / "dataset_dict.json").is_file()
    if folder.is_dir() and not saved_dataset:
        from loracap.dataset import read_dataset

        ds = read_dataset(folder, ext=ext)
        root = ds.root
        return [
            Example(path.relative_to(root).as_posix(), caption.strip(), path=path)
            for path, caption in ds.pairs
            if caption.strip()
        ]
    return _hf_examples(str(data), image_column, caption_column, hf_split)


def _hf_examples(name: str, image_column: str, caption_column: str, split: str) -> list[Example]:
    import datasets  # the `train` extra, and heavy: only Hugging Face datasets load it

    if Path(name).is_dir():
        table = datasets.load_from_disk(name)
        table = table[split] if isinstance(table, datasets.DatasetDict) else table
    else:
        table = datasets.load_dataset(name, split=split)
    missing = [c for c in (image_column, caption_column) if c not in table.column_names]
    if missing:
        raise ValueError(f"{name} has no column {missing[0]!r}; columns: {', '.join(table.column_names)}")
    captions = [_caption_text(c) for c in table[caption_column]]
    return [
        Example(f"{name}[{i}]", c, loader=TableImage(table, i, image_column))
        for i, c in enumerate(captions)
        if c
    ]


def _caption_text(value: Any) -> str:
    """A table's caption cell as text: a list of captions (diffusers' text-to-image scripts draw one) as
    alternatives, a line each."""
    if isinstance(value, list | tuple):
        return "\n".join(str(v).strip() for v in value if str(v or "").strip())
    return str(value or "").strip()


@dataclass(frozen=True)
class TableImage:
    """The image of one row of a Hugging Face dataset, decoded when called.

    A picklable class, not a lambda: DataLoader workers started with "spawn" (macOS, Windows) receive the
    examples pickled. It also says where the image is stored, which the feature cache keys entries by."""

    table: Any
    index: int
    column: str

    def __call__(self) -> Any:
        return self.table[self.index][self.column]


def assign_splits(keys: list[str], *, seed: int, val_share: float, test_share: float) -> dict[str, list[str]]:
    """A seeded shuffle of the sorted keys cut into train / val / test; at least one val and one test
    example once there are ten or more."""
    if not 0 <= val_share < 1 or not 0 <= test_share < 1 or val_share + test_share >= 1:
        raise ValueError(
            f"val and test shares must be in [0, 1) and sum below 1, got {val_share}, {test_share}"
        )
    order = sorted(keys)
    random.Random(seed).shuffle(order)
    n = len(order)
    n_test = max(round(n * test_share), 1 if test_share and n >= 10 else 0)
    n_val = max(round(n * val_share), 1 if val_share and n >= 10 else 0)
    return {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}


def extend_split(previous: dict[str, list[str]], fresh: dict[str, list[str]]) -> dict[str, list[str]]:
    """`previous` as it is, plus each key of `fresh` that `previous` does not know, in its `fresh` split.

    For a captioner trained further (`--from`): the images held out from it stay held out, whatever a new
    draw would say, and only images it has never seen are assigned anew."""
    known = {key for name in SPLITS for key in previous[name]}
    return {name: previous[name] + [k for k in fresh[name] if k not in known] for name in SPLITS}


def dataset_splits(data: str | Path) -> dict[str, list[str]] | None:
    """The dataset's own splits.json, if it has one."""
    path = Path(data) / DATASET_SPLITS_FILE
    if not path.is_file():
        return None
    splits = json.loads(path.read_text(encoding="utf-8"))
    return {name: list(splits.get(name, [])) for name in SPLITS}


def write_split(out: Path, splits: dict[str, list[str]], *, seed: int, source: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    doc = {"seed": seed, "source": source, **{name: splits[name] for name in SPLITS}}
    atomic_write_text(out / SPLIT_FILE, json.dumps(doc, indent=1) + "\n")


def read_split(out: Path) -> dict[str, list[str]] | None:
    path = Path(out) / SPLIT_FILE
    if not path.is_file():
        return None
    doc = json.loads(path.read_text(encoding="utf-8"))
    return {name: list(doc[name]) for name in SPLITS}
