"""The chat-VLM backend on tiny real-architecture checkpoints: instructions, batching, processors."""

from __future__ import annotations

import pytest
from PIL import Image

from loracap.backends import BackendError, GenerationSettings, caption_images
from loracap.backends.chat_vlm import ChatVLMBackend, processor_from_parts
from loracap.backends.device import choose_placement
from loracap.testing.chat_models import CHAT_ARCHS

SETTINGS = GenerationSettings(max_new_tokens=6, min_new_tokens=2)
INSTRUCTION = "Write a one-sentence caption."
ARCHS = [arch for arch in CHAT_ARCHS if arch != "smolvlm"]  # smolvlm builds the same model as idefics3

_loaded: dict[str, ChatVLMBackend] = {}


def _backend(tiny_model, arch: str) -> ChatVLMBackend:
    if arch not in _loaded:
        _loaded[arch] = ChatVLMBackend(tiny_model(arch), arch, choose_placement("cpu"))
    return _loaded[arch]


def _images() -> list[Image.Image]:
    # Different sizes and aspect ratios; Qwen turns them into different numbers of image tokens.
    return [Image.new("RGB", (64, 48), "red"), Image.new("RGB", (30, 90), "blue"), Image.new("RGB", (50, 50))]


def _mode_and_prompt(backend: ChatVLMBackend) -> tuple[str, str | None]:
    return ("*", INSTRUCTION) if backend.instructions else ("caption", None)


@pytest.mark.parametrize("arch", ARCHS)
def test_captions_a_mixed_size_batch_as_one_by_one(tiny_model, arch):
    backend = _backend(tiny_model, arch)
    mode, prompt = _mode_and_prompt(backend)
    captions = backend.generate(backend.prepare(_images(), mode, prompt), SETTINGS)
    assert len(captions) == 3
    assert all(isinstance(c, str) and c for c in captions), captions
    # Greedy decoding of a left-padded batch must match each image alone: a prompt followed by padding
    # (right padding) or a misplaced position would change the continuation.
    alone = [backend.generate(backend.prepare([image], mode, prompt), SETTINGS)[0] for image in _images()]
    assert captions == alone


@pytest.mark.parametrize("arch", ["qwen2-vl", "qwen2.5-vl", "qwen3-vl"])
def test_qwen_batches_images_with_different_token_counts(tiny_model, arch):
    backend = _backend(tiny_model, arch)
    inputs = backend.prepare(_images(), "*", INSTRUCTION)["tensors"]
    grids = inputs["image_grid_thw"].tolist()
    assert len({tuple(g) for g in grids}) > 1  # native resolution: one grid per image shape
    lengths = inputs["attention_mask"].sum(dim=1).tolist()
    assert len(set(lengths)) > 1 and inputs["attention_mask"][:, -1].all()  # padded on the left


def test_instruction_models_take_any_style_and_need_a_prompt(tiny_model):
    backend = _backend(tiny_model, "llava")
    assert backend.instructions and backend.modes == ("*",)
    assert backend.tag_modes == frozenset()
    text = backend.prompt_text(INSTRUCTION)
    # The image sits inside the user turn, and the assistant turn is opened for the answer.
    assert text.index("<image>") < text.index(INSTRUCTION) < text.rindex("assistant")
    # The template writes the BOS; the tokenizer must not add a second one.
    ids = backend.prepare(_images()[:1], "*", INSTRUCTION)["tensors"]["input_ids"][0].tolist()
    assert ids.count(backend.tokenizer.bos_token_id) == 1
    with pytest.raises(BackendError, match="needs a prompt"):
        backend.prepare(_images(), "*", None)
    assert caption_images(backend, _images()[:1], "*", SETTINGS, prompt="List the colours.")


def test_processor_from_parts_without_torchvision(tiny_model):
    # Qwen's AutoProcessor needs torchvision for its video processor; the backend built it from parts.
    import transformers

    qwen = _backend(tiny_model, "qwen2-vl")
    assert isinstance(qwen.processor, transformers.Qwen2VLProcessor)
    assert qwen.processor.chat_template == (tiny_model("qwen2-vl") / "chat_template.jinja").read_text()
    # The same path for Idefics3 (SmolVLM) gives what AutoProcessor gives.
    folder = tiny_model("idefics3")
    parts = processor_from_parts(folder, "idefics3")
    parts.tokenizer.padding_side = "left"
    auto = _backend(tiny_model, "idefics3")
    text = [auto.prompt_text(INSTRUCTION)] * 2
    images = [[image] for image in _images()[:2]]
    expected = auto.processor(
        text=text, images=images, padding=True, add_special_tokens=False, return_tensors="pt"
    )
    got = parts(text=text, images=images, padding=True, add_special_tokens=False, return_tensors="pt")
    assert got["input_ids"].tolist() == expected["input_ids"].tolist()
    assert (got["pixel_values"] == expected["pixel_values"]).all()


def test_qwen3_vl_processor_from_parts_gives_its_mrope_inputs(tiny_model):
    # Qwen3-VL's processor (video slot, so built from parts here) marks image tokens in mm_token_type_ids,
    # which the model needs for its 3D rope.
    import transformers

    qwen3 = _backend(tiny_model, "qwen3-vl")
    assert isinstance(qwen3.processor, transformers.Qwen3VLProcessor)
    tensors = qwen3.prepare(_images()[:1], "*", INSTRUCTION)["tensors"]
    image_tokens = tensors["input_ids"] == qwen3.model.config.image_token_id
    assert image_tokens.any() and (tensors["mm_token_type_ids"].bool() == image_tokens).all()


def test_paligemma_captions_with_its_task_prompt(tiny_model):
    backend = _backend(tiny_model, "paligemma")
    assert not backend.instructions and backend.modes == ("caption",)
    assert backend.prompt_text("caption en") == "<image>caption en"
    with pytest.raises(BackendError, match="cannot caption in mode 'detailed'"):
        backend.prepare(_images(), "detailed", None)
    # A user prompt is PaliGemma's prompt.
    assert all(caption_images(backend, _images(), "caption", SETTINGS, prompt="caption de"))


def test_quantized_loading_needs_cuda(tiny_model):
    with pytest.raises(BackendError, match="CUDA GPU"):
        ChatVLMBackend(tiny_model("llava"), "llava", choose_placement("cpu"), quant="4bit")
