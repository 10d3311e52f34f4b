"""Models come from a local folder or the Hugging Face cache; a missing one gets one clear line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from loracap.backends import ModelUnavailable, load_backend, resolve_model
from loracap.hub import hf_cache_dir, is_cached


def _put_in_hf_cache(folder, repo_id: str, commit: str = "0123abcd" * 5):
    """Lay the model out exactly as huggingface_hub's cache does: refs/main -> snapshots/<commit>."""
    repo = hf_cache_dir() / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


def test_hub_id_loads_from_the_cache_offline(tiny_model):
    snapshot = _put_in_hf_cache(tiny_model("vit-gpt2"), "acme/tiny-vit-gpt2")
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert resolve_model("acme/tiny-vit-gpt2") == snapshot
    assert is_cached("acme/tiny-vit-gpt2") and not is_cached("acme/other")
    assert load_backend("acme/tiny-vit-gpt2", device="cpu").name == "acme/tiny-vit-gpt2"


def test_missing_model_offline_says_what_to_download():
    with pytest.raises(ModelUnavailable) as info:
        resolve_model("acme/not-downloaded")
    message = str(info.value)
    assert "\n" not in message
    assert "hf download acme/not-downloaded" in message and "HF_HUB_OFFLINE=1" in message


def test_bad_paths_are_explained(tmp_path):
    with pytest.raises(ModelUnavailable, match="has no config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelUnavailable, match="no model folder at ./nowhere"):
        resolve_model("./nowhere")


def test_cli_missing_model_is_one_line_and_exit_2(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    result = subprocess.run(
        [sys.executable, "-m", "loracap", "caption", str(tmp_path), "--model", "acme/not-downloaded"],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("loracap: error:")]
    assert len(errors) == 1 and "hf download acme/not-downloaded" in errors[0]
    assert not (tmp_path / "a.txt").exists()
