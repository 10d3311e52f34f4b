"""`loracap caption` end to end on folders, with a tiny Florence-2 built locally."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import GEN_ARGS, write_images
from PIL import Image

import loracap
from loracap.cli import main


def run(folder: Path, model: Path, *extra: str) -> int:
    return main(["caption", str(folder), "--model", str(model), *GEN_ARGS, *extra])


def captions(folder: Path, ext: str = ".txt") -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): p.read_text(encoding="utf-8")
        for p in sorted(folder.rglob(f"*{ext}"))
    }


@pytest.fixture
def dataset(tmp_path):
    write_images(tmp_path, ["a.jpg", "b.PNG", "sub/c.webp", ".hidden/d.jpg", ".e.jpg"])
    return tmp_path


def test_bad_files_are_reported_and_the_rest_captioned(dataset, tiny_model, capsys):
    (dataset / "empty.jpg").write_bytes(b"")
    good = (dataset / "a.jpg").read_bytes()
    (dataset / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (dataset / "notes.png").write_text("not an image")

    assert run(dataset, tiny_model("florence2")) == 1  # some files failed
    assert sorted(captions(dataset)) == ["a.txt", "b.txt", "sub/c.txt"]  # hidden files left alone
    assert all(text.strip() for text in captions(dataset).values())

    errors = [json.loads(line) for line in (dataset / "loracap-errors.jsonl").read_text().splitlines()]
    reasons = {e["path"]: e["reason"] for e in errors}
    assert set(reasons) == {"empty.jpg", "truncated.jpg", "notes.png"}
    assert "empty" in reasons["empty.jpg"] and "truncated" in reasons["truncated.jpg"]
    err = capsys.readouterr().err
    assert "3 captioned, 0 skipped (already captioned), 3 failed of 6 images" in err
    assert "empty.jpg" in err and "loracap-errors.jsonl" in err


def test_rerun_skips_captioned_images_and_policies_apply(dataset, tiny_model, capsys):
    model = tiny_model("florence2")
    (dataset / "a.txt").write_text("hand written caption", encoding="utf-8")
    assert run(dataset, model) == 0
    assert (dataset / "a.txt").read_text() == "hand written caption"  # never overwritten by default
    assert "2 captioned, 1 skipped" in capsys.readouterr().err
    first = captions(dataset)

    assert run(dataset, model) == 0  # a re-run resumes: nothing left to do, model not even loaded
    assert "0 captioned, 3 skipped" in capsys.readouterr().err
    assert captions(dataset) == first
    assert not (dataset / "loracap-errors.jsonl").exists()

    assert run(dataset, model, "--existing", "append", "--keep-boilerplate") == 0
    appended = (dataset / "a.txt").read_text()
    assert appended.startswith("Hand written caption") or appended.startswith("hand written caption")
    assert len(appended) > len("hand written caption")

    (dataset / "a.txt").write_text("old words", encoding="utf-8")
    assert run(dataset, model, "--existing", "prepend") == 0
    assert (dataset / "a.txt").read_text().rstrip().endswith("old words")

    assert run(dataset, model, "--existing", "overwrite") == 0
    assert "old words" not in (dataset / "a.txt").read_text()


def test_tags_mode_puts_the_trigger_first_once(tmp_path, tiny_model):
    model = make_promptgen(tmp_path / "promptgen")
    write_images(tmp_path / "data", ["a.jpg", "b.jpg"])
    assert run(tmp_path / "data", model, "--mode", "tags", "--trigger", "ohwx woman", "--max-tags", "3") == 0
    for text in captions(tmp_path / "data").values():
        tags = [t.strip() for t in text.split(",")]
        assert tags[0] == "ohwx woman" and tags.count("ohwx woman") == 1
        assert len(tags) <= 4  # the trigger plus at most 3 tags


def make_promptgen(folder: Path) -> Path:
    from loracap.testing import make_tiny_model

    return make_tiny_model("florence2-original", folder)


def test_jsonl_and_kohya_formats(dataset, tiny_model):
    model = tiny_model("florence2")
    assert run(dataset, model, "--format", "jsonl") == 0
    records = [json.loads(line) for line in (dataset / "metadata.jsonl").read_text().splitlines()]
    assert sorted(r["file_name"] for r in records) == ["a.jpg", "b.PNG", "sub/c.webp"]
    assert not captions(dataset)  # no sidecars in this format

    assert run(dataset, model, "--format", "kohya-json") == 0
    meta = json.loads((dataset / "meta_cap.json").read_text())
    assert sorted(meta) == ["a", "b", "sub/c"] and all(meta[k]["caption"] for k in meta)


def test_images_sharing_a_stem_are_not_given_one_caption(tmp_path, tiny_model, capsys):
    write_images(tmp_path, ["a.jpg", "a.png", "b.jpg"])
    assert run(tmp_path, tiny_model("florence2")) == 1
    assert sorted(captions(tmp_path)) == ["b.txt"]
    err = capsys.readouterr().err
    assert "a.jpg, a.png would share one caption (a.txt)" in err
    assert run(tmp_path, tiny_model("florence2"), "--format", "kohya-json") == 1
    assert "a.jpg, a.png would share one caption (key 'a')" in capsys.readouterr().err
    # jsonl keys keep the extension, so there both images get their own caption.
    assert run(tmp_path, tiny_model("florence2"), "--format", "jsonl") == 0


def test_usage_errors_exit_2_with_one_line(tmp_path, tiny_model, capsys):
    blip = tiny_model("blip")
    capsys.readouterr()
    assert main(["caption", str(tmp_path / "missing"), "--model", str(blip)]) == 2
    write_images(tmp_path, ["a.jpg"])
    assert run(tmp_path, blip, "--mode", "tags") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("loracap")]
    assert len(err) == 2  # one line per failed command
    assert err[0].startswith("loracap: error:") and "missing" in err[0]
    assert "cannot write caption style 'tags'; it can write: caption" in err[-1]
    assert not (tmp_path / "a.txt").exists()


def test_python_api(tmp_path, tiny_model):
    write_images(tmp_path, ["a.jpg", "b.jpg"])
    settings = loracap.GenerationSettings(min_new_tokens=2, max_new_tokens=6)
    summary = loracap.caption_folder(
        tmp_path,
        model=str(tiny_model("blip")),
        generation=settings,
        options=loracap.PostProcess(trigger="sks"),
        progress=False,
    )
    assert (summary.captioned, summary.failed, summary.ok) == (2, 0, True)
    assert (tmp_path / "a.txt").read_text().startswith("sks, ")

    captioner = loracap.Captioner(str(tiny_model("blip")), generation=settings, device="cpu")
    rgba = Image.new("RGBA", (40, 30), (255, 0, 0, 0))
    assert isinstance(captioner(rgba), str)
    assert len(captioner([rgba, Image.new("L", (20, 20))])) == 2


def test_import_is_light():
    code = "import sys, loracap; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_interrupted_run_leaves_no_partial_files_and_resumes(tmp_path, tiny_model):
    """Ctrl-C mid-run: written captions are complete, nothing stray is left, a re-run finishes the rest."""
    data = tmp_path / "data"
    write_images(data, [f"img{i:02d}.jpg" for i in range(40)])
    cmd = [
        sys.executable,
        "-m",
        "loracap",
        "caption",
        str(data),
        "--model",
        str(tiny_model("florence2")),
        "--batch-size",
        "1",
        "--min-new-tokens",
        "20",
        "--max-new-tokens",
        "20",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(data.glob("*.txt")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Run the same command again to resume" in err
    done = captions(data)
    assert 0 < len(done) < 40
    assert all(text.strip() for text in done.values())
    assert not [p for p in data.iterdir() if p.name.startswith(".")]  # no temp files

    result = subprocess.run(cmd + ["--quiet"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"{40 - len(done)} captioned, {len(done)} skipped" in result.stderr
    assert len(captions(data)) == 40


def test_progress_bar_shows_rate_and_counts(tmp_path, tiny_model):
    write_images(tmp_path, ["a.jpg", "b.jpg", "c.jpg"])
    env = {**os.environ, "COLUMNS": "120"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "loracap",
            "caption",
            str(tmp_path),
            "--model",
            str(tiny_model("vit-gpt2")),
            "--min-new-tokens",
            "2",
            "--max-new-tokens",
            "4",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "3/3" in result.stderr and "img/s" in result.stderr
    assert "3 captioned, 0 skipped (already captioned), 0 failed of 3 images" in result.stderr
