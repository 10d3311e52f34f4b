"""`--engine vllm`: refused with one line where it cannot run (no CUDA GPU, no vLLM, a model family vLLM
does not run), and, on a CUDA machine with vLLM (benchmarks/gpu.sh runs this file there), the same
prompts as the transformers backend."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from loracap.cli import main


def _folder(root: Path) -> Path:
    root.mkdir()
    for i in range(2):
        Image.new("RGB", (48, 40), (60 * i, 120, 200)).save(root / f"{i}.png")
    return root


def _cuda_and_vllm() -> bool:
    try:
        import torch
        import vllm  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(_cuda_and_vllm(), reason="this machine can run vLLM: the GPU test below covers it")
def test_vllm_is_refused_with_one_line_where_it_cannot_run(tmp_path, tiny_model, capsys):
    data = _folder(tmp_path / "data")
    assert (
        main(["caption", str(data), "--engine", "vllm", "--model", str(tiny_model("qwen2-vl")), "--quiet"])
        == 2
    )
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("loracap:")]
    assert len(said) == 1 and "--engine vllm needs" in said[0]  # a CUDA GPU, or vLLM itself
    assert not list(data.glob("*.txt"))


@pytest.mark.skipif(_cuda_and_vllm(), reason="this machine can run vLLM")
def test_serve_with_vllm_is_refused_before_it_binds_where_it_cannot_run(tiny_model, capsys):
    model = str(tiny_model("qwen2-vl"))
    assert main(["serve", "--model", model, "--engine", "vllm", "--port", "1"]) == 2
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("loracap:")]
    assert len(said) == 1 and "--engine vllm needs" in said[0]


def test_vllm_refuses_the_families_it_does_not_run(tmp_path, tiny_model, capsys):
    data = _folder(tmp_path / "data")
    assert (
        main(["caption", str(data), "--engine", "vllm", "--model", str(tiny_model("florence2")), "--quiet"])
        == 2
    )
    err = capsys.readouterr().err
    assert "'florence2' model; --engine vllm runs the chat families" in err and "--engine local or ray" in err


@pytest.mark.skipif(not _cuda_and_vllm(), reason="needs a CUDA GPU and vLLM (benchmarks/gpu.sh)")
def test_vllm_reads_the_prompt_the_transformers_backend_reads(tiny_model):
    """Same chat template, same instruction, same image tokens: vLLM's prompt token ids equal the
    transformers processor's, and greedy captions are non-empty."""
    from loracap.backends import load_backend
    from loracap.backends.base import GenerationSettings

    model = str(tiny_model("qwen2-vl"))
    image = Image.new("RGB", (64, 48), (200, 80, 40))
    local = load_backend(model, device="cuda")
    served = load_backend(model, engine="vllm")
    inputs = local.prepare([image], "*", "Describe the image.")
    expected = inputs["tensors"]["input_ids"][0][inputs["tensors"]["attention_mask"][0].bool()].tolist()
    from vllm import SamplingParams

    out = served.llm.generate(
        served.prepare([image], "*", "Describe the image."), SamplingParams(max_tokens=8)
    )
    assert out[0].prompt_token_ids == expected
    assert served.generate(served.prepare([image], "*", "Describe it."), GenerationSettings(max_new_tokens=8))
