"""`loracap caption` end to end on folders, with a tiny Florence-2 built locally."""

from __future__ import annotations

import json
import os
import shutil
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

GENERATION = loracap.GenerationSettings(min_new_tokens=2, max_new_tokens=6)  # GEN_ARGS, for the Python API


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


def test_a_resume_does_not_load_the_model_for_files_that_failed_to_decode(tmp_path, tiny_model, capsys):
    """Undecodable files are remembered by content: a re-run lists them as failed again without a model,
    retries one once it is replaced, and --retry-failed retries them all."""
    write_images(tmp_path, ["a.jpg", "b.jpg", "c.jpg"])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "noise.png").write_bytes(b"not an image at all")
    model = tiny_model("florence2")
    assert run(tmp_path, model) == 1
    assert "3 captioned, 0 skipped (already captioned), 2 failed of 5 images" in capsys.readouterr().err

    # Nothing left to caption but the two known failures: a model that does not exist is never loaded.
    missing_model = tmp_path / "no-such-model"
    assert run(tmp_path, missing_model) == 1
    err = capsys.readouterr().err
    assert "0 captioned, 3 skipped (already captioned), 2 failed (2 as before: unchanged, not retried)" in err
    errors = {
        e["path"]: e for e in map(json.loads, (tmp_path / "loracap-errors.jsonl").read_text().splitlines())
    }
    assert set(errors) == {"empty.jpg", "noise.png"} and "empty" in errors["empty.jpg"]["reason"]

    # A replaced file is tried again; --retry-failed tries the unchanged one too (and needs the model).
    write_images(tmp_path, ["noise.png"])
    assert run(tmp_path, model) == 1
    assert "1 captioned, 3 skipped (already captioned), 1 failed (1 as before" in capsys.readouterr().err
    assert run(tmp_path, missing_model, "--retry-failed") == 2  # the model is needed, and missing
    assert run(tmp_path, model, "--retry-failed") == 1
    assert "0 captioned, 4 skipped (already captioned), 1 failed of 5 images" in capsys.readouterr().err


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
    # absolute paths with the extension: the keys sd-scripts v0.9.x and v0.10.x both find
    assert sorted(meta) == [str(dataset / n) for n in ("a.jpg", "b.PNG", "sub/c.webp")]
    assert all(meta[k]["caption"] for k in meta)


def test_images_sharing_a_stem_are_not_given_one_caption(tmp_path, tiny_model, capsys):
    write_images(tmp_path, ["a.jpg", "a.png", "b.jpg"])
    assert run(tmp_path, tiny_model("florence2")) == 1
    assert sorted(captions(tmp_path)) == ["b.txt"]
    err = capsys.readouterr().err
    assert "a.jpg, a.png would share one caption (a.txt)" in err
    # jsonl file names and kohya-json keys keep the extension, so there both images get their own caption.
    assert run(tmp_path, tiny_model("florence2"), "--format", "kohya-json") == 0
    assert len(json.loads((tmp_path / "meta_cap.json").read_text())) == 3
    assert run(tmp_path, tiny_model("florence2"), "--format", "jsonl") == 0


def test_a_model_that_fails_every_image_stops_with_one_line(tmp_path, tiny_model, capsys):
    """A checkpoint that cannot generate at all is one error (exit 2), not the same error for every file."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model("vit-gpt2"), broken)
    config = json.loads((broken / "generation_config.json").read_text())
    config["decoder_start_token_id"] = 10**6  # a token the decoder has no embedding for
    (broken / "generation_config.json").write_text(json.dumps(config))
    data = tmp_path / "data"
    write_images(data, [f"img{i:02d}.jpg" for i in range(22)])

    assert run(data, broken, "--batch-size", "2") == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("loracap:")] == [
        "loracap: error: the model failed on each of the first 8 images with the same error, "
        "so the run stopped (nothing was written): IndexError: index out of range in self"
    ]
    assert not captions(data) and not (data / "loracap-errors.jsonl").exists()


MAGENTA = (255, 0, 255)


class _FailsOnMagenta:
    """A loaded backend with one fault injected: it raises on any batch holding a pure magenta image, as a
    real model may on one odd input (a device-side assert, say). Everything else runs the real model."""

    def __init__(self, backend):
        self.backend = backend

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def prepare(self, images, mode, prompt=None):
        poisoned = any(im.getpixel((0, 0)) == MAGENTA for im in images)
        return self.backend.prepare(images, mode, prompt), poisoned

    def generate(self, inputs, settings):
        prepared, poisoned = inputs
        if poisoned:
            raise RuntimeError("device-side assert triggered")
        return self.backend.generate(prepared, settings)


def test_images_a_working_model_fails_on_are_reported_and_the_rest_captioned(tmp_path, tiny_model):
    """Failures before the first caption are held back, not lost: once the model has captioned an image,
    they are reported per file like any other."""
    from loracap.backends import load_backend

    data = tmp_path / "data"
    data.mkdir()
    for name in ("a-odd.png", "b-odd.png"):  # first in order: they fail before any image is captioned
        Image.new("RGB", (48, 40), MAGENTA).save(data / name)
    write_images(data, ["c.jpg", "d.jpg", "e.jpg"])
    backend = _FailsOnMagenta(load_backend(str(tiny_model("vit-gpt2")), device="cpu"))
    summary = loracap.caption_folder(
        data, backend=backend, batch_size=1, generation=GENERATION, progress=False
    )
    assert (summary.captioned, summary.failed) == (3, 2)
    assert sorted(captions(data)) == ["c.txt", "d.txt", "e.txt"]
    errors = [json.loads(line) for line in (data / "loracap-errors.jsonl").read_text().splitlines()]
    assert {e["path"]: e["stage"] for e in errors} == {"a-odd.png": "caption", "b-odd.png": "caption"}
    assert all("device-side assert" in e["reason"] for e in errors)

    # One image alone that the model fails on is that image's error, not a broken model.
    alone = tmp_path / "alone"
    alone.mkdir()
    Image.new("RGB", (48, 40), MAGENTA).save(alone / "odd.png")
    summary = loracap.caption_folder(alone, backend=backend, generation=GENERATION, progress=False)
    assert (summary.captioned, summary.failed) == (0, 1) and summary.errors[0].path == "odd.png"


def test_a_decode_length_past_the_decoder_is_cut_to_fit_and_said_once(tmp_path, tiny_model, capsys):
    """BLIP's decoder has 512 learned positions: asking for more would fail every image with IndexError."""
    import torch

    torch.set_num_threads(1)
    blip = shutil.copytree(tiny_model("blip"), tmp_path / "blip")  # its own name: said once per model
    data = tmp_path / "data"
    write_images(data, ["a.jpg", "b.jpg"])
    args = ["--batch-size", "1", "--min-new-tokens", "600", "--max-new-tokens", "600", "--quiet"]
    assert main(["caption", str(data), "--model", str(blip), *args]) == 0
    err = capsys.readouterr().err
    assert err.count("decoder holds 512 positions, so captions stop at 512 new tokens (not 600)") == 1
    assert len(captions(data)) == 2


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


# Runs `loracap caption` as a user does, except that after the fifth caption is written the process
# announces it and waits, so the Ctrl-C lands mid-run on any machine, fast or loaded.
_PAUSE_AFTER_FIVE = """
import sys, time
from pathlib import Path
from loracap.dataset import sidecar

ready, written, write = Path(sys.argv[1]), [], sidecar.SidecarStore.write

def write_then_pause(self, image, text):
    write(self, image, text)
    written.append(image)
    if len(written) == 5:
        ready.touch()
        while True:
            time.sleep(0.05)

sidecar.SidecarStore.write = write_then_pause
from loracap.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_interrupted_run_leaves_no_partial_files_and_resumes(tmp_path, tiny_model):
    """Ctrl-C mid-run: written captions are complete, nothing stray is left, a re-run finishes the rest."""
    data = tmp_path / "data"
    write_images(data, [f"img{i:02d}.jpg" for i in range(40)])
    args = ["caption", str(data), "--model", str(tiny_model("florence2")), "--batch-size", "1", *GEN_ARGS]
    ready = tmp_path / "paused"
    proc = subprocess.Popen(
        [sys.executable, "-c", _PAUSE_AFTER_FIVE, str(ready), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    while not ready.exists():
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Run the same command again to resume" in err
    done = captions(data)
    assert len(done) == 5
    assert all(text.strip() for text in done.values())
    assert not [p for p in data.iterdir() if p.name.startswith(".")]  # no temp files

    result = subprocess.run([sys.executable, "-m", "loracap", *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "35 captioned, 5 skipped" in result.stderr
    assert captions(data).items() >= done.items()  # the first five were not captioned again
    assert len(captions(data)) == 40


def test_quiet_prints_the_summary_alone(tmp_path, tiny_model):
    """--quiet silences the progress bars, the Hugging Face libraries' "Loading weights" among them, and
    loracap's info messages."""
    write_images(tmp_path, ["a.jpg", "b.jpg"])
    model = str(tiny_model("florence2"))
    base = [sys.executable, "-m", "loracap", "caption", str(tmp_path), "--model", model]
    base += ["--min-new-tokens", "2", "--max-new-tokens", "6", "--existing", "overwrite"]
    # (An earlier in-process --quiet run in this test session set this for its process: not for this one.)
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    loud = subprocess.run(base, capture_output=True, text=True, timeout=300, env=env)
    assert loud.returncode == 0, loud.stderr
    assert "Loading weights" in loud.stderr and "captioning" in loud.stderr  # the bars, by default
    quiet = subprocess.run([*base, "--quiet"], capture_output=True, text=True, timeout=300, env=env)
    assert quiet.returncode == 0, quiet.stderr
    (line,) = quiet.stderr.strip().splitlines()
    assert line.startswith("loracap: 2 captioned, 0 skipped (already captioned), 0 failed of 2 images in ")


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
