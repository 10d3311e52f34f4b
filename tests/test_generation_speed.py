"""Per-step generation costs removed without changing a caption: the suppress mask built once, static cache.

Every check compares token for token with what transformers' own path gives (`suppress_tokens=`, the
dynamic cache), for a batch and for each image alone.
"""

from __future__ import annotations

import functools

import pytest
import torch
from PIL import Image

from loracap.backends import GenerationSettings
from loracap.backends.base import SuppressTokens
from loracap.backends.chat_vlm import ChatVLMBackend
from loracap.backends.device import choose_placement
from loracap.backends.florence2 import Florence2Backend

FIXED = GenerationSettings(max_new_tokens=8, min_new_tokens=8)  # the benchmarks' fixed length
FREE = GenerationSettings(max_new_tokens=8)  # may stop early: the end token is not suppressed
SAMPLED = GenerationSettings(max_new_tokens=8, do_sample=True, temperature=0.7, top_p=0.9)

_loaded: dict[str, object] = {}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread per test


def _florence(tiny_model) -> Florence2Backend:
    if "florence2" not in _loaded:
        _loaded["florence2"] = Florence2Backend(tiny_model("florence2"), "florence2", choose_placement("cpu"))
    return _loaded["florence2"]


def _images(n: int = 3) -> list[Image.Image]:
    sizes = [(64, 48), (30, 90), (50, 50), (80, 20)]
    return [Image.new("RGB", sizes[i % 4], ((70 * i) % 256, 90, 200 - 30 * i)) for i in range(n)]


def _florence_tokens(backend: Florence2Backend, images: list, settings: GenerationSettings, **suppress):
    """The caption-only tokens from `generate`, suppressing as `suppress` says (seeded when sampling)."""
    inputs = backend.prepare(images, "caption")
    kwargs = settings.generate_kwargs(64)
    prefix = backend.prefix_ids.expand(len(images), -1)
    torch.manual_seed(0)
    with torch.inference_mode():
        return backend.model.generate(
            input_ids=inputs["input_ids"],
            pixel_values=inputs["pixel_values"],
            decoder_input_ids=prefix,
            forced_bos_token_id=None,
            **kwargs,
            **suppress,
        ).tolist()


@pytest.mark.parametrize("settings", [FIXED, FREE, SAMPLED], ids=["fixed", "free", "sampled"])
def test_florence2_cached_mask_writes_what_suppress_tokens_writes(tiny_model, settings):
    backend = _florence(tiny_model)
    images = _images()
    stock = {"suppress_tokens": backend.non_caption_ids}
    ours = {"logits_processor": [backend.suppress]}
    batch = _florence_tokens(backend, images, settings, **ours)
    assert batch == _florence_tokens(backend, images, settings, **stock)
    for image in images:  # one at a time too
        alone = _florence_tokens(backend, [image], settings, **ours)
        assert alone == _florence_tokens(backend, [image], settings, **stock)
    # The suppression is exercised: left alone, this random model writes location tokens.
    suppressed = set(backend.non_caption_ids)
    free = _florence_tokens(backend, images, settings)
    assert any(t in suppressed for row in free for t in row[len(backend.decoder_prefix) :])


def test_florence2_backend_batch_equals_one_at_a_time_and_the_stock_path(tiny_model):
    backend = _florence(tiny_model)
    images = _images()
    batch = backend.generate(backend.prepare(images, "caption"), FIXED)
    alone = [backend.generate(backend.prepare([image], "caption"), FIXED)[0] for image in images]
    stock = _florence_tokens(backend, images, FIXED, suppress_tokens=backend.non_caption_ids)
    texts = [t.strip() for t in backend.processor.batch_decode(stock, skip_special_tokens=True)]
    assert batch == alone == texts


def test_the_mask_is_built_once_across_steps_and_batches(tiny_model, monkeypatch):
    backend = _florence(tiny_model)
    backend.suppress._masks.clear()
    built = []
    build = SuppressTokens._build
    monkeypatch.setattr(SuppressTokens, "_build", lambda self, *a: built.append(a) or build(self, *a))
    for n in (1, 3, 2):  # three batches of 8 steps each, in different batch sizes
        backend.generate(backend.prepare(_images(n), "caption"), FIXED)
    assert len(built) == 1
    vocab = backend.model.get_output_embeddings().out_features
    assert built == [(vocab, torch.device("cpu"))]


def test_suppress_tokens_ignores_ids_outside_the_vocabulary():
    scores = torch.zeros(2, 5)
    out = SuppressTokens([4, 1, 7, -1, 1])(torch.zeros(2, 1, dtype=torch.long), scores)
    assert out[0].tolist() == [0, float("-inf"), 0, 0, float("-inf")]
    assert scores.eq(0).all()  # not in place: generate may keep the raw logits


def test_paligemma_cached_mask_writes_what_suppress_tokens_writes(tiny_model):
    backend = ChatVLMBackend(tiny_model("paligemma"), "paligemma", choose_placement("cpu"))
    assert backend.non_caption_ids
    batch = backend.generate(backend.prepare(_images(), "caption"), FIXED)
    alone = [backend.generate(backend.prepare([image], "caption"), FIXED)[0] for image in _images()]
    inputs = backend.prepare(_images(), "caption")["tensors"]
    with torch.inference_mode():
        stock = backend.model.generate(
            **inputs,
            **FIXED.generate_kwargs(64),
            pad_token_id=backend.tokenizer.pad_token_id,
            suppress_tokens=backend.non_caption_ids,
        )
    new = stock[:, inputs["input_ids"].shape[1] :]
    texts = [t.strip() for t in backend.tokenizer.batch_decode(new, skip_special_tokens=True)]
    assert batch == alone == texts


def test_florence2_static_cache_writes_what_the_dynamic_cache_writes(tiny_model, monkeypatch):
    # On CUDA transformers compiles the decoder step for a static cache; on a CPU the same cache runs
    # eagerly, which checks that the path loracap turns on changes no caption.
    backend = _florence(tiny_model)
    images = _images()
    dynamic = backend.generate(backend.prepare(images, "caption"), FIXED)
    caches = set()
    forward = backend.model.forward

    @functools.wraps(forward)
    def spy(*args, **kwargs):
        caches.add(type(kwargs["cache"].self_attention_cache).__name__)
        return forward(*args, **kwargs)

    monkeypatch.setattr(backend.model, "forward", spy)
    monkeypatch.setattr(backend, "static_cache", True)
    static = backend.generate(backend.prepare(images, "caption"), FIXED)
    alone = [backend.generate(backend.prepare([image], "caption"), FIXED)[0] for image in images]
    free = backend.generate(backend.prepare(images, "caption"), FREE)
    assert caches == {"StaticCache"}
    monkeypatch.undo()
    assert static == alone == dynamic
    assert free == backend.generate(backend.prepare(images, "caption"), FREE)
