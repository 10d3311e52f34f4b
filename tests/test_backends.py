"""Each backend loads a real (tiny) checkpoint through the user's loading path and captions batches."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from loracap.backends import BackendError, GenerationSettings, caption_images, load_backend

SETTINGS = GenerationSettings(max_new_tokens=6, min_new_tokens=2)


def _images():
    # Different sizes and aspect ratios in one batch: processors must bring them to one shape.
    return [Image.new("RGB", (64, 48), "red"), Image.new("RGB", (30, 90), "blue"), Image.new("RGB", (50, 50))]


@pytest.mark.parametrize("arch", ["florence2", "blip", "vit-gpt2"])
def test_backend_captions_a_mixed_size_batch(tiny_model, arch):
    backend = load_backend(str(tiny_model(arch)), device="cpu")
    captions = caption_images(backend, _images(), "caption", SETTINGS)
    assert len(captions) == 3
    assert all(isinstance(c, str) and c for c in captions)


def test_florence2_modes_and_their_prompts(tiny_model):
    backend = load_backend(str(tiny_model("florence2")), device="cpu")
    # The stock Florence-2 tasks; PromptGen-only modes are absent from a plain checkpoint.
    assert {"caption", "detailed", "more_detailed"} <= set(backend.modes)
    assert "tags" not in backend.modes
    assert backend.task_text("caption", None) == "What does the image describe?"
    with pytest.raises(BackendError, match="cannot caption in mode 'tags'"):
        caption_images(backend, _images(), "tags", SETTINGS)
    # A raw task token passes through, so a user can reach tasks loracap has no mode for.
    assert caption_images(backend, _images()[:1], "caption", SETTINGS, prompt="<OCR>")


def test_blip_continues_a_text_prompt(tiny_model):
    backend = load_backend(str(tiny_model("blip")), device="cpu")
    captions = caption_images(backend, _images(), "caption", SETTINGS, prompt="a photo of")
    assert all(c.startswith("a photo of") for c in captions), captions


def test_modes_a_backend_cannot_do_are_refused(tiny_model):
    backend = load_backend(str(tiny_model("vit-gpt2")), device="cpu")
    with pytest.raises(BackendError, match="it can do: caption"):
        caption_images(backend, _images(), "tags", SETTINGS)
    with pytest.raises(BackendError, match="takes no prompt"):
        caption_images(backend, _images(), "caption", SETTINGS, prompt="a photo of")


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(BackendError, match="'llama' model, which loracap cannot caption with yet"):
        load_backend(str(tmp_path))


def test_a_remote_model_finds_its_server_in_openai_base_url(tiny_model, monkeypatch):
    pytest.importorskip("httpx")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(BackendError, match="or set OPENAI_BASE_URL"):
        load_backend("openai:m")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://gpu-box:8000/v1")
    assert load_backend("openai:m").api_base == "http://gpu-box:8000/v1"
    assert load_backend("openai:m", api_base="http://other:8000/v1").api_base == "http://other:8000/v1"
    # A local model has no server: the variable is not an --api-base given by mistake.
    assert load_backend(str(tiny_model("vit-gpt2")), device="cpu").modes == ("caption",)


def test_image_side_reads_any_size_form():
    from types import SimpleNamespace

    from transformers.image_processing_utils_fast import SizeDict

    from loracap.backends.device import image_side

    def side(**attributes):
        return image_side(SimpleNamespace(**attributes))

    assert side(size={"height": 384, "width": 512}) == 512
    assert side(size=SizeDict(height=768, width=768)) == 768
    assert side(size={"longest_edge": 1536, "shortest_edge": 224}) == 1536
    assert side(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}) == 224
    assert side(size=None, crop_size={"height": 336, "width": 336}) == 336
    assert side(size={}) == 0
