"""Captioned datasets, read and written in the layouts trainers use.

    sidecar     <stem>.txt (or .caption) next to each image: kohya sd-scripts, ai-toolkit, OneTrainer
    jsonl       metadata.jsonl in the dataset folder, or one per split folder (train/, test/): HF datasets
                "imagefolder", diffusers scripts
    kohya-json  meta_cap.json keyed by absolute image path: sd-scripts fine-tuning metadata (--in_json)

Reading: `read_dataset(root)` gives a `Dataset` of `CaptionRecord`s (image, caption, layout, key, source)
plus what a trainer would trip over (missing captions, orphans, unreadable ones as `CaptionProblem`s).
Writing: `open_store(fmt, root)` gives a `CaptionStore` that reads an image's existing caption and writes
new ones atomically. The reader uses the stores' own keys and readers, so both see a dataset the same way.

    record.py   CaptionRecord, CaptionProblem
    read.py     read_dataset, detect_layout, Dataset
    stores.py   open_store, the CaptionStore protocol, sidecar_collisions
    sidecar.py, jsonl.py, kohya.py: each layout's store, keys and file reading
"""

from __future__ import annotations

from loracap.dataset.jsonl import JsonlStore, store_file_label
from loracap.dataset.kohya import KohyaJsonStore, kohya_key
from loracap.dataset.read import LAYOUTS, Dataset, detect_layout, read_dataset
from loracap.dataset.record import CaptionProblem, CaptionRecord, caption_lines
from loracap.dataset.sidecar import SidecarStore, UnreadableCaption, caption_path, normalize_ext
from loracap.dataset.stores import FORMATS, CaptionStore, open_store, sidecar_collisions

__all__ = [
    "FORMATS",
    "LAYOUTS",
    "CaptionProblem",
    "CaptionRecord",
    "CaptionStore",
    "Dataset",
    "JsonlStore",
    "KohyaJsonStore",
    "SidecarStore",
    "UnreadableCaption",
    "caption_lines",
    "caption_path",
    "detect_layout",
    "kohya_key",
    "normalize_ext",
    "open_store",
    "read_dataset",
    "sidecar_collisions",
    "store_file_label",
]
