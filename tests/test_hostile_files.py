"""Hostile entries in a dataset folder: each is one file's error, the run goes on, and no caption's bytes
are lost. Runs `loracap caption` in a subprocess with a timeout where a regression would hang."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import GEN_ARGS, write_images

from loracap.cli import main

pytestmark = pytest.mark.skipif(os.name != "posix", reason="FIFOs and symlinks as POSIX has them")


def caption(folder: Path, model: Path, *extra: str) -> int:
    return main(["caption", str(folder), "--model", str(model), *GEN_ARGS, *extra])


def errors(folder: Path) -> dict[str, str]:
    path = folder / "loracap-errors.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return {e["path"]: e["reason"] for e in map(json.loads, lines)}


def test_a_fifo_where_a_caption_belongs_is_an_error_not_a_hang(tmp_path, tiny_model):
    write_images(tmp_path, ["a.png", "b.png"])
    os.mkfifo(tmp_path / "a.txt")  # reading it would wait for a writer forever
    result = subprocess.run(
        [sys.executable, "-m", "loracap", "caption", str(tmp_path), "--model", str(tiny_model("vit-gpt2"))]
        + GEN_ARGS,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr
    assert "1 captioned, 0 skipped (already captioned), 1 failed of 2 images" in result.stderr
    assert "FIFO" in errors(tmp_path)["a.png"]
    assert (tmp_path / "b.txt").read_text().strip()
    assert (tmp_path / "a.txt").is_fifo()  # left as it is


@pytest.mark.parametrize(("fmt", "name"), [("jsonl", "metadata.jsonl"), ("kohya-json", "meta_cap.json")])
def test_a_fifo_named_like_the_metadata_file_is_refused_without_hanging(tmp_path, tiny_model, fmt, name):
    write_images(tmp_path, ["a.png"])
    os.mkfifo(tmp_path / name)
    result = subprocess.run(
        [sys.executable, "-m", "loracap", "caption", str(tmp_path), "--format", fmt]
        + ["--model", str(tiny_model("vit-gpt2")), *GEN_ARGS],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(f"loracap: error: cannot read {tmp_path / name}: a FIFO")
    )


@pytest.mark.parametrize("existing", ["skip", "prepend", "overwrite"])
def test_a_folder_where_a_caption_belongs_is_an_error(tmp_path, tiny_model, existing):
    write_images(tmp_path, ["a.png", "b.png"])
    (tmp_path / "a.txt").mkdir()
    assert caption(tmp_path, tiny_model("vit-gpt2"), "--existing", existing) == 1
    assert "a folder" in errors(tmp_path)["a.png"]
    assert (tmp_path / "a.txt").is_dir() and (tmp_path / "b.txt").read_text().strip()


def test_a_caption_name_too_long_for_the_file_system_is_an_error(tmp_path, tiny_model):
    long_name = "x" * (255 - len(".png")) + ".png"  # the longest name ext4 allows; .caption makes it longer
    write_images(tmp_path, [long_name, "b.png"])
    assert caption(tmp_path, tiny_model("vit-gpt2"), "--ext", ".caption") == 1
    assert "too long" in errors(tmp_path)[long_name]
    assert (tmp_path / "b.caption").read_text().strip()


@pytest.mark.parametrize(
    "old",
    [
        b"\x89PNG\r\n\x1a\n\x00\x00binary",
        "an old caption in UTF-16".encode("utf-16-le"),
        "caf\xe9".encode("latin-1"),
    ],
    ids=["binary", "utf16-without-bom", "latin1"],
)
@pytest.mark.parametrize("existing", ["skip", "prepend", "append"])
def test_a_caption_that_cannot_be_decoded_is_never_rewritten(tmp_path, tiny_model, old, existing):
    write_images(tmp_path, ["a.png", "b.png"])
    (tmp_path / "a.txt").write_bytes(old)
    assert caption(tmp_path, tiny_model("vit-gpt2"), "--existing", existing) == 1
    assert (tmp_path / "a.txt").read_bytes() == old
    assert "not utf-8 text" in errors(tmp_path)["a.png"]
    assert (tmp_path / "b.txt").read_text().strip()


def test_overwrite_replaces_an_undecodable_caption_as_asked(tmp_path, tiny_model):
    write_images(tmp_path, ["a.png"])
    (tmp_path / "a.txt").write_bytes("utf-16 without a BOM".encode("utf-16-le"))
    assert caption(tmp_path, tiny_model("vit-gpt2"), "--existing", "overwrite") == 0
    assert "\0" not in (tmp_path / "a.txt").read_text(encoding="utf-8")


def test_a_caption_symlink_out_of_the_dataset_is_neither_read_nor_written_through(tmp_path, tiny_model):
    data, outside = tmp_path / "data", tmp_path / "private.txt"
    outside.write_text("a secret that must not be copied into the dataset")
    write_images(data, ["a.png", "b.png"])
    (data / "a.txt").symlink_to(outside)
    assert caption(data, tiny_model("vit-gpt2"), "--existing", "prepend") == 1
    assert "outside the dataset folder" in errors(data)["a.png"]
    assert "secret" not in (data / "b.txt").read_text()
    # Overwrite replaces the link itself; the file it pointed to is untouched.
    assert caption(data, tiny_model("vit-gpt2"), "--existing", "overwrite") == 0
    assert not (data / "a.txt").is_symlink() and "secret" not in (data / "a.txt").read_text()
    assert outside.read_text() == "a secret that must not be copied into the dataset"


def test_a_caption_symlink_inside_the_dataset_is_read(tmp_path, tiny_model):
    write_images(tmp_path, ["a.png"])
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "caption.md").write_text("ohwx woman")
    (tmp_path / "a.txt").symlink_to(tmp_path / "shared" / "caption.md")
    assert caption(tmp_path, tiny_model("vit-gpt2"), "--existing", "append") == 0
    assert (tmp_path / "a.txt").read_text().startswith("ohwx woman")


def test_broken_and_looping_image_links_are_counted_and_reported(tmp_path, tiny_model, capsys):
    write_images(tmp_path, ["a.png"])
    (tmp_path / "gone.png").symlink_to(tmp_path / "deleted.png")
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    assert caption(tmp_path, tiny_model("vit-gpt2")) == 1
    assert "1 captioned, 0 skipped (already captioned), 2 failed of 3 images" in capsys.readouterr().err
    reasons = errors(tmp_path)
    assert "broken symbolic link" in reasons["gone.png"] and "symbolic link loop" in reasons["loop.png"]


def no_room_in(monkeypatch, folder: Path, code: int) -> None:
    """New files under `folder` fail as on a full (ENOSPC) or read-only (EROFS) file system, also for root."""
    real_open = os.open

    def guarded_open(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and Path(os.path.abspath(path)).is_relative_to(folder):
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded_open)


def saved_elsewhere(err: str) -> Path:
    line = next(line for line in err.splitlines() if line.startswith("loracap: error: cannot write captions"))
    return Path(line.split(" is in ")[1].split(": copy")[0])


@pytest.mark.parametrize(("fmt", "file"), [("jsonl", "metadata.jsonl"), ("kohya-json", "meta_cap.json")])
def test_a_full_disk_keeps_the_metadata_captions_elsewhere(
    tmp_path, tiny_model, monkeypatch, capsys, fmt, file
):
    data = tmp_path / "data"
    write_images(data, ["a.png", "b.png", "c.png"])
    assert caption(data, tiny_model("vit-gpt2"), "--format", fmt, "--existing", "skip") == 0
    before = (data / file).read_bytes()
    no_room_in(monkeypatch, data, errno.ENOSPC)
    capsys.readouterr()

    again = ["--format", fmt, "--existing", "overwrite", "--suffix", ", second run"]
    assert caption(data, tiny_model("vit-gpt2"), *again) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "No space left on device" in err and "3 captioned" in err
    assert (data / file).read_bytes() == before  # the old file is whole: writes are atomic
    # The whole new file is kept, ready to be copied over the old one.
    rescued = (saved_elsewhere(err) / file).read_text()
    assert rescued.count(", second run") == 3
    assert all(name in rescued for name in ("a.png", "b.png", "c.png"))


def test_a_read_only_folder_stops_at_the_first_sidecar(tmp_path, tiny_model, monkeypatch, capsys):
    data = tmp_path / "data"
    write_images(data, [f"img{i}.png" for i in range(6)])
    no_room_in(monkeypatch, data, errno.EROFS)
    assert caption(data, tiny_model("vit-gpt2"), "--batch-size", "2") == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Read-only file system" in err
    assert "0 captioned, 0 skipped (already captioned), 0 failed of 6 images" in err
    # The one caption in hand when the write failed is kept; the run did not caption the other five.
    assert [p.name for p in saved_elsewhere(err).iterdir()] == ["img0.txt"]
    assert not list(data.glob("*.txt"))
