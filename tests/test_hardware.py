"""Without --model, loracap picks the model that fits the machine; --quant is refused where it cannot work."""

from __future__ import annotations

import pytest
from conftest import GEN_ARGS, write_images

from loracap.backends import BackendError, load_backend
from loracap.backends.hardware import (
    FLORENCE_BASE,
    JOYCAPTION,
    SMOLVLM,
    auto_model,
    choose_default_model,
    free_accelerator_gb,
)
from loracap.backends.registry import DEFAULT_MODEL, KNOWN_MODELS
from loracap.cli import main


@pytest.mark.parametrize(
    ("free_gb", "can_quantize", "expected"),
    [
        (None, True, (DEFAULT_MODEL, None)),
        (3.5, True, (DEFAULT_MODEL, None)),
        (6.0, True, (DEFAULT_MODEL, None)),
        (10.0, True, (JOYCAPTION, "4bit")),
        (10.0, False, (DEFAULT_MODEL, None)),
        (16.0, True, (JOYCAPTION, "8bit")),
        (16.0, False, (DEFAULT_MODEL, None)),
        (40.0, False, (JOYCAPTION, None)),
    ],
)
def test_the_memory_table(free_gb, can_quantize, expected):
    choice = choose_default_model(free_gb, can_quantize=can_quantize)
    assert (choice.model, choice.quant) == expected


@pytest.mark.parametrize(
    ("free_gb", "fallback"), [(None, FLORENCE_BASE), (6.0, SMOLVLM), (40.0, DEFAULT_MODEL)]
)
def test_fallback_when_the_primary_is_not_downloaded(free_gb, fallback):
    choice = choose_default_model(free_gb, available=lambda model: model == fallback)
    assert choice.model == fallback and "not downloaded" in choice.reason
    # Neither available: the primary, so the error message names what to download.
    assert choose_default_model(free_gb, available=lambda model: False).model != fallback


def test_a_model_without_a_backend_is_never_chosen():
    choice = choose_default_model(40.0, runnable=lambda model: model != JOYCAPTION)
    assert choice.model == DEFAULT_MODEL and "backend" in choice.reason


def test_every_default_is_a_known_supported_model():
    known = {m.id: m for m in KNOWN_MODELS}
    for model in (DEFAULT_MODEL, FLORENCE_BASE, SMOLVLM, JOYCAPTION):
        assert model in known and not known[model].unsupported


def test_a_cpu_run_gets_florence_whatever_the_machine_has():
    assert free_accelerator_gb("cpu") == ("cpu", None)
    assert auto_model("cpu").model == DEFAULT_MODEL


def test_quantization_is_refused_off_cuda(tiny_model, tmp_path, capsys):
    with pytest.raises(BackendError, match="needs a CUDA GPU"):
        load_backend(str(tiny_model("blip")), device="cpu", quant="4bit")
    write_images(tmp_path, ["a.jpg"])
    blip = str(tiny_model("blip"))
    args = ["caption", str(tmp_path), "--model", blip, "--device", "cpu", "--quant", "8bit", *GEN_ARGS]
    assert main(args) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "a.txt").exists()
