"""`loracap explain`: where an encoder-decoder captioner looked for each word it wrote, on tiny random-weight
BLIP, ViT-GPT2 and Florence-2 models (the real architectures and processors)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from loracap.backends import GenerationSettings
from loracap.cli import main
from loracap.quality.explain import Explainer, explain_files, group_words, overlay, word_heat

pytestmark = pytest.mark.usefixtures("one_thread")

# Random tiny models often stop at once; a few forced tokens give every caption words to explain.
SETTINGS = GenerationSettings(min_new_tokens=3, max_new_tokens=8)
ARCHS = ["blip", "vit-gpt2", "florence2"]


def texture(seed: int, size: tuple[int, int] = (80, 64)) -> Image.Image:
    """Random blocks: patches that differ, so the attention over them is not flat."""
    cells = np.random.default_rng(seed).integers(0, 256, (8, 10, 3), dtype=np.uint8)
    return Image.fromarray(cells).resize(size, Image.NEAREST)


def patch_grid_of(arch: str, explainer: Explainer, image: Image.Image) -> tuple[int, int]:
    """The patch grid as the model's own config (ViT, BLIP) or vision tower (Florence-2's DaViT) has it."""
    net = explainer.backend.model
    if arch == "blip":
        vision = net.config.vision_config
        return (vision.image_size // vision.patch_size,) * 2
    if arch == "vit-gpt2":
        encoder = net.config.encoder
        return (encoder.image_size // encoder.patch_size,) * 2
    pixels = explainer.backend.prepare([image], "caption")["pixel_values"]
    return tuple(net.model.vision_tower(pixels).last_hidden_state.shape[-2:])


@pytest.mark.parametrize("arch", ARCHS)
def test_each_word_gets_a_map_over_the_patch_grid_that_sums_to_one(tiny_model, arch):
    explainer = Explainer(str(tiny_model(arch)), device="cpu")
    image = texture(1)
    shown = explainer.explain(image, settings=SETTINGS)

    assert shown.grid == patch_grid_of(arch, explainer, image)
    assert shown.words, shown.caption
    for word in shown.words:
        assert word.heat.shape == shown.grid
        assert word.heat.min() >= 0 and word.heat.sum() == pytest.approx(1, abs=1e-5)
        # Each subword token's map sums to 1 over the patches alone (no [CLS], no prompt text), and the
        # word's is their mean: every token of a word counts the same.
        assert len(word.token_heat) == len(word.tokens)
        assert [t.sum() for t in word.token_heat] == pytest.approx([1] * len(word.tokens), abs=1e-5)
        assert word.heat == pytest.approx(np.mean(word.token_heat, axis=0), abs=1e-6)
    # The words are the caption's, and the caption is the one `loracap caption` writes with these settings.
    assert [w.word for w in shown.words] == shown.caption.split()
    backend = explainer.backend
    assert shown.caption == backend.generate(backend.prepare([image], "caption"), SETTINGS)[0]


@pytest.mark.parametrize("arch", ARCHS)
def test_subword_tokens_are_grouped_into_the_captions_words(tiny_model, arch):
    explainer = Explainer(str(tiny_model(arch)), device="cpu")
    tokenizer = explainer.tokenizer
    text = "a redhat, photographed outdoors in snowfall"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    groups = group_words(tokenizer, ids)
    assert [word for word, _ in groups] == text.split()
    assert any(len(members) > 1 for _, members in groups)  # the tiny vocabularies split long words
    assert [i for _, members in groups for i in members] == list(range(len(ids)))


def test_a_words_map_is_the_renormalised_mean_of_its_tokens():
    first, second = np.zeros(4), np.zeros(4)
    first[0], second[3] = 1.0, 1.0
    assert word_heat([first, second]).tolist() == [0.5, 0, 0, 0.5]
    unnormalised = word_heat([[2.0, 2.0, 0.0, 0.0]])
    assert unnormalised.tolist() == [0.5, 0.5, 0, 0]


def test_the_heatmap_is_drawn_where_the_model_looked():
    """A map hot in its top-right cell colours the top-right of the image, not another corner."""
    heat = np.zeros((2, 3))
    heat[0, 2] = 1.0
    drawn = np.asarray(overlay(Image.new("RGB", (90, 60), (128, 128, 128)), heat).convert("L"), dtype=float)
    top_right, bottom_left = drawn[:20, 70:].mean(), drawn[40:, :20].mean()
    assert top_right > bottom_left + 60


def test_layers_pick_the_decoder_layers_averaged(tiny_model, tmp_path):
    """A two-layer decoder: each layer alone gives its own maps, and every layer together is the default."""
    from transformers import VisionEncoderDecoderConfig, VisionEncoderDecoderModel

    folder = tmp_path / "vit-gpt2-2-layers"
    shutil.copytree(tiny_model("vit-gpt2"), folder)
    config = VisionEncoderDecoderConfig.from_pretrained(folder)
    config.decoder.n_layer = 2
    VisionEncoderDecoderModel(config).save_pretrained(folder)

    explainer = Explainer(str(folder), device="cpu")
    image = texture(2)
    maps = {
        layers: np.stack([w.heat for w in explainer.explain(image, layers=layers, settings=SETTINGS).words])
        for layers in [(0,), (1,), (0, 1), (-1,), None]
    }
    assert not np.allclose(maps[(0,)], maps[(1,)])
    assert np.allclose(maps[(-1,)], maps[(1,)])
    assert np.allclose(maps[None], maps[(0, 1)])
    with pytest.raises(ValueError, match="2 layer"):
        explainer.explain(image, layers=(2,), settings=SETTINGS)


def test_cli_writes_the_png(tiny_model, tmp_path, capsys):
    photo = tmp_path / "photo.jpg"
    texture(3, (120, 90)).save(photo)
    out = tmp_path / "out" / "photo.png"
    args = ["explain", str(photo), "--model", str(tiny_model("florence2")), "--out", str(out), "--tile", "64"]
    assert main([*args, "--min-new-tokens", "3", "--max-new-tokens", "4", "--quiet"]) == 0
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "over 2x2 patches" in line and line.endswith(str(out))

    picture = Image.open(out)
    assert picture.format == "PNG"
    # The image, then one heatmap per word: at least two tiles of 64 px side by side, under the caption.
    assert picture.width >= 2 * 64 and picture.height > 64
    pixels = np.asarray(picture.convert("RGB"), dtype=int)
    plain, heat = pixels[-76:-36, 8:72], pixels[-76:-36, 80:144]  # the first two tiles (one row)
    assert np.abs(plain - heat).mean() > 10  # the word's tile is coloured, not the image again


def test_cli_refuses_what_it_cannot_explain(tiny_model, tmp_path, capsys):
    photo = tmp_path / "photo.png"
    texture(4).save(photo)
    (tmp_path / "notes.png").write_bytes(b"not an image")
    cases = [
        (["--model", str(tiny_model("clip"))], "explain reads the decoder's cross-attention"),
        (["--model", str(tiny_model("blip")), "--layers", "1"], "the decoder has 1 layer"),
        (["--model", str(tiny_model("blip")), "--layers", "last"], "give layer numbers"),
        (["--model", str(tiny_model("blip")), "--mode", "tags"], "cannot caption in mode 'tags'"),
    ]
    for extra, message in cases:
        assert main(["explain", str(photo), "--out", str(tmp_path / "x.png"), *extra, "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("loracap: error:") and "\n" not in err and message in err, err
    assert main(["explain", str(tmp_path / "notes.png"), "--model", str(tmp_path / "nowhere")]) == 2
    assert "cannot be decoded" in capsys.readouterr().err  # said before any model is looked for
    assert not (tmp_path / "x.png").exists()


def test_explain_files_writes_one_png_per_image_and_lists_the_ones_it_cannot_read(tiny_model, tmp_path):
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    texture(5).save(root / "sub" / "a.png")
    texture(6).save(root / "b.jpg")
    (root / "broken.jpg").write_bytes(b"")
    explainer = Explainer(str(tiny_model("vit-gpt2")), device="cpu")
    wanted = ["sub/a.png", "broken.jpg", "b.jpg"]
    done = explain_files(explainer, root, wanted, tmp_path / "out", settings=SETTINGS)
    assert sorted(done.files) == ["b.jpg", "sub/a.png"] and list(done.errors) == ["broken.jpg"]
    assert len(set(done.files.values())) == 2
    for name in done.files.values():
        assert Image.open(tmp_path / "out" / name).format == "PNG"


def test_the_editor_shows_it_for_the_focused_image(tmp_path, tiny_model, browser):
    """`loracap edit --explain-model`: the page's button draws the focused image's explanation."""
    pytest.importorskip("uvicorn")
    from playwright.sync_api import expect
    from test_edit_browser import PROSE, card_ids, dataset, open_page, serving, wait_for

    root = dataset(tmp_path / "data", PROSE)
    with serving(root, explain_model=str(tiny_model("vit-gpt2")), device="cpu") as (base, token):
        wait_for(base, token, "indexed")
        page, problems = open_page(browser, base, token)
        expect(page.locator("#grid > li")).to_have_count(4)
        button, status = page.get_by_test_id("explain-start"), page.get_by_test_id("explain-status")
        expect(button).to_be_visible()
        button.click()  # the page starts on its first card
        expect(status).to_contain_text("a.png (click the picture", timeout=30_000)
        drawn = "() => document.getElementById('explain-image').naturalWidth > 2 * 100"
        page.wait_for_function(drawn)
        first = page.get_by_test_id("explain-image").get_attribute("src")
        page.get_by_test_id(f"path-{card_ids(page)['c.png']}").click()  # another card
        button.click()
        expect(status).to_contain_text("c.png (click the picture", timeout=30_000)
        page.wait_for_function(drawn)
        assert page.get_by_test_id("explain-image").get_attribute("src") != first
        # The picture is shown from the fetched PNG in memory: a blob: address of the page's own origin.
        assert [p for p in problems if not p.startswith(f"outside: blob:{base}/")] == []
        page.close()
