"""`processor_side`: the side an engine decodes images at before the model is loaded (the Ray engine's
decode tasks) must be the side the loaded backend itself decodes at, for every family."""

from __future__ import annotations

import pytest

from loracap.backends import load_backend, processor_side


@pytest.mark.parametrize(
    "arch",
    ["florence2", "blip", "vit-gpt2", "llava", "qwen2-vl", "qwen2.5-vl", "qwen3-vl", "idefics3", "smolvlm"],
)
def test_the_side_read_from_files_is_the_loaded_backends(tiny_model, arch):
    model = str(tiny_model(arch))
    assert processor_side(model) == load_backend(model, device="cpu").image_side > 0
