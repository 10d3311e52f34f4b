"""WD14 / WD v3 taggers on onnxruntime, with the test kit's tiny tagger (a real ONNX graph and a
selected_tags.csv in SmilingWolf's layout): sd-scripts' preprocessing, the thresholds and tag order users
know from sd-scripts, batches equal single images, and `loracap caption` on a tagger end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("onnxruntime")

from loracap.backends import load_backend  # noqa: E402
from loracap.backends.base import GenerationSettings  # noqa: E402
from loracap.backends.wd_tagger import CHARACTER, GENERAL, RATING, _preprocess  # noqa: E402
from loracap.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def tagger(tiny_model):
    return load_backend(str(tiny_model("wd-tagger")))


def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for w, h in ((80, 50), (40, 60), (64, 64))
    ]


def test_preprocessing_is_sd_scripts(tagger):
    """BGR, padded to a square with white, at the graph's side, float32 0-255."""
    image = Image.new("RGB", (64, 32), (255, 0, 0))  # red, twice as wide as tall
    array = _preprocess(image, 64)
    assert array.shape == (64, 64, 3) and array.dtype == np.float32
    assert array[32, 32].tolist() == [0.0, 0.0, 255.0]  # red as BGR
    assert array[0, 32].tolist() == [255.0, 255.0, 255.0] and array[63, 32].tolist() == [255.0, 255.0, 255.0]
    assert tagger.image_side == 64 and tagger.prepare(images(), "tags").shape == (3, 64, 64, 3)


def test_thresholds_order_characters_and_rating(tagger):
    inputs = tagger.prepare(images()[:1], "tags")
    probabilities = tagger.session.run(None, {tagger.input_name: inputs})[0][0]
    kinds = np.array(tagger.categories)
    general = probabilities[kinds == GENERAL]
    threshold = float(np.median(general))
    character_threshold = float(np.min(probabilities[kinds == CHARACTER]))  # every character passes
    settings = GenerationSettings(general_threshold=threshold, character_threshold=character_threshold)
    tags = tagger.generate(inputs, settings)[0].split(", ")
    expected_general = [
        tagger.tags[i]
        for i in np.argsort(-probabilities)
        if kinds[i] == GENERAL and probabilities[i] >= threshold
    ]
    characters = [tagger.tags[i] for i in np.argsort(-probabilities) if kinds[i] == CHARACTER]
    assert tags == expected_general + characters  # most likely first; characters after by default
    reordered = GenerationSettings(
        general_threshold=threshold,
        character_threshold=character_threshold,
        character_tags_first=True,
        rating_tags=True,
    )
    first = tagger.generate(inputs, reordered)[0].split(", ")
    ratings = [i for i in np.argsort(-probabilities) if kinds[i] == RATING]
    assert first == [tagger.tags[ratings[0]], *characters, *expected_general]
    none = tagger.generate(inputs, GenerationSettings(general_threshold=1.01, character_threshold=1.01))[0]
    assert none == ""  # nothing passes: loracap reports an empty caption instead of writing one


def test_a_batch_tags_as_each_image_alone(tagger):
    batch = tagger.generate(tagger.prepare(images(), "tags"), GenerationSettings())
    alone = [tagger.generate(tagger.prepare([image], "tags"), GenerationSettings())[0] for image in images()]
    assert batch == alone and all(batch)


def test_caption_with_a_tagger_writes_cleaned_tags(tmp_path, tiny_model, tagger):
    data = tmp_path / "data"
    data.mkdir()
    for i, image in enumerate(images()):
        image.save(data / f"{i}.png")
    model = str(tiny_model("wd-tagger"))
    flags = ["--general-threshold", "0.3", "--rating-tags", "--underscores-to-spaces"]
    code = main(
        [
            "caption",
            str(data),
            "--model",
            model,
            *flags,
            "--remove-tags",
            "long_hair",
            "--trigger",
            "ohwx",
            "--quiet",
        ]
    )
    assert code == 0
    inputs = tagger.prepare([Image.open(data / "0.png").convert("RGB")], "tags")
    raw = tagger.generate(inputs, GenerationSettings(general_threshold=0.3, rating_tags=True))[0].split(", ")
    written = (data / "0.txt").read_text(encoding="utf-8").split(", ")
    assert written[0] == "ohwx" and written[1] in ("general", "sensitive", "questionable", "explicit")
    assert written[1:] == [t.replace("_", " ") if t != "^_^" else t for t in raw if t != "long_hair"]


def test_a_folder_without_the_tag_list_is_not_a_tagger(tmp_path, tiny_model):
    folder = tmp_path / "half"
    folder.mkdir()
    (folder / "model.onnx").write_bytes((Path(tiny_model("wd-tagger")) / "model.onnx").read_bytes())
    from loracap.backends import ModelUnavailable

    with pytest.raises(ModelUnavailable, match="selected_tags.csv"):
        load_backend(str(folder))


# --- sd-scripts' flag names, and --tagger: a tagger's tags as a chat model's {tags} ------------------------

CHAT_ARGS = ["--device", "cpu", "--min-new-tokens", "2", "--max-new-tokens", "6", "--quiet"]


def write_pngs(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i}.png" for i in range(count)]
    for path, image in zip(paths, images(), strict=False):
        image.save(path)
    return paths


def test_sd_scripts_names_remove_underscores_but_keep_kaomoji(tmp_path, tiny_model):
    """--remove-underscore and --undesired-tags, as sd-scripts' tagger spells them: every tag loses its
    underscores but kaomoji of three characters (^_^), and undesired tags are dropped in either spelling."""
    data = tmp_path / "data"
    write_pngs(data, 1)
    flags = ["--general-threshold", "0", "--remove-underscore", "--undesired-tags", "long hair,smile"]
    assert main(["caption", str(data), "--model", str(tiny_model("wd-tagger")), *flags, "--quiet"]) == 0
    written = (data / "0.txt").read_text(encoding="utf-8").strip().split(", ")
    assert "^_^" in written and "open mouth" in written and "looking at viewer" in written
    assert "long hair" not in written and "smile" not in written and "long_hair" not in written
    assert [t for t in written if "_" in t] == ["^_^"]


def _chat_captions(model: Path, paths: list[Path], prompts: list[str]) -> list[str]:
    """What the chat model writes for each image alone with its prompt, cleaned up as prose."""
    from loracap.backends import caption_images
    from loracap.inputs import load_image
    from loracap.postprocess import PostProcess, postprocess

    backend = load_backend(str(model), device="cpu")
    settings = GenerationSettings(max_new_tokens=6, min_new_tokens=2)
    out = []
    for path, prompt in zip(paths, prompts, strict=True):
        image = load_image(path, min_side=backend.image_side or None)
        raw = caption_images(backend, [image], "*", settings, prompt=prompt)[0]
        out.append(postprocess(raw, PostProcess(trigger="ohwx"), tags=False))
    return out


def _hints(tagger, paths: list[Path], threshold: float) -> list[str]:
    """The tagger's tags for each image, cleaned as --underscores-to-spaces --remove-tags solo clean them."""
    from loracap.postprocess import PostProcess, postprocess

    options = PostProcess(underscores_to_spaces=True, remove_tags=("solo",))
    settings = GenerationSettings(general_threshold=threshold)
    return [
        postprocess(
            tagger.generate(tagger.prepare([Image.open(p).convert("RGB")], "tags"), settings)[0],
            options,
            tags=True,
        )
        for p in paths
    ]


@pytest.mark.usefixtures("one_thread")
def test_tagger_tags_fill_a_chat_prompt_in_one_run(tmp_path, tiny_model, tagger):
    """`--tagger` tags each image first, and its cleaned tags (not the trigger) are the chat prompt's
    {tags}: each caption is what the chat model writes for that prompt. A file that is not an image fails
    once and the rest are captioned."""
    chat = tiny_model("llava")
    data = tmp_path / "data"
    paths = write_pngs(data, 3)
    (data / "broken.png").write_bytes(b"not a png")
    template = "Describe the image. Hints: {tags}"
    args = ["--prompt", template, "--tagger", str(tiny_model("wd-tagger")), "--general-threshold", "0.3"]
    clean = ["--underscores-to-spaces", "--remove-tags", "solo", "--trigger", "ohwx", "--batch-size", "2"]
    assert main(["caption", str(data), "--model", str(chat), *args, *clean, *CHAT_ARGS]) == 1

    hints = _hints(tagger, paths, 0.3)
    assert all(hints) and all("_" not in h.replace("^_^", "") and "solo" not in h.split(", ") for h in hints)
    want = _chat_captions(chat, paths, [template.format(tags=h) for h in hints])
    assert [p.with_suffix(".txt").read_text(encoding="utf-8") for p in paths] == want
    # The observable is real: without the hints the model writes something else.
    assert want != _chat_captions(chat, paths, ["Describe the image. Hints:"] * len(paths))
    errors = (data / "loracap-errors.jsonl").read_text().splitlines()
    assert len(errors) == 1 and '"broken.png"' in errors[0] and not (data / "broken.txt").exists()


@pytest.mark.usefixtures("one_thread")
def test_tagger_hints_a_style_without_tags_through_the_existing_tags_extra(
    tmp_path, tiny_model, tagger, capsys
):
    """A shipped style has no {tags}: the existing-tags extra carries the tags. The tagging pass has its
    own progress bar."""
    from loracap.styles import load_style, render_prompt

    chat = tiny_model("llava")
    data = tmp_path / "data"
    paths = write_pngs(data, 1)
    args = ["--style", "training-caption", "--tagger", str(tiny_model("wd-tagger")), "--trigger", "ohwx"]
    shown = [a for a in CHAT_ARGS if a != "--quiet"]
    assert main(["caption", str(data), "--model", str(chat), *args, *shown]) == 0
    assert "tagging: 100%" in capsys.readouterr().err

    tags = tagger.generate(
        tagger.prepare([Image.open(paths[0]).convert("RGB")], "tags"), GenerationSettings()
    )[0]
    prompt = render_prompt(load_style("training-caption"), extras=["existing-tags"], tags=tags)
    assert prompt.endswith(f"Use these existing tags as hints where they match the image: {tags}.")
    assert (
        paths[0].with_suffix(".txt").read_text(encoding="utf-8") == _chat_captions(chat, paths, [prompt])[0]
    )


def test_tagger_refusals_are_one_line_before_any_caption(tmp_path, tiny_model, capsys):
    data = tmp_path / "data"
    write_pngs(data, 1)
    chat, wd = str(tiny_model("llava")), str(tiny_model("wd-tagger"))

    def refused(*args: str) -> str:
        assert main(["caption", str(data), *args, *CHAT_ARGS]) == 2
        assert not (data / "0.txt").exists()
        return capsys.readouterr().err

    # A short name is SmilingWolf's tagger: offline and not downloaded, the message says what to fetch.
    assert "SmilingWolf/wd-vit-tagger-v3" in refused("--model", chat, "--tagger", "wd-vit-tagger-v3")
    assert "is not a WD tagger" in refused("--model", chat, "--tagger", chat)
    assert "--tagger cannot apply" in refused("--model", wd, "--tagger", wd)
    assert "give one of them" in refused("--model", chat, "--tagger", wd, "--tags-from", ".tags")
    from loracap.pipeline import CaptionConfig
    from loracap.request import StyleChoice

    with pytest.raises(ValueError, match="Ray engine has no tagger pass"):
        CaptionConfig(dir=data, engine="ray", style_choice=StyleChoice(tagger=wd)).check()
