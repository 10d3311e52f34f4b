"""CLIPScore with the tiny CLIP and SigLIP checkpoints: equal to transformers computed directly, cached."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import write_images
from PIL import Image

from loracap.hub import ModelUnavailable
from loracap.quality.clipscore import clip_scores, lowest_first

ARCHS = ["clip", "siglip-clip"]
LONG = " ".join(["a red car parked next to a wooden house"] * 20)  # > 77 tokens for either tokenizer


def _pairs(folder: Path, n: int = 5) -> list[tuple[Path, str]]:
    # 48x40: smaller than twice the 32 px input, so loracap decodes it at full size, as PIL does directly.
    paths = write_images(folder, [f"img{i}.png" for i in range(n)])
    captions = ["a photo of a cat", "a dog running on the beach", "1girl, solo, smile", "a robot", LONG]
    return [(p, captions[i % len(captions)]) for i, p in enumerate(paths)]


def _direct_cosine(model_dir: Path, path: Path, caption: str) -> float:
    """Reference: one pair through AutoModel/AutoProcessor, get_*_features, normalised dot product."""
    import torch
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    siglip = model.config.model_type == "siglip"
    window = model.config.text_config.max_position_embeddings
    text = processor.tokenizer(
        [caption],
        padding="max_length" if siglip else False,
        truncation=True,
        max_length=window,
        return_tensors="pt",
    )
    pixels = processor.image_processor(images=[Image.open(path).convert("RGB")], return_tensors="pt")
    with torch.no_grad():
        image = model.get_image_features(**pixels)
        words = model.get_text_features(**text)
    # transformers 5 returns output objects whose pooler_output is the projected embedding
    image = image if isinstance(image, torch.Tensor) else image.pooler_output
    words = words if isinstance(words, torch.Tensor) else words.pooler_output
    return float(torch.nn.functional.cosine_similarity(image, words)[0])


@pytest.mark.parametrize("arch", ARCHS)
def test_scores_equal_direct_transformers_computation(tiny_model, tmp_path: Path, arch: str) -> None:
    model_dir = tiny_model(arch)
    pairs = _pairs(tmp_path)
    run = clip_scores(pairs, model=str(model_dir), batch_size=2, workers=2, cache=False, progress=False)
    assert run.computed == len(pairs) and run.cached == 0 and run.failed == 0
    assert [(p.path, p.caption) for p in run.pairs] == pairs  # input order
    for pair in run.pairs:
        expected = _direct_cosine(model_dir, pair.path, pair.caption)
        assert pair.cosine == pytest.approx(expected, abs=1e-5)
        assert pair.score == pytest.approx(100 * max(expected, 0.0), abs=1e-3)
        assert 0.0 <= pair.score <= 100.0
        assert pair.truncated == (pair.caption == LONG)
    assert run.truncated == 1


def test_cache_scores_only_what_changed(tiny_model, tmp_path: Path) -> None:
    model = str(tiny_model("clip"))
    pairs = _pairs(tmp_path / "images")
    cache = tmp_path / "out" / "clipscore-cache.json"

    first = clip_scores(pairs, model=model, cache_path=cache, progress=False)
    assert (first.computed, first.cached) == (5, 0) and cache.is_file()

    again = clip_scores(pairs, model=model, cache_path=cache, progress=False)
    assert (again.computed, again.cached) == (0, 5)
    assert [p.score for p in again.pairs] == [p.score for p in first.pairs]
    assert [p.truncated for p in again.pairs] == [p.truncated for p in first.pairs]
    assert all(p.cached for p in again.pairs)

    # One caption edited, one image file rewritten with other pixels: exactly those two are scored again.
    pairs[1] = (pairs[1][0], "a dog sleeping on a sofa")
    Image.new("RGB", (48, 40), (250, 10, 10)).save(pairs[3][0])
    changed = clip_scores(pairs, model=model, cache_path=cache, progress=False)
    assert (changed.computed, changed.cached) == (2, 3)
    assert [p.cached for p in changed.pairs] == [True, False, True, False, True]
    fresh = clip_scores(pairs, model=model, cache=False, progress=False)
    assert [p.score for p in changed.pairs] == pytest.approx([p.score for p in fresh.pairs], abs=1e-4)

    # Another model never reuses these entries.
    other = clip_scores(pairs, model=str(tiny_model("siglip-clip")), cache_path=cache, progress=False)
    assert (other.computed, other.cached) == (5, 0)


def test_known_digests_are_not_hashed_again(tiny_model, tmp_path: Path, monkeypatch) -> None:
    from loracap.inputs import file_sha256
    from loracap.quality import clipscore

    model = str(tiny_model("clip"))
    pairs = _pairs(tmp_path / "images")
    cache = tmp_path / "clipscore-cache.json"
    first = clip_scores(pairs, model=model, cache_path=cache, progress=False)
    digests = {path: file_sha256(path) for path, _ in pairs[:4]}
    read: list[Path] = []
    monkeypatch.setattr(clipscore, "file_sha256", lambda path: read.append(path) or file_sha256(path))
    again = clip_scores(pairs, model=model, cache_path=cache, progress=False, digests=digests)
    # Only the file without a known digest is read; the given digests make the same cache keys.
    assert read == [pairs[4][0]]
    assert (again.computed, again.cached) == (0, 5)
    assert [p.score for p in again.pairs] == [p.score for p in first.pairs]


def test_broken_images_are_per_file_errors(tiny_model, tmp_path: Path) -> None:
    pairs = _pairs(tmp_path, n=3)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    bad = [(tmp_path / "empty.png", "a cat"), (tmp_path / "text.jpg", "a dog"), (tmp_path / "gone.png", "x")]
    run = clip_scores(
        [pairs[0], *bad, *pairs[1:]], model=str(tiny_model("clip")), batch_size=2, cache=False, progress=False
    )
    assert run.failed == 3 and run.computed == 3
    assert [p.path.name for p in run.errors] == ["empty.png", "text.jpg", "gone.png"]
    assert all(p.score is None and p.error for p in run.errors)
    assert all(p.score is not None for p in run.pairs if p not in run.errors)
    # Errors are left out of the ranking. (With a cache, a file that cannot be decoded is remembered by its
    # digest, so a re-run does not load the model for it; a missing file has no digest and is tried again.)
    assert len(lowest_first(run.pairs)) == 3


def test_a_pair_that_breaks_the_model_fails_alone(tiny_model, tmp_path: Path, monkeypatch) -> None:
    from loracap.quality import clipscore

    model = str(tiny_model("clip"))
    pairs = _pairs(tmp_path)
    pairs[2] = (pairs[2][0], "BREAK")
    reference = clip_scores(pairs[:2] + pairs[3:], model=model, batch_size=4, cache=False, progress=False)
    real = clipscore._Scorer.compute
    seen: list[int] = []

    def cosines(self, captions, pixels):
        seen.append(len(captions))
        if "BREAK" in captions:
            raise RuntimeError("boom")
        assert len(pixels["pixel_values"]) == len(captions)  # each pair with its own image
        return real(self, captions, pixels)

    monkeypatch.setattr(clipscore._Scorer, "compute", cosines)
    run = clip_scores(pairs, model=model, batch_size=4, cache=False, progress=False)
    # The failing batch of 4 is retried pair by pair; the last batch holds the fifth pair only.
    assert seen == [4, 1, 1, 1, 1, 1]
    assert [p.error for p in run.errors] == ["RuntimeError: boom"] and run.errors[0].caption == "BREAK"
    scored = [p for p in run.pairs if p.error is None]
    assert [p.score for p in scored] == pytest.approx([p.score for p in reference.pairs], abs=1e-4)


def test_lowest_first(tiny_model, tmp_path: Path) -> None:
    pairs = _pairs(tmp_path)
    run = clip_scores(pairs, model=str(tiny_model("clip")), cache=False, progress=False)
    ranked = run.lowest_first()
    scores = [p.score for p in ranked]
    assert scores == sorted(scores) and len(ranked) == len(pairs)
    assert ranked == lowest_first(reversed(run.pairs))


def test_default_cache_path_follows_loracap_cache(tmp_path: Path, monkeypatch) -> None:
    from loracap.backends.florence2_convert import converted_cache_root
    from loracap.quality.clipscore import default_cache_path

    monkeypatch.setenv("LORACAP_CACHE", str(tmp_path))
    assert default_cache_path() == tmp_path / "clipscore-cache.json"
    assert converted_cache_root() == tmp_path / "converted"  # one cache folder for all of loracap
    monkeypatch.setenv("LORACAP_CACHE", "")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_path() == tmp_path / "home" / ".cache" / "loracap" / "clipscore-cache.json"


def test_offline_hub_model_gives_the_one_line_fix(tmp_path: Path) -> None:
    pairs = _pairs(tmp_path, n=1)
    with pytest.raises(ModelUnavailable, match="offline mode is on") as info:
        clip_scores(pairs, cache=False, progress=False)  # the default openai/clip-vit-large-patch14
    assert "openai/clip-vit-large-patch14" in str(info.value) and "\n" not in str(info.value)
