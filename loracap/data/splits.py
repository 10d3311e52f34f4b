"""The split convention shared by the datasets loracap writes and `loracap train`, which reads them back.

A dataset folder may carry its own split in `splits.json`: {"train": [...], "val": [...], "test": [...]},
image paths relative to the folder (`loracap.data.synthetic` writes one that holds out compositions).
"""

from __future__ import annotations

__all__ = ["DATASET_SPLITS_FILE", "SPLITS"]

SPLITS = ("train", "val", "test")
DATASET_SPLITS_FILE = "splits.json"
