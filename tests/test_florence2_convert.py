"""Original remote-code Florence-2 checkpoints (microsoft/*, PromptGen) convert to the native layout."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from PIL import Image

from loracap.backends import load_backend
from loracap.backends.florence2_convert import ConversionError, is_original_layout, rename_state_dict
from loracap.testing import make_tiny_model


def _logits(model, processor, vocab: int) -> torch.Tensor:
    inputs = processor(
        text=["What does the image describe?"],
        images=[Image.new("RGB", (64, 64), "teal")],
        return_tensors="pt",
    )
    decoder_ids = torch.tensor([[2, 0, 5, 9]])
    with torch.no_grad():
        out = model(
            input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"], decoder_input_ids=decoder_ids
        )
    return out.logits[..., :vocab]


@pytest.mark.parametrize("weights_format", ["safetensors", "bin"])
def test_original_layout_converts_to_the_same_network(tmp_path, tiny_model, weights_format):
    original = make_tiny_model("florence2-original", tmp_path / "orig", weights_format=weights_format)
    assert is_original_layout(original)
    native = load_backend(str(tiny_model("florence2")), device="cpu")  # same seed: same weights
    converted = load_backend(str(original), device="cpu")

    vocab = json.loads((original / "config.json").read_text())["vocab_size"]
    expected = _logits(native.model, native.processor, vocab)
    got = _logits(converted.model, converted.processor, vocab)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # Decoding starts the way the checkpoint was trained: </s> then a forced <s>.
    original_text = json.loads((original / "config.json").read_text())["text_config"]
    generation = converted.model.generation_config
    assert generation.decoder_start_token_id == original_text["decoder_start_token_id"]
    assert generation.forced_bos_token_id == original_text["forced_bos_token_id"]
    # Token ids line up too: the same prompt encodes to the same ids in both processors.
    text = "What does the image describe? <loc_5>"
    assert converted.processor.tokenizer(text)["input_ids"] == native.processor.tokenizer(text)["input_ids"]


def test_conversion_is_cached(tmp_path, caplog):
    original = make_tiny_model("florence2-original", tmp_path / "orig")
    with caplog.at_level(logging.INFO, logger="loracap"):
        load_backend(str(original), device="cpu")
    assert "converting" in caplog.text  # said, once
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="loracap"):
        load_backend(str(original), device="cpu")
    assert "converting" not in caplog.text


def test_task_tokens_are_read_from_the_checkpoint(tmp_path):
    # The tiny checkpoint's processor code declares <GENERATE_TAGS>; its model card spells <MIX_CAPTION>.
    backend = load_backend(str(make_tiny_model("florence2-original", tmp_path / "orig")), device="cpu")
    assert {"tags", "caption", "mixed", "analyze"} <= set(backend.modes)
    assert backend.task_text("mixed", None) == "<MIX_CAPTION>"
    assert backend.task_text("tags", None) == "<GENERATE_TAGS>"
    assert backend.task_text("caption", None) == "What does the image describe?"


def test_unknown_weights_stop_the_conversion():
    with pytest.raises(ConversionError, match="unexpected weights"):
        rename_state_dict({"vision_tower.new_block.weight": torch.zeros(1)})
