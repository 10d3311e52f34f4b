"""The test kit's tiny SD 1.5 / SDXL / Flux pipelines load like hub pipelines, generate, and are reproducible.

Each pipeline is built once per module; generation runs 2 steps at 64 px on one torch thread (about 0.1 s a
step here), so the whole module is dominated by importing diffusers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

from loracap.testing import ARCHS, make_tiny_model  # noqa: E402
from loracap.testing.diffusion_models import DIFFUSION_ARCHS  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SIZE = 64
PIPELINES = {
    "sd15": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "flux": "FluxPipeline",
    "flux-dev": "FluxPipeline",
}
FOLDERS = {
    "sd15": {"unet", "vae", "text_encoder", "tokenizer", "scheduler"},
    "sdxl": {"unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"},
    "flux": {"transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"},
}
FOLDERS["flux-dev"] = FOLDERS["flux"]


def _files(path: Path) -> dict[str, bytes]:
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def _weights(files: dict[str, bytes]) -> dict[str, bytes]:
    return {name: data for name, data in files.items() if name.endswith(".safetensors")}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("diffusion-kit")
    return {arch: make_tiny_model(arch, root / arch) for arch in DIFFUSION_ARCHS}


def _load(path: Path, arch: str):
    import diffusers

    pipe = diffusers.DiffusionPipeline.from_pretrained(path)
    assert type(pipe).__name__ == PIPELINES[arch]
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, arch: str, prompt: str, seed: int = 0, **kw):
    import torch

    if arch.startswith("flux"):
        kw.setdefault("max_sequence_length", 48)
    return pipe(
        prompt,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        **kw,
    ).images


def test_registered_after_the_existing_archs() -> None:
    assert ARCHS[-4:] == DIFFUSION_ARCHS == ("sd15", "sdxl", "flux", "flux-dev")


@pytest.mark.parametrize("arch", DIFFUSION_ARCHS)
def test_pipeline_folder_layout(built: dict[str, Path], arch: str) -> None:
    path = built[arch]
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == PIPELINES[arch]
    assert {p.name for p in path.iterdir() if p.is_dir()} == FOLDERS[arch]
    denoiser = "transformer" if arch.startswith("flux") else "unet"
    assert (path / denoiser / "diffusion_pytorch_model.safetensors").is_file()
    assert (path / "text_encoder" / "model.safetensors").is_file()
    if arch == "sd15":
        assert index["requires_safety_checker"] is False
        assert index["safety_checker"] == [None, None]
    if arch == "sdxl":
        assert index["force_zeros_for_empty_prompt"] is True
    if arch.startswith("flux"):
        assert index["tokenizer_2"] == ["transformers", "T5Tokenizer"]
        config = json.loads((path / "transformer" / "config.json").read_text())
        assert config["guidance_embeds"] is (arch == "flux-dev")  # dev takes a guidance scale, schnell none


@pytest.mark.parametrize("arch", DIFFUSION_ARCHS)
def test_reloads_and_generates_64px(built: dict[str, Path], one_thread, arch: str) -> None:
    import diffusers
    import numpy as np

    pipe = _load(built[arch], arch)
    # The specific class loads the same folder too.
    assert isinstance(getattr(diffusers, PIPELINES[arch]).from_pretrained(built[arch]), type(pipe))
    images = _generate(pipe, arch, "a photo of a cat", height=SIZE, width=SIZE)
    assert images.shape == (1, SIZE, SIZE, 3) and np.isfinite(images).all()
    # Same seed, same image; the prompt reaches the denoiser (random weights: a small but real change).
    again = _generate(pipe, arch, "a photo of a cat", height=SIZE, width=SIZE)
    assert np.allclose(images, again, atol=1e-5)
    other = _generate(pipe, arch, "a watercolor sketch of a red car", height=SIZE, width=SIZE)
    assert np.abs(images - other).max() > 1e-4


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_sd_pipelines_default_to_64px(built: dict[str, Path], one_thread, arch: str) -> None:
    pipe = _load(built[arch], arch)
    assert _generate(pipe, arch, "a dog").shape == (1, SIZE, SIZE, 3)


def test_sdxl_encoders_and_tokenizers_as_published(built: dict[str, Path]) -> None:
    pipe = _load(built["sdxl"], "sdxl")
    names = (type(pipe.text_encoder).__name__, type(pipe.text_encoder_2).__name__)
    assert names == ("CLIPTextModel", "CLIPTextModelWithProjection")
    # CLIP-L pads with <|endoftext|>, CLIP-G with "!" (id 0); both end every prompt with <|endoftext|>.
    assert pipe.tokenizer.pad_token == pipe.tokenizer.eos_token == "<|endoftext|>"
    assert (pipe.tokenizer_2.pad_token, pipe.tokenizer_2.pad_token_id) == ("!", 0)
    ids = pipe.tokenizer_2("a cat", padding="max_length").input_ids
    assert len(ids) == 77 and ids[-1] == 0 and pipe.tokenizer_2.eos_token_id in ids
    unet = pipe.unet.config
    assert (
        unet.cross_attention_dim
        == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    )
    assert unet.projection_class_embeddings_input_dim == pipe.text_encoder_2.config.projection_dim + 6 * 8


def test_flux_t5_tokenizer_layout(built: dict[str, Path]) -> None:
    pipe = _load(built["flux"], "flux")
    t5 = pipe.tokenizer_2
    assert (t5.pad_token_id, t5.eos_token_id, t5.unk_token_id) == (0, 1, 2)
    assert pipe.text_encoder_2.config.vocab_size == len(t5)
    text = "A photo of a cat, 1girl, standing in a field of flowers."
    ids = t5(text).input_ids
    assert ids[-1] == t5.eos_token_id and t5.unk_token_id not in ids
    assert t5.decode(ids, skip_special_tokens=True) == text


@pytest.mark.parametrize("arch", DIFFUSION_ARCHS)
def test_tiny_parameter_scale(built: dict[str, Path], arch: str) -> None:
    pipe = _load(built[arch], arch)
    counts = {
        name: sum(p.numel() for p in part.parameters())
        for name, part in pipe.components.items()
        if hasattr(part, "parameters")
    }
    assert all(0 < n < 100_000 for n in counts.values()), counts
    assert sum(counts.values()) < 250_000, counts
    assert sum(f.stat().st_size for f in built[arch].rglob("*") if f.is_file()) < 2_000_000


@pytest.mark.parametrize("arch", DIFFUSION_ARCHS)
def test_same_seed_same_bytes_other_seed_differs(built: dict[str, Path], tmp_path: Path, arch: str) -> None:
    import torch

    reference = _files(built[arch])
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    again = _files(make_tiny_model(arch, tmp_path / "again", seed=0))
    assert torch.equal(torch.rand(3), expected)  # the caller's RNG stream is left alone
    assert again == reference
    other = _files(make_tiny_model(arch, tmp_path / "other", seed=1))
    assert other.keys() == reference.keys()
    assert all(other[name] != data for name, data in _weights(reference).items())
    assert {n: d for n, d in other.items() if n not in _weights(other)} == {
        n: d for n, d in reference.items() if n not in _weights(reference)
    }


def test_only_tiny(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="only size='tiny'"):
        make_tiny_model("sdxl", tmp_path, size="full")


def test_cli_builds_sd15_identical_in_another_process(built: dict[str, Path], tmp_path: Path) -> None:
    import os

    out_dir = tmp_path / "sd15"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    result = subprocess.run(
        [sys.executable, "-m", "loracap.testing", "sd15", str(out_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == str(out_dir)
    # Another process: the same tokenizer and weights (nothing depends on hash-map order).
    assert _files(out_dir) == _files(built["sd15"])
