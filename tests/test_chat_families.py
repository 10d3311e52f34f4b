"""The chat families beyond the first ones, end to end: Llama-3.2-Vision (mllama), Gemma 3, InternVL,
MiniCPM-V 4.x, Molmo2, InstructBLIP, and the captioners without a chat template (BLIP-2, GIT).

Each tiny model is built by the test kit in its real architecture and loaded by `loracap caption --model
DIR`, as a hub checkpoint would be. Random weights write junk, so what is checked is what a user relies on:
every image gets a caption, a batch captions exactly as one image at a time (prompts of different lengths,
images of different sizes, so padding and per-image token counts are in play), and `loracap models` lists
the families with their memory needs and, for remote-code models, what to use instead.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from conftest import GEN_ARGS

from loracap.backends import load_backend, processor_side
from loracap.backends.registry import KNOWN_MODELS
from loracap.cli import main
from loracap.testing import FAMILY_ARCHS, make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
MODEL_TYPES = {
    "mllama": "mllama",
    "gemma3": "gemma3",
    "internvl": "internvl",
    "minicpmv": "minicpmv4_6",
    "molmo2": "molmo2",
    "blip2": "blip-2",
    "instructblip": "instructblip",
    "git": "git",
}
# Chat models (and InstructBLIP) follow instructions; BLIP-2 and GIT continue a text.
INSTRUCTED = ["mllama", "gemma3", "internvl", "minicpmv", "molmo2", "instructblip"]
CONTINUING = ["blip2", "git"]
# Folder names of different lengths make per-image prompts of different lengths: a batch is padded.
IMAGES = {
    "a/red.png": ((64, 48), "red"),
    "a_much_longer_folder/blue.png": ((30, 90), "blue"),
    "a/grey.jpg": ((50, 50), "grey"),
    "a_much_longer_folder/green.png": ((96, 40), "green"),
}


def _needs_torchvision(arch: str) -> None:
    if arch == "molmo2" and not HAS_TORCHVISION:
        pytest.skip("Molmo2's image processor runs on torchvision, which is not installed")


def _write_images(root: Path) -> None:
    from PIL import Image

    for name, (size, colour) in IMAGES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, colour).save(root / name)


def _caption(root: Path, model: Path, *args: str) -> dict[str, str]:
    """`loracap caption` on `root`, then its captions by image."""
    assert main(["caption", str(root), "--model", str(model), "--device", "cpu", *GEN_ARGS, *args]) == 0
    return {p.relative_to(root).as_posix(): p.read_text() for p in sorted(root.rglob("*.txt"))}


def _batched_and_alone(tmp_path: Path, model: Path, *args: str) -> tuple[dict[str, str], dict[str, str]]:
    """The same folder captioned in one batch of four, and one image at a time."""
    _write_images(tmp_path / "batched")
    shutil.copytree(tmp_path / "batched", tmp_path / "alone")
    batched = _caption(tmp_path / "batched", model, "--batch-size", "4", *args)
    alone = _caption(tmp_path / "alone", model, "--batch-size", "1", *args)
    return batched, alone


def test_family_kits_are_registered():
    assert set(FAMILY_ARCHS) == set(MODEL_TYPES) == {*INSTRUCTED, *CONTINUING}


@pytest.mark.parametrize("arch", FAMILY_ARCHS)
def test_family_kit_is_tiny_real_and_repeatable(tmp_path, tiny_model, arch):
    folder = tiny_model(arch)
    assert json.loads((folder / "config.json").read_text())["model_type"] == MODEL_TYPES[arch]
    weights = (folder / "model.safetensors").stat().st_size
    assert weights < 4_000_000  # well under a million float32 parameters
    again = make_tiny_model(arch, tmp_path / "again")
    assert (again / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()


@pytest.mark.parametrize("arch", INSTRUCTED)
def test_chat_family_captions_a_batch_as_one_image_at_a_time(tmp_path, tiny_model, arch):
    _needs_torchvision(arch)
    prompt = "Write one short caption for this photo from the {folder} folder."
    batched, alone = _batched_and_alone(tmp_path, tiny_model(arch), "--prompt", prompt)
    assert set(batched) == {Path(name).with_suffix(".txt").as_posix() for name in IMAGES}
    assert all(batched.values()), batched
    assert batched == alone
    # The image reaches the text (through cross-attention in mllama): two images, one prompt, two captions.
    assert batched["a/red.txt"] != batched["a/grey.txt"], batched


@pytest.mark.parametrize("arch", CONTINUING)
def test_captioner_continues_the_prompt_in_batches_as_alone(tmp_path, tiny_model, arch):
    batched, alone = _batched_and_alone(tmp_path, tiny_model(arch), "--prompt", "a photo of")
    assert batched == alone
    assert batched["a/red.txt"] != batched["a/grey.txt"], batched
    # As with BLIP, the words the model continued are the caption's first words, and more follow.
    assert all(c.startswith("a photo of") and len(c) > len("a photo of") for c in batched.values()), batched


@pytest.mark.parametrize("arch", CONTINUING)
def test_captioner_writes_plain_captions_and_refuses_instructions(tmp_path, tiny_model, arch, capsys):
    model = tiny_model(arch)
    _write_images(tmp_path)
    captions = _caption(tmp_path, model)
    assert len(captions) == len(IMAGES) and all(captions.values())
    other = tmp_path / "other"
    _write_images(other)
    capsys.readouterr()
    args = ["caption", str(other), "--model", str(model), "--device", "cpu", *GEN_ARGS]
    assert main([*args, "--style", "training-caption"]) == 2
    assert "cannot write caption style 'training-caption'; it can write: caption" in capsys.readouterr().err
    assert not list(other.rglob("*.txt"))


@pytest.mark.skipif(HAS_TORCHVISION, reason="torchvision is installed")
def test_molmo2_without_torchvision_is_one_line_that_names_it(tmp_path, tiny_model, capsys):
    _write_images(tmp_path)
    args = ["caption", str(tmp_path), "--model", str(tiny_model("molmo2")), "--device", "cpu", *GEN_ARGS]
    assert main(args) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("loracap: error:") and "torchvision" in error
    assert not list(tmp_path.rglob("*.txt"))


@pytest.mark.parametrize("arch", ["mllama", "gemma3", "internvl", "minicpmv", "blip2", "instructblip", "git"])
def test_the_side_read_from_files_is_the_loaded_backends(tiny_model, arch):
    # The Ray engine decodes images before the model is loaded, at the side read from the processor files.
    model = str(tiny_model(arch))
    assert processor_side(model) == load_backend(model, device="cpu").image_side


def test_models_lists_the_families_and_successors_of_remote_code_models(capsys):
    assert main(["models"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if "/" in line}
    families = {m.id: m.family for m in KNOWN_MODELS}
    for family in MODEL_TYPES.values():
        listed = [rows[i] for i, f in families.items() if f == family]
        assert listed, family
        for row in listed:  # weights in GB at bf16, 8-bit and 4-bit, halving each time
            bf16, int8, int4 = (float(gb) for gb in row.split()[2:5])
            assert bf16 > int8 > int4 > 0 and "NOT SUPPORTED" not in row
    assert " 19.8   9.9   5.0 " in rows["meta-llama/Llama-3.2-11B-Vision-Instruct"]
    successors = {
        "vikhyatk/moondream2": "OpenGVLab/InternVL3-2B-hf",
        "openbmb/MiniCPM-V-2_6": "openbmb/MiniCPM-V-4.6",
        "allenai/Molmo-7B-D-0924": "allenai/Molmo2-8B",
    }
    for old, new in successors.items():
        assert (
            "NOT SUPPORTED: needs trust_remote_code, and loracap runs no model's remote code; use"
            in rows[old]
        )
        assert new in rows[old].split("NOT SUPPORTED")[1] and "NOT SUPPORTED" not in rows[new]
