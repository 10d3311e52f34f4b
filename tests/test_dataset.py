"""loracap.dataset: what the stores write, the reader gives back as one record type in every layout."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import write_images

from loracap.dataset import CaptionRecord, kohya_key, open_store, read_dataset


def test_records_name_image_caption_layout_key_and_source(tmp_path):
    a, b = write_images(tmp_path, ["sub/a.png", "train/b.jpg"])

    with open_store("sidecar", tmp_path) as store:
        store.write(a, "ohwx, a cat\nsecond line")
        store.write(b, "  ")
    ds = read_dataset(tmp_path, layout="sidecar")
    assert ds.records == [
        CaptionRecord(a, "ohwx, a cat\nsecond line", "sidecar", "sub/a.txt", tmp_path / "sub" / "a.txt"),
        CaptionRecord(b, "", "sidecar", "train/b.txt", tmp_path / "train" / "b.txt"),
    ]
    assert ds.records[0].lines == ["ohwx, a cat", "second line"]
    assert ds.pairs == [(a, "ohwx, a cat\nsecond line"), (b, "")]  # the views report and train use
    assert ds.captions == ["ohwx, a cat\nsecond line", ""]

    with open_store("jsonl", tmp_path) as store:
        store.write(a, "a")
        store.write(b, "b")
    records = read_dataset(tmp_path, layout="jsonl").records
    # The key is relative to the dataset folder, also for a record in a split folder's file.
    assert [(r.key, r.source, r.layout) for r in records] == [
        ("sub/a.png", tmp_path / "metadata.jsonl", "jsonl"),
        ("train/b.jpg", tmp_path / "train" / "metadata.jsonl", "jsonl"),
    ]

    with open_store("kohya-json", tmp_path) as store:
        store.write(a, "a")
    ds = read_dataset(tmp_path, layout="kohya-json")
    assert ds.records == [CaptionRecord(a, "a", "kohya-json", kohya_key(a), tmp_path / "meta_cap.json")]
    assert ds.missing == [b]

    with pytest.raises(dataclasses.FrozenInstanceError):
        ds.records[0].text = "changed"  # type: ignore[misc]
