"""`loracap merge` (loracap.merge): several datasets, in any layout loracap reads, become one."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loracap.dataset import FORMATS, read_dataset
from loracap.merge import MANIFEST_FILE, MergeConfig, merge, parse_split

pytest.importorskip("imagehash")


# --- building sources -------------------------------------------------------------------------------------


def picture(seed: int, size: int = 64) -> Image.Image:
    """Blocky noise: two seeds give pictures ~32 phash bits apart, never near-duplicates."""
    blocks = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(blocks).resize((size, size), Image.NEAREST)


def encoded(seed: int, fmt: str = "PNG", size: int = 64) -> bytes:
    buffer = io.BytesIO()
    picture(seed, size).save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def _fmt(name: str) -> str:
    return "JPEG" if name.lower().endswith((".jpg", ".jpeg")) else "PNG"


def make(
    root: Path, layout: str, images: dict[str, tuple[int | bytes, str | None]], ext: str = ".txt"
) -> Path:
    """A dataset folder in `layout` (sidecar, jsonl, kohya-json, hf): {relative name: (seed or the file's
    bytes, caption or None)}."""
    root.mkdir(parents=True, exist_ok=True)
    data = {
        name: content if isinstance(content, bytes) else encoded(content, _fmt(name))
        for name, (content, _) in images.items()
    }
    captions = {name: text for name, (_, text) in images.items()}
    if layout == "hf":
        import datasets

        features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
        rows = {"image": [{"bytes": b, "path": n} for n, b in data.items()], "text": list(captions.values())}
        datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(root))
        return root
    for name, content in data.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    captioned = {name: text for name, text in captions.items() if text is not None}
    if layout == "sidecar":
        for name, text in captioned.items():
            (root / name).with_suffix(ext).write_text(text)
    elif layout == "jsonl":  # a split folder's images in that folder's own metadata.jsonl
        files: dict[Path, list[str]] = {}
        for name, text in captioned.items():
            folder, inner = (root / "train", name[6:]) if name.startswith("train/") else (root, name)
            files.setdefault(folder, []).append(json.dumps({"file_name": inner, "text": text}) + "\n")
        for folder, lines in files.items():
            (folder / "metadata.jsonl").write_text("".join(lines))
    elif layout == "kohya-json":
        entries = {os.path.realpath(root / name): {"caption": text} for name, text in captioned.items()}
        (root / "meta_cap.json").write_text(json.dumps(entries))
    return root


def run(tmp_path: Path, sources: list[Path], out: str = "out", **settings) -> tuple:
    config = MergeConfig(sources=sources, out=tmp_path / out, progress=False, **settings)
    return merge(config), tmp_path / out


def captions_of(root: Path, layout: str = "auto") -> dict[str, str]:
    ds = read_dataset(root, layout=layout)
    assert not ds.problems
    return {r.image.relative_to(ds.root).as_posix(): r.text for r in ds.records}


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / MANIFEST_FILE).read_text().splitlines()]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def five_layouts(tmp_path: Path) -> list[Path]:
    """One source per layout loracap reads, names all different, one image with no caption."""
    return [
        make(
            tmp_path / "A", "sidecar", {"a1.png": (1, "a one"), "a2.jpg": (2, "a two"), "a3.png": (3, None)}
        ),
        make(tmp_path / "B", "sidecar", {"b1.png": (4, "b one")}, ext=".caption"),
        make(
            tmp_path / "C",
            "jsonl",
            {"c1.png": (5, "c one"), "sub/c2.png": (6, "c two"), "train/c3.png": (7, "c three")},
        ),
        make(tmp_path / "D", "kohya-json", {"d1.png": (8, "d one")}),
        make(tmp_path / "E", "hf", {"e1.png": (9, "e one"), "e2.webp": (10, "e two")}),
    ]


CAPTIONED = {
    "a1.png": "a one",
    "a2.jpg": "a two",
    "b1.png": "b one",
    "c1.png": "c one",
    "c2.png": "c two",
    "c3.png": "c three",
    "d1.png": "d one",
    "e1.png": "e one",
    "e2.webp": "e two",
}
SOURCE_OF = {name: name[0].upper() for name in [*CAPTIONED, "a3.png"]}


# --- every layout in, every format out ---------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_layout_in_each_format_out_round_trips(tmp_path, five_layouts, fmt):
    summary, out = run(tmp_path, five_layouts, format=fmt)

    if fmt == "jsonl":  # an image without a caption is listed with "text": null, so imagefolder keeps it
        assert captions_of(out, fmt) == {**CAPTIONED, "a3.png": ""}
        lines = [json.loads(x) for x in (out / "metadata.jsonl").read_text().splitlines()]
        assert {x["file_name"]: x["source"] for x in lines} == SOURCE_OF
        assert next(x for x in lines if x["file_name"] == "a3.png")["text"] is None
        assert list(lines[0]) == ["file_name", "text", "source"]
    else:
        assert captions_of(out, fmt) == CAPTIONED
        assert [p.name for p in read_dataset(out, layout=fmt).missing] == ["a3.png"]
    assert read_dataset(out).layout == fmt  # what `loracap report OUT` would detect

    rows = manifest(out)
    assert {r["file"]: r["source"] for r in rows} == SOURCE_OF
    originals = {r["file"]: r["original"] for r in rows}
    assert originals["c2.png"] == "sub/c2.png" and originals["c3.png"] == "train/c3.png"
    assert originals["e2.webp"] == "[1]"
    assert all(r["sha256"] == sha(out / r["file"]) for r in rows)
    assert (out / "e2.webp").read_bytes() == encoded(10)  # a saved dataset's bytes, written as they were
    assert (out / "c2.png").read_bytes() == (tmp_path / "C/sub/c2.png").read_bytes()

    counts = {s.name: (s.layout, s.read, s.written, s.uncaptioned) for s in summary.sources}
    assert counts == {
        "A": ("sidecar", 3, 3, 1),
        "B": ("sidecar", 1, 1, 0),
        "C": ("jsonl", 3, 3, 0),
        "D": ("kohya-json", 1, 1, 0),
        "E": ("hf", 2, 2, 0),
    }
    assert (summary.written, summary.copied, summary.extracted, summary.linked) == (10, 8, 2, 0)
    assert "10 images written (8 copied, 2 from saved datasets)" in summary.describe()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_saved_dataset_rows_without_a_path_are_named_by_source_and_row(tmp_path):
    import datasets

    rows = {"image": [picture(1), picture(2)], "caption": ["one", "two"]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "hfset"))
    summary, out = run(tmp_path, [tmp_path / "hfset"], format="jsonl")
    assert captions_of(out) == {"hfset-0.png": "one", "hfset-1.png": "two"}  # the "caption" column


# --- splits ------------------------------------------------------------------------------------------------


def ten_images(tmp_path: Path) -> tuple[list[Path], dict[str, str]]:
    a = make(tmp_path / "A", "sidecar", {f"a{i}.png": (i, f"cap a{i}") for i in range(6)})
    b = make(tmp_path / "B", "hf", {f"b{i}.png": (10 + i, f"cap b{i}") for i in range(4)})
    return [a, b], {
        **{f"a{i}.png": f"cap a{i}" for i in range(6)},
        **{f"b{i}.png": f"cap b{i}" for i in range(4)},
    }


def test_jsonl_output_loads_with_imagefolder_offline_split_folders_as_splits(tmp_path):
    import datasets

    sources, expected = ten_images(tmp_path)
    summary, out = run(tmp_path, sources, format="jsonl", split="0.6,0.2,0.2")
    assert summary.splits == {"train": 6, "validation": 2, "test": 2}
    assert "splits: train 6, validation 2, test 2" in summary.describe()

    loaded = datasets.load_dataset("imagefolder", data_dir=str(out), cache_dir=str(tmp_path / "cache"))
    assert {name: len(loaded[name]) for name in loaded} == summary.splits
    seen = {}
    for split in loaded:
        table = loaded[split].cast_column("image", datasets.Image(decode=False))
        for row in table:
            name = Path(row["image"]["path"]).name
            assert (out / split / name).is_file()
            seen[name] = (row["text"], row["source"])
    assert seen == {name: (text, name[0].upper()) for name, text in expected.items()}


def test_split_is_seeded(tmp_path):
    sources, _ = ten_images(tmp_path)

    def assignment(out: str, seed: int) -> dict[str, str]:
        run(tmp_path, sources, out=out, split="0.5,0.3,0.2", seed=seed)
        return {r["file"].split("/")[1]: r["file"].split("/")[0] for r in manifest(tmp_path / out)}

    first = assignment("one", 0)
    assert sorted(first.values()).count("train") == 5
    assert assignment("two", 0) == first
    assert assignment("three", 1) != first
    summary, out = run(tmp_path, sources, out="one-share", split="1")
    assert summary.splits == {"train": 10} and sorted(p.name for p in out.iterdir()) == [
        MANIFEST_FILE,
        "train",
    ]


@pytest.mark.parametrize("fmt", FORMATS)
def test_split_folders_round_trip_in_each_format(tmp_path, fmt):
    sources, expected = ten_images(tmp_path)
    summary, out = run(tmp_path, sources, format=fmt, split="0.8,0.2")
    assert summary.splits == {"train": 8, "validation": 2}
    assert not (out / "test").exists()
    read = {}
    for split in ("train", "validation"):
        # kohya-json: a meta_cap.json per split folder, for sd-scripts' --train_data_dir OUT/train
        for name, text in captions_of(out / split, fmt).items():
            read[name] = text
    assert read == expected
    if fmt != "kohya-json":  # sidecars and split folders' metadata.jsonl are read from OUT as well
        assert sorted(Path(k).name for k in captions_of(out, fmt)) == sorted(expected)


def test_split_setting_is_checked():
    assert parse_split("0.9,0.05,0.05") == (0.9, 0.05, 0.05)
    assert parse_split([0.5, 0.5]) == (0.5, 0.5)
    for bad in ("0.9,0.2", "a,b", "0.5,0.2,0.2,0.1", "1.2,-0.2"):
        with pytest.raises(ValueError, match="--split"):
            parse_split(bad)


# --- duplicates --------------------------------------------------------------------------------------------


def duplicate_sources(tmp_path: Path) -> list[Path]:
    a = make(
        tmp_path / "A",
        "sidecar",
        {"a.png": (1, "cap a"), "b.png": (2, "cap b"), "copy-of-a.png": (encoded(1), "cap copy")},
    )
    b = make(
        tmp_path / "B",
        "jsonl",
        {
            "c.png": (encoded(2), "cap c"),  # A's b.png, byte for byte
            "d.jpg": (encoded(1, "JPEG"), "cap d"),  # A's a.png re-encoded: other bytes, same picture
            "e.png": (3, "cap e"),
        },
    )
    return [a, b]


def test_exact_and_perceptual_duplicates_are_dropped_and_reported(tmp_path):
    summary, out = run(tmp_path, duplicate_sources(tmp_path))

    assert captions_of(out) == {"a.png": "cap a", "b.png": "cap b", "e.png": "cap e"}
    counts = {s.name: (s.exact_duplicates, s.near_duplicates, s.written) for s in summary.sources}
    assert counts == {"A": (1, 0, 2), "B": (1, 1, 1)}
    dropped = {(d.source, d.original): (d.exact, d.kept, d.kept_source) for d in summary.duplicates}
    assert dropped == {
        ("A", "copy-of-a.png"): (True, "a.png", "A"),
        ("B", "c.png"): (True, "b.png", "A"),
        ("B", "d.jpg"): (False, "a.png", "A"),
    }
    near = next(d for d in summary.duplicates if not d.exact)
    assert 0 <= near.distance <= 6
    text = summary.describe()
    assert f"dropped B:d.jpg, a near duplicate (phash distance {near.distance}) of a.png (from A)" in text
    assert "dropped B:c.png, an exact duplicate of b.png (from A)" in text

    rows = {r["original"]: r for r in manifest(out)}
    assert rows["c.png"]["file"] is None and rows["c.png"]["dropped"] == "exact duplicate"
    assert rows["c.png"]["kept"] == "b.png" and rows["c.png"]["sha256"] == rows["b.png"]["sha256"]
    assert rows["d.jpg"]["dropped"] == "near duplicate" and rows["d.jpg"]["kept"] == "a.png"


def test_keep_dupes_keeps_them(tmp_path):
    summary, out = run(tmp_path, duplicate_sources(tmp_path), keep_dupes=True)
    assert sorted(captions_of(out)) == sorted(["a.png", "b.png", "copy-of-a.png", "c.png", "d.jpg", "e.png"])
    assert not summary.duplicates
    assert all("dropped" not in r for r in manifest(out))


def test_a_captioned_duplicate_is_kept_over_an_uncaptioned_one(tmp_path):
    a = make(tmp_path / "A", "sidecar", {"x.png": (1, None)})
    b = make(tmp_path / "B", "sidecar", {"y.png": (encoded(1), "has a caption")})
    summary, out = run(tmp_path, [a, b])
    assert captions_of(out) == {"y.png": "has a caption"}
    assert [(d.original, d.kept) for d in summary.duplicates] == [("x.png", "y.png")]


# --- names -------------------------------------------------------------------------------------------------


def test_name_clashes_never_overwrite(tmp_path):
    a = make(tmp_path / "A", "sidecar", {"x.png": (1, "x from A"), "y.png": (2, "y from A")})
    b = make(tmp_path / "B", "sidecar", {"x.png": (3, "x from B"), "Y.jpg": (4, "y from B")})
    c = make(tmp_path / "C", "kohya-json", {"x.png": (5, "x from C")})
    d = make(tmp_path / "D", "hf", {"x.png": (6, "x from D row 0")})
    import datasets  # a second row of D with the same stored name

    rows = datasets.load_from_disk(str(d)).to_dict()
    table = datasets.Dataset.from_dict(
        {"image": rows["image"] + [{"bytes": encoded(7), "path": "x.png"}], "text": rows["text"] + ["row 1"]},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}),
    )
    d = tmp_path / "D2"
    table.save_to_disk(str(d))

    summary, out = run(tmp_path, [a, b, c, d])
    assert captions_of(out) == {
        "x.png": "x from A",
        "y.png": "y from A",
        "B-x.png": "x from B",
        "B-Y.jpg": "y from B",  # Y.jpg would share A's y.txt (and Y.txt is y.txt on macOS and Windows)
        "C-x.png": "x from C",
        "D2-x.png": "x from D row 0",
        "D2-x-2.png": "row 1",
    }
    assert (out / "x.png").read_bytes() == (a / "x.png").read_bytes()
    assert (out / "B-x.png").read_bytes() == (b / "x.png").read_bytes()
    assert (out / "D2-x-2.png").read_bytes() == encoded(7)
    assert ("B", "Y.jpg", "B-Y.jpg") in summary.renamed and len(summary.renamed) == 5

    # Other formats key captions by the whole file name: there Y.jpg and y.png do not clash, but names that
    # differ only in letter case still do (one file on macOS and Windows).
    e = make(tmp_path / "E", "sidecar", {"y.JPG": (8, "y from E")})
    _, out = run(tmp_path, [a, b, e], out="jsonl-out", format="jsonl")
    assert captions_of(out) == {
        "x.png": "x from A",
        "y.png": "y from A",
        "B-x.png": "x from B",
        "Y.jpg": "y from B",
        "E-y.JPG": "y from E",
    }


# --- sampling ----------------------------------------------------------------------------------------------


def test_sample_is_seeded_and_per_source(tmp_path):
    a = make(tmp_path / "A", "sidecar", {f"a{i}.png": (i, f"a{i}") for i in range(8)})
    b = make(tmp_path / "B", "sidecar", {f"b{i}.png": (20 + i, f"b{i}") for i in range(5)})

    def sampled(out: str, sources: list[Path], seed: int = 0) -> dict[str, set[str]]:
        summary, _ = run(tmp_path, sources, out=out, sample=3, seed=seed)
        assert all((s.sampled, s.written) == (3, 3) for s in summary.sources)
        assert [s.read for s in summary.sources] == [{a: 8, b: 5}[source] for source in sources]
        by_source: dict[str, set[str]] = {}
        for row in manifest(tmp_path / out):
            by_source.setdefault(row["source"], set()).add(row["original"])
        return by_source

    first = sampled("one", [a, b])
    assert sampled("two", [a, b]) == first
    assert sampled("b-alone", [b]) == {"B": first["B"]}  # a source's sample does not depend on the others
    other_seeds = [sampled(f"seed{seed}", [a, b], seed)["A"] for seed in (1, 2, 3)]
    assert any(s != first["A"] for s in other_seeds)


# --- links -------------------------------------------------------------------------------------------------


def test_link_makes_hard_links_and_copies_where_it_cannot(tmp_path, monkeypatch):
    a = make(tmp_path / "A", "sidecar", {"a.png": (1, "one"), "b.png": (2, "two")})
    summary, out = run(tmp_path, [a], out="linked", link=True)
    assert (summary.linked, summary.copied) == (2, 0)
    for name in ("a.png", "b.png"):
        assert os.stat(out / name).st_ino == os.stat(a / name).st_ino
    assert captions_of(out) == {"a.png": "one", "b.png": "two"}

    summary, out = run(tmp_path, [a], out="copied")
    assert (summary.linked, summary.copied) == (0, 2)
    assert os.stat(out / "a.png").st_ino != os.stat(a / "a.png").st_ino

    def cross_device(src, dst, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    summary, out = run(tmp_path, [a], out="fallback", link=True)
    assert (summary.linked, summary.copied) == (0, 2)
    assert (out / "a.png").read_bytes() == (a / "a.png").read_bytes()
    assert os.stat(out / "a.png").st_ino != os.stat(a / "a.png").st_ino


# --- unreadable images -------------------------------------------------------------------------------------


def test_unreadable_images_are_skipped_and_listed(tmp_path):
    a = make(
        tmp_path / "A",
        "sidecar",
        {
            "good.png": (1, "fine"),
            "bad.png": (b"not an image at all", "lost"),
            "cut.png": (encoded(2)[:60], "x"),
        },
    )
    import datasets

    datasets.Dataset.from_dict({"image": [b"\x89PNG garbage"], "text": ["row"]}).save_to_disk(
        str(tmp_path / "H")
    )
    summary, out = run(tmp_path, [a, tmp_path / "H"], image_column="image")

    assert captions_of(out) == {"good.png": "fine"}
    assert sorted((u.source, u.original) for u in summary.unreadable) == [
        ("A", "bad.png"),
        ("A", "cut.png"),
        ("H", "[0]"),
    ]
    assert all(u.reason for u in summary.unreadable)
    assert [s.unreadable for s in summary.sources] == [2, 1]
    rows = {r["original"]: r for r in manifest(out)}
    assert rows["bad.png"]["dropped"] == "unreadable" and rows["bad.png"]["file"] is None
    assert rows["bad.png"]["sha256"] == sha(a / "bad.png")
    assert "skipped A:bad.png" in summary.describe()


# --- --to-hub ----------------------------------------------------------------------------------------------


def test_to_hub_offline_is_refused_in_one_line_before_out_is_made(tmp_path, monkeypatch):
    a = make(tmp_path / "A", "sidecar", {"a.png": (1, "one")})
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ValueError, match="offline") as caught:
        run(tmp_path, [a], out="new/out", to_hub="me/merged")  # conftest sets HF_HUB_OFFLINE=1
    assert "\n" not in str(caught.value)
    assert sorted(os.listdir(tmp_path)) == before  # neither OUT, its parent nor a staging folder

    import socket

    def unreachable(*args, **kwargs):
        raise OSError(errno.ENETUNREACH, "Network is unreachable")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(socket, "create_connection", unreachable)
    with pytest.raises(ValueError, match="cannot reach") as caught:
        run(tmp_path, [a], out="new/out", to_hub="me/merged")
    assert "\n" not in str(caught.value)
    assert sorted(os.listdir(tmp_path)) == before
    with pytest.raises(ValueError, match="org/name"):
        run(tmp_path, [a], to_hub="not an id")


# --- OUT ---------------------------------------------------------------------------------------------------


def test_rerun_is_refused_without_overwrite_and_replaces_only_a_merge(tmp_path, monkeypatch):
    a = make(tmp_path / "A", "sidecar", {"a.png": (1, "one")})
    b = make(tmp_path / "B", "sidecar", {"b.png": (2, "two")})
    run(tmp_path, [a, b])
    out = tmp_path / "out"
    written = (out / MANIFEST_FILE).read_bytes()

    with pytest.raises(ValueError, match="--overwrite"):
        run(tmp_path, [a])
    assert (out / MANIFEST_FILE).read_bytes() == written and (out / "b.png").is_file()

    # A run that fails half-way leaves the earlier merge as it was, and no staging folder.
    import loracap.merge as merge_module

    def broken(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    with monkeypatch.context() as m:
        m.setattr(merge_module, "_write_manifest", broken)
        with pytest.raises(OSError):
            run(tmp_path, [a], overwrite=True)
    assert (out / MANIFEST_FILE).read_bytes() == written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["A", "B", "out"]

    run(tmp_path, [a], overwrite=True)
    assert captions_of(out) == {"a.png": "one"} and not (out / "b.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["A", "B", "out"]

    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="never deletes"):
        run(tmp_path, [a], out="mine", overwrite=True)
    assert (other / "notes.txt").read_text() == "keep me"

    (tmp_path / "empty").mkdir()
    run(tmp_path, [a], out="empty")  # an empty folder is fine
    assert captions_of(tmp_path / "empty") == {"a.png": "one"}

    with pytest.raises(ValueError, match="inside one another"):
        run(tmp_path, [a], out="A/merged")
    with pytest.raises(FileNotFoundError):
        run(tmp_path, [tmp_path / "missing"], out="x")
    assert not (tmp_path / "x").exists()


def test_saved_dataset_dict_every_split_and_column_checks(tmp_path):
    import datasets

    table = {"image": [picture(1), picture(2)], "text": ["one", "two"]}
    other = {"image": [picture(3), picture(4)], "text": ["three", "four"]}
    both = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict(table), "test": datasets.Dataset.from_dict(other)}
    )
    both.save_to_disk(str(tmp_path / "dd"))
    summary, out = run(tmp_path, [tmp_path / "dd"], format="jsonl")
    assert captions_of(out) == {
        "dd-train-0.png": "one",
        "dd-train-1.png": "two",
        "dd-test-0.png": "three",
        "dd-test-1.png": "four",
    }
    assert {r["file"]: r["original"] for r in manifest(out)}["dd-test-1.png"] == "test[1]"

    for settings, message in (
        ({"caption_column": "words"}, "no caption column 'words'"),
        ({"image_column": "img"}, "no image column 'img'"),
    ):
        with pytest.raises(ValueError, match=message):
            run(tmp_path, [tmp_path / "dd"], out="refused", **settings)
        assert not (tmp_path / "refused").exists()


def test_to_hub_pushes_what_imagefolder_would_load(tmp_path, monkeypatch):
    import datasets

    import loracap.merge as merge_module

    pushed = {}
    monkeypatch.setattr(merge_module, "_check_hub", lambda repo_id: None)  # the network is checked above
    monkeypatch.setattr(
        datasets.DatasetDict, "push_to_hub", lambda self, repo_id: pushed.update({repo_id: self})
    )
    sources, expected = ten_images(tmp_path)
    summary, out = run(tmp_path, sources, format="sidecar", split="0.8,0.2", to_hub="me/merged")
    dataset = pushed["me/merged"]
    assert summary.pushed == "me/merged" and {k: len(v) for k, v in dataset.items()} == summary.splits
    rows = {
        Path(row["image"]["path"]).name: (row["text"], row["source"])
        for split in dataset.values()
        for row in split.cast_column("image", datasets.Image(decode=False))
    }
    assert rows == {name: (text, name[0].upper()) for name, text in expected.items()}
