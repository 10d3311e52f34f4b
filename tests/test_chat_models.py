"""The tiny chat VLMs of the test kit: built fast, deterministic, and loadable as hub checkpoints are."""

from __future__ import annotations

import json

import pytest

from loracap.testing import ARCHS, make_tiny_model
from loracap.testing.chat_models import CHAT_ARCHS

MODEL_TYPES = {
    "llava": "llava",
    "qwen2-vl": "qwen2_vl",
    "qwen2.5-vl": "qwen2_5_vl",
    "qwen3-vl": "qwen3_vl",
    "idefics3": "idefics3",
    "smolvlm": "idefics3",  # SmolVLM-v1 checkpoints are Idefics3 models
    "paligemma": "paligemma",
}


def test_chat_archs_are_registered():
    assert set(CHAT_ARCHS) <= set(ARCHS)
    assert set(MODEL_TYPES) == set(CHAT_ARCHS)


@pytest.mark.parametrize("arch", CHAT_ARCHS)
def test_chat_model_is_tiny_and_reloads(tmp_path, arch):
    from transformers import AutoModelForImageTextToText

    folder = make_tiny_model(arch, tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == MODEL_TYPES[arch]
    # What a loader needs besides the weights: image processor, tokenizer and (chat models) a template.
    assert (folder / "tokenizer.json").is_file()
    assert (folder / "preprocessor_config.json").is_file() or (folder / "processor_config.json").is_file()
    if arch != "paligemma":
        assert (folder / "chat_template.jinja").is_file()
    model = AutoModelForImageTextToText.from_pretrained(folder)
    assert model.config.model_type == MODEL_TYPES[arch]
    # Tiny is what keeps the suite fast on a CPU: well under a million parameters per model.
    assert model.num_parameters() < 1_000_000
    # The same seed writes the same weights.
    again = make_tiny_model(arch, tmp_path / "again")
    assert (again / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()


def test_chat_models_are_tiny_only(tmp_path):
    with pytest.raises(ValueError, match="only size='tiny'"):
        make_tiny_model("llava", tmp_path, size="full")


def test_llava_is_in_joycaption_layout(tiny_model):
    folder = tiny_model("llava")
    config = json.loads((folder / "config.json").read_text())
    processor = json.loads((folder / "processor_config.json").read_text())
    # SigLIP has no CLS token: every patch is an image feature, in the model and in the processor's count.
    assert config["vision_feature_select_strategy"] == "full"
    assert processor["vision_feature_select_strategy"] == "full"
    assert config["vision_config"]["model_type"] == "siglip_vision_model"
    assert config["text_config"]["model_type"] == "llama"
    template = (folder / "chat_template.jinja").read_text()
    assert "<image>" in template and "add_generation_prompt" in template
