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
