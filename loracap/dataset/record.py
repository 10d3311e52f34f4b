"""What reading a dataset gives back: one `CaptionRecord` per captioned image, one `CaptionProblem` per
caption source that could not be read. Every command that reads a dataset (report, train, and the ones to
come) sees these, whatever the layout."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["CaptionProblem", "CaptionRecord", "caption_lines"]


def caption_lines(text: str) -> list[str]:
    """A caption's alternatives: its non-blank lines, stripped ([] for an empty caption). A caption of
    several lines is several captions of one image, of which a trainer draws one (OneTrainer at every
    epoch, sd-scripts with --enable_wildcard at every step); `loracap caption --captions-per-image`
    writes them so."""
    return [line.strip() for line in text.splitlines() if line.strip()]


@dataclass(frozen=True)
class CaptionRecord:
    """One image and the caption its dataset's layout holds for it."""

    image: Path
    """The image file, as `loracap.inputs.find_images` found it (absolute)."""
    text: str
    """The caption, stripped; alternatives one a line (see `caption_lines`; metadata.jsonl's rows of one
    image become its lines). "" when the file or entry is there but empty or only whitespace: a trainer
    trains that image unconditioned, which the text checks flag."""
    layout: str
    """The layout it was read from: "sidecar", "jsonl" or "kohya-json"."""
    key: str
    """What names the image in that layout: the caption file relative to the dataset folder ("sub/a.txt")
    for sidecar; the file_name relative to the dataset folder, normalised as datasets does it
    ("train/a.jpg", also for a record in train/metadata.jsonl) for jsonl; the absolute-path key
    (`kohya_key`) for kohya-json."""
    source: Path
    """The file the caption was read from: the sidecar file, the metadata.jsonl that holds the record
    (the root's or a split folder's), or the kohya JSON file."""

    @property
    def lines(self) -> list[str]:
        """The caption's alternatives, its non-blank lines (sd-scripts reads only the first line of a sidecar
        file unless --enable_wildcard; OneTrainer draws one line per epoch)."""
        return caption_lines(self.text)


@dataclass
class CaptionProblem:
    """A caption source that could not be read as expected; the rest of the dataset is still read."""

    path: str
    """Relative to the dataset folder where possible ("sub/a.txt", "metadata.jsonl:7")."""
    reason: str
