import json
import os
import time
from pathlib import Path

import pytest
from PIL import Image

from loracap import files as atomic_module
from loracap.dataset import (
    JsonlStore,
    KohyaJsonStore,
    open_store,
    sidecar_collisions,
)
from loracap.dataset.jsonl import is_split_folder, metadata_files, split_of
from loracap.dataset.sidecar import UnreadableCaption
from loracap.files import atomic_write_text


def make_images(root: Path, *names: str) -> list[Path]:
    paths = []
    for i, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4), (i * 40, 0, 0)).save(path)
        paths.append(path)
    return paths


def temp_files(root: Path) -> list[Path]:
    return list(root.rglob(".loracap-*.tmp"))


# --- atomic writes ------------------------------------------------------------------------------------


def test_atomic_write_text_is_utf8_lf_without_bom(tmp_path):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "\ufeffcafé, 猫\r\nline two\rthree")
    assert path.read_bytes() == "café, 猫\nline two\nthree".encode()
    assert temp_files(tmp_path) == []


def test_failed_replace_keeps_old_caption_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "a.txt"
    path.write_text("old caption", encoding="utf-8")

    def broken_replace(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(atomic_module.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk on fire"):
        atomic_write_text(path, "new caption")
    assert path.read_text(encoding="utf-8") == "old caption"
    assert temp_files(tmp_path) == []


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_new_files_follow_umask_and_rewrites_keep_mode(tmp_path):
    new = tmp_path / "new.txt"
    atomic_write_text(new, "x")
    umask = os.umask(0)
    os.umask(umask)
    assert new.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    kept = tmp_path / "kept.txt"
    kept.write_text("x")
    kept.chmod(0o640)
    atomic_write_text(kept, "y")
    assert kept.stat().st_mode & 0o777 == 0o640


# --- sidecar ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ext", "expected"), [(".txt", "a.txt"), (".caption", "a.caption"), ("caption", "a.caption")]
)
def test_sidecar_written_next_to_image(tmp_path, ext, expected):
    (image,) = make_images(tmp_path, "sub/a.png")
    store = open_store("sidecar", tmp_path, ext=ext)
    store.write(image, "  ohwx woman, café in Zürich, 猫  \n")
    caption = tmp_path / "sub" / expected
    assert caption.read_bytes() == "ohwx woman, café in Zürich, 猫".encode()
    assert store.existing(image) == "ohwx woman, café in Zürich, 猫"
    assert store.target(image) == f"sub/{expected}"
    assert temp_files(tmp_path) == []
    store.close()
    store.close()


def test_sidecar_existing(tmp_path):
    a, b, c, d, e = make_images(tmp_path, "a.png", "b.png", "c.png", "d.png", "e.png")
    store = open_store("sidecar", tmp_path)
    assert store.existing(a) is None  # no file
    (tmp_path / "b.txt").write_text(" \n\t ")
    assert store.existing(b) is None  # only whitespace: treated as missing
    (tmp_path / "c.txt").write_bytes("\ufeffbom caption\n".encode())
    assert store.existing(c) == "bom caption"
    (tmp_path / "d.txt").write_bytes("utf-16 caption é".encode("utf-16"))  # with BOM
    assert store.existing(d) == "utf-16 caption é"
    # Undecodable bytes are not "no caption" (to be overwritten as if missing) nor text to merge with.
    (tmp_path / "e.txt").write_bytes(b"caf\xe9 latin-1")
    with pytest.raises(UnreadableCaption, match="not utf-8 text"):
        store.existing(e)


def test_sidecar_keeps_old_caption_when_replace_fails(tmp_path, monkeypatch):
    (image,) = make_images(tmp_path, "a.png")
    store = open_store("sidecar", tmp_path)
    store.write(image, "old")

    def broken_replace(src, dst):
        raise OSError("boom")

    monkeypatch.setattr(atomic_module.os, "replace", broken_replace)
    with pytest.raises(OSError):
        store.write(image, "new")
    assert store.existing(image) == "old"
    assert temp_files(tmp_path) == []


def deny_writes_in(monkeypatch, folder: Path) -> None:
    """Make `folder` behave as read-only for the atomic writer, also when the tests run as root."""
    real_open = os.open

    def guarded_open(path, flags, *args, **kwargs):
        if Path(path).parent == folder and flags & os.O_CREAT:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(atomic_module.os, "open", guarded_open)


def test_sidecar_read_only_folder_raises_oserror_and_store_stays_usable(tmp_path, monkeypatch):
    a, b = make_images(tmp_path, "locked/a.png", "b.png")
    store = open_store("sidecar", tmp_path)
    deny_writes_in(monkeypatch, tmp_path / "locked")
    with pytest.raises(OSError):
        store.write(a, "x")
    store.write(b, "y")
    assert store.existing(b) == "y"
    assert store.existing(a) is None


@pytest.mark.parametrize("ext", [".png", "jpg", "", ".", "../x", ".a.b"])
def test_sidecar_rejects_unsafe_extensions(tmp_path, ext):
    with pytest.raises(ValueError):
        open_store("sidecar", tmp_path, ext=ext)


def test_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="sidecar, jsonl, kohya-json"):
        open_store("csv", tmp_path)


# --- jsonl --------------------------------------------------------------------------------------------


def test_jsonl_loads_with_datasets_imagefolder(tmp_path):
    datasets = pytest.importorskip("datasets")
    root = tmp_path / "data"
    images = make_images(root, "a.png", "b.png", "sub/c.png")
    texts = ["ohwx woman, a cat", "A café in Zürich, 猫", "a dog in a subfolder"]
    with open_store("jsonl", root) as store:
        for image, text in zip(images, texts, strict=True):
            store.write(image, text)
    assert temp_files(root) == []
    ds = datasets.load_dataset(
        "imagefolder", data_dir=str(root), split="train", cache_dir=str(tmp_path / "hf")
    )
    # Rows follow the metadata file, which lists images in the order they were captioned.
    files = [Path(image.filename).relative_to(root).as_posix() for image in ds["image"]]
    assert files == ["a.png", "b.png", "sub/c.png"]
    assert ds["text"] == texts


def test_jsonl_records_and_reopen(tmp_path):
    a, b = make_images(tmp_path, "a.png", "sub/b.png")
    store = open_store("jsonl", tmp_path, flush_interval_s=3600)
    store.write(a, "first")
    store.write(b, "second ü")
    assert not (tmp_path / "metadata.jsonl").exists()  # buffered until the interval or close
    store.close()
    lines = (tmp_path / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    assert lines == [
        '{"file_name": "a.png", "text": "first"}',
        '{"file_name": "sub/b.png", "text": "second ü"}',
    ]
    reopened = open_store("jsonl", tmp_path)
    assert reopened.existing(a) == "first"
    assert reopened.existing(b) == "second ü"
    assert reopened.target(a) == "metadata.jsonl"


def test_jsonl_keeps_extra_fields_and_order(tmp_path):
    a, b, c = make_images(tmp_path, "a.png", "b.png", "c.png")
    (tmp_path / "metadata.jsonl").write_text(
        '{"score": 7, "file_name": "b.png", "text": "old", "source": "web"}\n'
        '{"file_name": "./a.png", "text": "  "}\n',
        encoding="utf-8",
    )
    with open_store("jsonl", tmp_path) as store:
        assert store.existing(b) == "old"
        assert store.existing(a) is None  # whitespace-only text counts as missing
        store.write(b, "new")
        store.write(a, "a caption")
        store.write(c, "c caption")
    records = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert records == [
        {"score": 7, "file_name": "b.png", "text": "new", "source": "web"},
        {"file_name": "./a.png", "text": "a caption"},
        {"file_name": "c.png", "text": "c caption"},
    ]
    assert list(records[0]) == ["score", "file_name", "text", "source"]


def test_jsonl_corrupt_trailing_line_loses_nothing_else(tmp_path):
    a, b, c = make_images(tmp_path, "a.png", "b.png", "c.png")
    metadata = tmp_path / "metadata.jsonl"
    original = '{"file_name": "a.png", "text": "kept a"}\n{"file_name": "b.png", "text": "kept b"}\n{"file_na'
    metadata.write_text(original, encoding="utf-8")
    with pytest.warns(UserWarning, match="line 3"):
        store = open_store("jsonl", tmp_path)
    assert isinstance(store, JsonlStore)
    assert store.files[""].corrupt_lines == [(3, '{"file_na')]
    assert store.existing(a) == "kept a"
    assert store.existing(c) is None
    store.write(c, "new c")
    store.close()
    records = [json.loads(line) for line in metadata.read_text().splitlines()]
    assert [r["text"] for r in records] == ["kept a", "kept b", "new c"]
    (backup,) = tmp_path.glob("metadata.jsonl.*.bak")  # the dropped line is not lost
    assert backup.read_text(encoding="utf-8") == original


def test_jsonl_flushes_after_interval(tmp_path):
    a, b = make_images(tmp_path, "a.png", "b.png")
    store = open_store("jsonl", tmp_path, flush_interval_s=0.05)
    store.write(a, "a")
    time.sleep(0.06)
    store.write(b, "b")  # the interval has passed: this write persists both
    assert len((tmp_path / "metadata.jsonl").read_text().splitlines()) == 2
    store.close()


def test_jsonl_custom_file_and_outside_image(tmp_path):
    (a,) = make_images(tmp_path, "data/a.png")
    store = open_store("jsonl", tmp_path / "data", metadata_file=tmp_path / "data" / "captions.jsonl")
    store.write(a, "x")
    store.close()
    assert json.loads((tmp_path / "data" / "captions.jsonl").read_text()) == {
        "file_name": "a.png",
        "text": "x",
    }
    with pytest.raises(ValueError, match="not inside"):
        store.existing(tmp_path / "elsewhere.png")
    with pytest.raises(ValueError, match="closed"):
        store.write(a, "after close")


def test_jsonl_read_only_folder_keeps_records_for_a_later_flush(tmp_path, monkeypatch):
    (a,) = make_images(tmp_path, "a.png")
    store = open_store("jsonl", tmp_path, flush_interval_s=0)
    with monkeypatch.context() as patch:
        deny_writes_in(patch, tmp_path)
        with pytest.raises(OSError):
            store.write(a, "x")
    assert store.existing(a) == "x"
    store.close()  # the record was kept in memory and is written now
    assert open_store("jsonl", tmp_path).existing(a) == "x"


def test_split_folders_as_datasets_names_them():
    # datasets/data_files.py: SPLIT_KEYWORDS, joined to other words by "-._ 0-9", case-sensitive.
    splits = [
        "train",
        "training",
        "test",
        "testing",
        "eval",
        "evaluation",
        "validation",
        "valid",
        "dev",
        "val",
    ]
    splits += ["train-2024", "my_val", "2024 test", "cats.train.v2"]
    for name in splits:
        assert is_split_folder(name), name
    for name in ["Train", "TEST", "contest", "trainer", "retrain", "evals", "devices", ".train", "sub"]:
        assert not is_split_folder(name), name
    assert split_of("train/sub/a.jpg") == ("train", "sub/a.jpg")
    assert split_of("cats/test/train/a.jpg") == ("cats/test", "train/a.jpg")  # the outermost
    assert split_of("./sub/a.jpg") == ("", "sub/a.jpg")
    assert split_of("train.jpg") == ("", "train.jpg")  # a file, not a folder
    assert split_of("../train/a.jpg") == ("", "../train/a.jpg")  # outside the dataset: not its split
    assert split_of("/data/train/a.jpg") == ("", "/data/train/a.jpg")


def test_jsonl_one_file_per_split_folder(tmp_path):
    images = make_images(tmp_path, "train/a.png", "train/sub/b.png", "test/c.png", "my_val/d.png", "e.png")
    with open_store("jsonl", tmp_path) as store:
        for image in images:
            store.write(image, image.stem)
        assert [store.target(p) for p in images[::2]] == [
            "train/metadata.jsonl",
            "test/metadata.jsonl",
            "metadata.jsonl",
        ]

    def records(path: Path) -> list[dict]:
        return [json.loads(line) for line in path.read_text().splitlines()]

    assert records(tmp_path / "train/metadata.jsonl") == [
        {"file_name": "a.png", "text": "a"},
        {"file_name": "sub/b.png", "text": "b"},
    ]
    assert records(tmp_path / "test/metadata.jsonl") == [{"file_name": "c.png", "text": "c"}]
    assert records(tmp_path / "my_val/metadata.jsonl") == [{"file_name": "d.png", "text": "d"}]
    assert records(tmp_path / "metadata.jsonl") == [{"file_name": "e.png", "text": "e"}]
    assert metadata_files(tmp_path) == [
        tmp_path / "metadata.jsonl",
        *(tmp_path / name / "metadata.jsonl" for name in ("my_val", "test", "train")),
    ]
    store = open_store("jsonl", tmp_path)
    assert [store.existing(p) for p in images] == ["a", "b", "c", "d", "e"]


def test_jsonl_root_records_of_split_images_move_to_the_split_file(tmp_path):
    a, c = make_images(tmp_path, "train/a.png", "test/c.png")
    root_file = tmp_path / "metadata.jsonl"
    old = [
        {"file_name": "train/a.png", "text": "old a", "score": 7},
        {"file_name": "./test/c.png", "text": "old c"},
    ]
    root_file.write_text("".join(json.dumps(r) + "\n" for r in old))
    (tmp_path / "test/metadata.jsonl").write_text(
        json.dumps({"file_name": "c.png", "text": "split c"}) + "\n"
    )
    store = open_store("jsonl", tmp_path)
    assert (store.existing(a), store.existing(c)) == ("old a", "split c")  # the split's own record wins
    store.close()  # nothing written, yet the records move to where imagefolder reads them
    assert json.loads((tmp_path / "train/metadata.jsonl").read_text()) == {
        "file_name": "a.png",
        "text": "old a",
        "score": 7,
    }
    assert json.loads((tmp_path / "test/metadata.jsonl").read_text()) == {
        "file_name": "c.png",
        "text": "split c",
    }
    assert not root_file.exists()  # it held only records of split images


def test_jsonl_named_metadata_file_stays_one_file(tmp_path):
    a, b = make_images(tmp_path, "train/a.png", "b.png")
    with open_store("jsonl", tmp_path, metadata_file=tmp_path / "metadata.jsonl") as store:
        store.write(a, "a")
        store.write(b, "b")
    assert not (tmp_path / "train/metadata.jsonl").exists()
    assert [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()] == [
        {"file_name": "train/a.png", "text": "a"},
        {"file_name": "b.png", "text": "b"},
    ]


# --- kohya-json ---------------------------------------------------------------------------------------


def test_kohya_json_caption_and_tags(tmp_path):
    a, b = make_images(tmp_path, "a.png", "sub/b.jpg")
    with open_store("kohya-json", tmp_path) as store:
        store.write(a, "a woman, café")
        store.write(b, "a dog")
        assert store.target(a) == "meta_cap.json"
    with open_store("kohya-json", tmp_path, tags=True) as store:
        assert store.existing(a) is None  # tags and caption are separate fields
        store.write(a, "1girl, solo")
    text = (tmp_path / "meta_cap.json").read_text(encoding="utf-8")
    assert "café" in text and f"\n  {json.dumps(str(a))}: {{" in text  # ensure_ascii=False, indent 2
    # Keys are absolute paths with the extension: see test_trainer_formats.py for why.
    assert json.loads(text) == {
        str(a): {"caption": "a woman, café", "tags": "1girl, solo"},
        str(b): {"caption": "a dog"},
    }
    store = open_store("kohya-json", tmp_path)
    assert isinstance(store, KohyaJsonStore)
    assert store.existing(a) == "a woman, café"
    assert store.existing(b) == "a dog"


def test_kohya_json_keeps_other_fields(tmp_path):
    (a,) = make_images(tmp_path, "a.png")
    meta = tmp_path / "meta_cap.json"
    meta.write_text(
        json.dumps({"a": {"tags": "x", "train_resolution": [512, 512]}, "gone": {"caption": "y"}})
    )
    with open_store("kohya-json", tmp_path) as store:
        store.write(a, "new caption")
    assert json.loads(meta.read_text()) == {
        str(a): {"tags": "x", "train_resolution": [512, 512], "caption": "new caption"},
        "gone": {"caption": "y"},  # names no image: left as it is
    }


def test_kohya_json_reads_old_keys_and_rewrites_them(tmp_path):
    a_jpg, a_png, b, c = make_images(tmp_path, "a.jpg", "a.png", "sub/b.jpg", "sub/c.png")
    meta = tmp_path / "meta_cap.json"
    old = {
        "a": {"caption": "old a"},  # a.jpg and a.png: sd-scripts v0.9.x took the first in sorted order
        "sub/b": {"caption": "old b", "train_resolution": [512, 512]},
        "sub/c.png": {"tags": "old c"},  # relative with extension: v0.10.x reads it, v0.9.x does not
        str(c): {"caption": "new c"},
        "gone": {"caption": "y"},
    }
    meta.write_text(json.dumps(old))
    store = open_store("kohya-json", tmp_path)
    assert [store.existing(p) for p in (a_jpg, a_png, b, c)] == ["old a", None, "old b", "new c"]
    store.close()  # nothing written, yet the file gets the keys sd-scripts v0.10.x can load
    assert json.loads(meta.read_text()) == {
        str(a_jpg): {"caption": "old a"},
        str(b): {"caption": "old b", "train_resolution": [512, 512]},
        str(c): {"tags": "old c", "caption": "new c"},
        "gone": {"caption": "y"},
    }


def test_kohya_json_keys_do_not_depend_on_how_the_folder_is_spelled(tmp_path):
    (a,) = make_images(tmp_path / "real", "a.png")
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "real", target_is_directory=True)
    with open_store("kohya-json", link) as store:
        store.write(link / "a.png", "x")
    assert list(json.loads((link / "meta_cap.json").read_text())) == [str(a.resolve())]
    assert open_store("kohya-json", tmp_path / "real").existing(a) == "x"
    meta = tmp_path / "real/meta_cap.json"
    meta.write_text(json.dumps({str(link / "a.png"): {"caption": "y"}}))  # as --full_path may spell it
    assert open_store("kohya-json", tmp_path / "real").existing(a) == "y"


def test_kohya_json_images_sharing_a_stem_keep_their_own_captions(tmp_path):
    a_jpg, a_png = make_images(tmp_path, "a.jpg", "a.png")
    with open_store("kohya-json", tmp_path) as store:
        store.write(a_jpg, "jpg")
        store.write(a_png, "png")
    store = open_store("kohya-json", tmp_path)
    assert (store.existing(a_jpg), store.existing(a_png)) == ("jpg", "png")


def test_kohya_json_refuses_corrupt_file(tmp_path):
    meta = tmp_path / "meta_cap.json"
    meta.write_text('{"a": {"caption": "x"')
    with pytest.raises(ValueError, match="not valid JSON"):
        open_store("kohya-json", tmp_path)
    assert meta.read_text() == '{"a": {"caption": "x"'


# --- collisions ---------------------------------------------------------------------------------------


def test_sidecar_collisions(tmp_path):
    images = [tmp_path / n for n in ("a.jpg", "a.png", "b.jpg", "sub/a.jpg", "C.JPG", "c.webp")]
    images.append(tmp_path / "a.jpg")  # the same image twice is not a collision
    found = sidecar_collisions(images)
    # C.txt and c.txt are two files on Linux but one on Windows/macOS: reported.
    assert found == {
        tmp_path / "a.txt": [tmp_path / "a.jpg", tmp_path / "a.png"],
        tmp_path / "C.txt": [tmp_path / "C.JPG", tmp_path / "c.webp"],
    }
    assert list(sidecar_collisions(images, "caption")) == [tmp_path / "a.caption", tmp_path / "C.caption"]


def test_stores_never_leave_temp_files(tmp_path):
    images = make_images(tmp_path, "a.png", "sub/b.png")
    for fmt in ("sidecar", "jsonl", "kohya-json"):
        with open_store(fmt, tmp_path, flush_interval_s=0) as store:
            for image in images:
                store.write(image, f"{fmt} caption")
            assert [store.existing(image) for image in images] == [f"{fmt} caption"] * 2
    assert temp_files(tmp_path) == []
