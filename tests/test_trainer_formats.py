"""The caption files loracap writes, read the way the trainers read them.

sd-scripts' fine-tuning lookup is mirrored below in two small functions (cited by file and commit; no
sd-scripts code is vendored); HF datasets' imagefolder is run itself. The trigger rule is checked through
`caption_folder` with a tiny Florence-2, for every `--existing` policy.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import pytest
from conftest import write_images

import loracap
from loracap.dataset import read_dataset

GENERATION = loracap.GenerationSettings(min_new_tokens=2, max_new_tokens=6)

# kohya-ss/sd-scripts v0.9.1 (8f4ee8f), library/train_util.py: IMAGE_EXTENSIONS (line 109, without the
# optional avif/jxl plugins).
SD_SCRIPTS_V09_EXTENSIONS = [
    ".png",
    ".jpg",
    ".jpeg",
    ".webp",
    ".bmp",
    ".PNG",
    ".JPG",
    ".JPEG",
    ".WEBP",
    ".BMP",
]


def sd_scripts_v09_image(key: str, train_data_dir: str) -> str | None:
    """The image sd-scripts v0.9.x trains for a meta_cap.json key (None: it stops with "no image").

    kohya-ss/sd-scripts v0.9.1 (8f4ee8f), library/train_util.py, FineTuningDataset.__init__ (lines
    1806-1828): an existing path is used as is, else `glob_images(image_dir, key)` (lines 2389-2398), the
    sorted glob of `<image_dir>/<key><ext>`; the .npz fallbacks after it need cached latents.
    """
    if os.path.exists(key):
        return key
    paths = set()
    for ext in SD_SCRIPTS_V09_EXTENSIONS:
        paths.update(glob.glob(glob.escape(os.path.join(train_data_dir, key + ext))))
    return sorted(paths)[0] if paths else None


def sd_scripts_v010_image(key: str, train_data_dir: str) -> str | None:
    """The image sd-scripts v0.10.x trains for a key (None: "failed to get image size", then bucketing fails).

    kohya-ss/sd-scripts c6bc632 ("fix: metadata dataset degradation and make it work", in v0.10.0 966e9d7,
    v0.10.1 ae72efb and main 48d368f unchanged), library/train_util.py, FineTuningDataset.__init__ (lines
    2271-2284): a relative key is joined to image_dir, an absolute one is used as is; no glob, no check.
    """
    path = key if os.path.isabs(key) else os.path.join(train_data_dir, key)
    return path if os.path.isfile(path) else None


def assert_sd_scripts_trains_each_image(meta: dict, images: list[Path], train_data_dir: Path) -> None:
    for lookup in (sd_scripts_v09_image, sd_scripts_v010_image):
        found = {lookup(key, str(train_data_dir)) for key in meta}
        assert None not in found, (lookup.__name__, sorted(meta))
        assert sorted(Path(p).resolve() for p in found) == sorted(p.resolve() for p in images), (
            lookup.__name__
        )


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """Run from another folder: sd-scripts v0.9.x checks a key as a path relative to where it runs."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return tmp_path / "data"


@pytest.fixture(scope="module")
def florence2(tiny_model):
    from loracap.backends import load_backend

    return load_backend(str(tiny_model("florence2")), device="cpu")


def caption(folder: Path, backend, **kwargs) -> loracap.RunSummary:
    return loracap.caption_folder(folder, backend=backend, generation=GENERATION, progress=False, **kwargs)


# --- sd-scripts fine-tuning: meta_cap.json ------------------------------------------------------------


def test_kohya_json_loads_in_sd_scripts_v09_and_v010(elsewhere, florence2):
    data = elsewhere
    images = write_images(data, ["a.jpg", "sub/b.webp", "sub/deeper/c.JPG"])
    summary = caption(data, florence2, format="kohya-json")
    assert (summary.captioned, summary.failed) == (3, 0)
    meta = json.loads((data / "meta_cap.json").read_text(encoding="utf-8"))
    assert len(meta) == 3 and all(entry["caption"] for entry in meta.values())
    assert_sd_scripts_trains_each_image(meta, images, data)
    assert sorted(p for p, _ in read_dataset(data).pairs) == sorted(images)  # loracap report reads it


def test_kohya_json_images_sharing_a_stem_are_both_captioned(elsewhere, florence2):
    data = elsewhere
    images = write_images(data, ["a.jpg", "a.png"])  # once one key "a", so both were refused
    summary = caption(data, florence2, format="kohya-json")
    assert (summary.captioned, summary.failed) == (2, 0)
    meta = json.loads((data / "meta_cap.json").read_text(encoding="utf-8"))
    assert_sd_scripts_trains_each_image(meta, images, data)


def test_old_kohya_json_is_kept_and_rekeyed_on_the_next_run(elsewhere, florence2):
    data = elsewhere
    a, b = write_images(data, ["a.jpg", "sub/b.png"])
    old = {"a": {"caption": "old a", "train_resolution": [48, 40]}, "sub/b": {"caption": "old b"}}
    (data / "meta_cap.json").write_text(json.dumps(old), encoding="utf-8")
    assert [c for _, c in read_dataset(data).pairs] == ["old a", "old b"]

    summary = caption(data, florence2, format="kohya-json")  # --existing skip: nothing to caption
    assert (summary.skipped, summary.captioned) == (2, 0)
    meta = json.loads((data / "meta_cap.json").read_text(encoding="utf-8"))
    assert [entry["caption"] for entry in meta.values()] == ["old a", "old b"]
    assert meta[str(a)]["train_resolution"] == [48, 40]
    assert_sd_scripts_trains_each_image(meta, [a, b], data)


def test_report_lists_the_kohya_keys_sd_scripts_cannot_find(tmp_path):
    data = tmp_path / "data"
    a, b = write_images(data, ["a.jpg", "sub/b.png"])
    meta = {str(a): {"caption": "a"}, "sub/b": {"caption": "b"}, "/moved/away/c.jpg": {"caption": "c"}}
    meta["gone"] = {"caption": "d"}
    (data / "meta_cap.json").write_text(json.dumps(meta), encoding="utf-8")
    ds = read_dataset(data)
    assert (ds.layout, ds.pairs, ds.missing) == ("kohya-json", [(a, "a"), (b, "b")], [])
    assert ds.orphans == ["/moved/away/c.jpg", "gone"]


# --- datasets imagefolder: metadata.jsonl -------------------------------------------------------------


def load_imagefolder(folder: Path) -> dict[str, list[str | None]]:
    """{split: texts} as `datasets.load_dataset("imagefolder", data_dir=folder)` gives them."""
    datasets = pytest.importorskip("datasets")
    loaded = datasets.load_dataset("imagefolder", data_dir=str(folder), cache_dir=str(folder.parent / "hf"))
    assert all("text" in split.column_names for split in loaded.values()), {
        name: split.column_names for name, split in loaded.items()
    }
    return {name: list(split["text"]) for name, split in loaded.items()}


def test_split_folders_keep_their_captions_in_imagefolder(tmp_path, florence2):
    data = tmp_path / "data"
    write_images(data, ["train/a.jpg", "train/sub/b.jpg", "test/c.jpg", "my_val/d.jpg"])
    summary = caption(data, florence2, format="jsonl")
    assert (summary.captioned, summary.failed) == (4, 0)
    assert not (data / "metadata.jsonl").exists()

    texts = load_imagefolder(data)
    assert {name: len(t) for name, t in texts.items()} == {"train": 2, "test": 1, "validation": 1}
    assert all(t for split in texts.values() for t in split)
    # loracap report / train read the same files back.
    ds = read_dataset(data)
    assert ds.layout == "jsonl" and not ds.missing and not ds.orphans and not ds.problems
    assert sorted(ds.captions) == sorted(t for split in texts.values() for t in split)


def test_old_root_metadata_jsonl_moves_into_the_split_folders(tmp_path, florence2):
    data = tmp_path / "data"
    write_images(data, ["train/a.jpg", "test/c.jpg"])
    old = [{"file_name": "train/a.jpg", "text": "old a"}, {"file_name": "test/c.jpg", "text": "old c"}]
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old), encoding="utf-8")

    summary = caption(data, florence2, format="jsonl")  # --existing skip: nothing to caption
    assert (summary.skipped, summary.captioned) == (2, 0)
    assert load_imagefolder(data) == {"train": ["old a"], "test": ["old c"]}


# --- the trigger, for every --existing policy ---------------------------------------------------------

OLD_TWO_LINES = "old line one\nold line two"
OLD_NAMES_IT = "a photo of ohwx in a park"


@pytest.mark.parametrize("policy", ["skip", "overwrite", "prepend", "append"])
def test_trigger_first_and_once_for_every_existing_policy(tmp_path, florence2, policy):
    data = tmp_path / "data"
    write_images(data, ["a.jpg", "b.jpg", "c.jpg"])
    (data / "a.txt").write_text(OLD_TWO_LINES, encoding="utf-8")
    (data / "b.txt").write_text(OLD_NAMES_IT, encoding="utf-8")
    summary = caption(data, florence2, existing=policy, options=loracap.PostProcess(trigger="ohwx"))
    assert summary.failed == 0
    a, b, c = ((data / f"{n}.txt").read_text(encoding="utf-8") for n in "abc")
    assert c.startswith("ohwx, ") and c.count("ohwx") == 1  # a new caption: first, as its own item

    if policy == "skip":  # captioned images are not touched, trigger or not
        assert (a, b) == (OLD_TWO_LINES, OLD_NAMES_IT)
        return
    for text in (a, b):
        assert text.count("ohwx") == 1 and "\n" not in text, text  # once; one line, as sd-scripts reads
    if policy == "overwrite":
        assert a.startswith("ohwx, ") and b.startswith("ohwx, ") and "old" not in a + b
    elif policy == "append":
        assert a.startswith("ohwx, old line one, old line two, ")
        assert b.startswith(OLD_NAMES_IT + ", ")  # named in the sentence: it stays there
    else:
        assert a.startswith("ohwx, ") and a.endswith("old line one, old line two")
        assert b.endswith(OLD_NAMES_IT) and not b.startswith("ohwx")
