"""Decoding strategies and several captions per image, on tiny models: a seed repeats sampled captions
whatever the batch, beam search keeps the N best, and every layout writes N captions that the report and
the trainers read back as alternatives."""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import GEN_ARGS, write_images
from PIL import Image

from loracap.backends import BackendError, GenerationSettings, caption_images, load_backend
from loracap.cli import main
from loracap.dataset import read_dataset

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread per test

SAMPLED = GenerationSettings(
    min_new_tokens=2, max_new_tokens=6, temperature=1.5, seed=7, captions_per_image=2
)
SAMPLING_ARGS = ["--temperature", "1.5", "--seed", "7"]


def _images() -> list[Image.Image]:
    # Different sizes: Qwen2-VL gives each its own number of patches, so a batch is padded.
    return [
        Image.new("RGB", (64, 48), "red"),
        Image.new("RGB", (30, 90), "blue"),
        Image.new("RGB", (50, 50), "white"),
        Image.new("RGB", (40, 60), "green"),
    ]


def _lines(text: str) -> list[str]:
    return text.split("\n")


def _caption(folder: Path, model: Path, *extra: str) -> int:
    return main(["caption", str(folder), "--model", str(model), *GEN_ARGS, *extra])


# --- sampling and beams -----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["blip", "florence2", "qwen2-vl"])
def test_a_seed_repeats_sampled_captions_whatever_the_batch(tiny_model, arch):
    backend = load_backend(str(tiny_model(arch)), device="cpu")
    mode, prompt = ("*", "Describe the image.") if arch == "qwen2-vl" else ("caption", None)
    images = _images()

    def caption(batch: list[Image.Image], settings: GenerationSettings = SAMPLED) -> list[str]:
        return caption_images(backend, batch, mode, settings, prompt)

    together = caption(images)
    assert all(len(_lines(c)) == 2 for c in together)  # captions_per_image: two per image
    assert caption(images) == together  # run to run
    assert [caption([image])[0] for image in images] == together  # each image alone
    assert caption(images[::-1])[::-1] == together  # in another order, beside other images
    assert caption(images, replace(SAMPLED, seed=8)) != together  # the seed decides


def test_beams_keep_the_n_best_and_the_length_penalty_weighs_length(tiny_model):
    backend = load_backend(str(tiny_model("vit-gpt2")), device="cpu")
    images = _images()
    beams = GenerationSettings(max_new_tokens=12, num_beams=4)
    best = caption_images(backend, images, "caption", beams)
    three = caption_images(backend, images, "caption", replace(beams, captions_per_image=3))
    assert [_lines(c)[0] for c in three] == best  # the best beam first
    assert all(len(set(_lines(c))) == 3 for c in three)  # then the next two: different captions

    def total_length(penalty: float) -> int:
        captions = caption_images(backend, images, "caption", replace(beams, length_penalty=penalty))
        return sum(len(c) for c in captions)

    assert total_length(5.0) > total_length(-5.0)  # above 1 favours long captions, below short ones


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--captions-per-image", "3"], "--captions-per-image 3 needs 3 different captions"),
        (["--captions-per-image", "3", "--num-beams", "2"], "--num-beams 3 or more"),
        (["--temperature", "0.8", "--num-beams", "3"], "do not mix"),
        (["--length-penalty", "2"], "--length-penalty applies to beam search only"),
        (["--temperature", "0"], "--temperature must be above 0"),
        (["--top-p", "1.5"], "--top-p must be above 0 and at most 1"),
        (
            ["--captions-per-image", "2", "--temperature", "1", "--existing", "append"],
            "--existing append joins one new caption",
        ),
    ],
)
def test_settings_no_decoder_can_follow_are_one_line_before_any_work(tmp_path, capsys, flags, message):
    write_images(tmp_path, ["a.png"])
    assert main(["caption", str(tmp_path), "--model", str(tmp_path / "no-model"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("loracap: error:") and message in err and "\n" not in err
    assert not list(tmp_path.glob("*.txt"))


def test_a_sampling_knob_asks_for_sampling():
    assert GenerationSettings(top_k=5).do_sample
    assert not GenerationSettings(seed=1).do_sample  # a seed alone keeps greedy decoding
    assert (
        GenerationSettings(num_beams=3, captions_per_image=3).generate_kwargs(8)["num_return_sequences"] == 3
    )


# --- writing N captions -----------------------------------------------------------------------------------


def test_sidecars_get_n_lines_the_same_at_any_batch_size(tmp_path, tiny_model):
    model = tiny_model("blip")
    first, second = tmp_path / "first", tmp_path / "second"
    write_images(first, ["a.png", "b.png", "c.png", "sub/d.png"])
    shutil.copytree(first, second)
    flags = [*SAMPLING_ARGS, "--captions-per-image", "3", "--trigger", "ohwx"]
    assert _caption(first, model, *flags, "--batch-size", "1") == 0
    assert _caption(second, model, *flags, "--batch-size", "3") == 0
    texts = {p.relative_to(first).as_posix(): p.read_text() for p in sorted(first.rglob("*.txt"))}
    assert len(texts) == 4
    for name, text in texts.items():
        lines = _lines(text)
        assert len(lines) == len(set(lines)) == 3  # three different captions
        assert all(line.startswith("ohwx") for line in lines)  # each cleaned up as a caption of its own
        assert (second / name).read_text() == text  # the batch size changes nothing
    record = read_dataset(first).records[0]
    assert record.lines == _lines(texts["a.txt"])  # read back as alternatives


def test_jsonl_holds_a_record_per_caption_that_imagefolder_loads(tmp_path, tiny_model):
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    data = tmp_path / "data"
    write_images(data, ["a.png", "b.png", "sub/c.png"])
    model = tiny_model("blip")
    assert _caption(data, model, *SAMPLING_ARGS, "--captions-per-image", "3", "--format", "jsonl") == 0
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in rows] == ["a.png"] * 3 + ["b.png"] * 3 + ["sub/c.png"] * 3

    loaded = datasets.load_dataset("imagefolder", data_dir=str(data), cache_dir=str(tmp_path / "hf"))["train"]
    assert loaded.num_rows == 9 and loaded.features["text"].dtype == "string"  # an example per caption
    assert sorted(loaded["text"]) == sorted(r["text"] for r in rows)
    by_image = {r.key: r.lines for r in read_dataset(data).records}
    assert by_image["a.png"] == [r["text"] for r in rows[:3]]

    # Captioned again with two: each image's records are replaced, none left over from the first run.
    flags = [*SAMPLING_ARGS, "--seed", "8", "--captions-per-image", "2", "--format", "jsonl"]
    assert _caption(data, model, *flags, "--existing", "overwrite") == 0
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in rows] == ["a.png"] * 2 + ["b.png"] * 2 + ["sub/c.png"] * 2
    assert (
        datasets.load_dataset("imagefolder", data_dir=str(data), cache_dir=str(tmp_path / "hf2"))[
            "train"
        ].num_rows
        == 6
    )


def test_kohya_json_caption_holds_the_lines_and_the_run_says_what_sd_scripts_needs(
    tmp_path, tiny_model, capsys
):
    write_images(tmp_path, ["a.png", "b.png"])
    flags = [*SAMPLING_ARGS, "--captions-per-image", "2", "--format", "kohya-json"]
    assert _caption(tmp_path, tiny_model("blip"), *flags) == 0
    entries = json.loads((tmp_path / "meta_cap.json").read_text())
    assert all(len(_lines(entry["caption"])) == 2 for entry in entries.values())
    assert "--enable_wildcard" in capsys.readouterr().err
    assert all(len(record.lines) == 2 for record in read_dataset(tmp_path).records)


def test_a_tagger_refuses_several_captions(tiny_model):
    pytest.importorskip("onnxruntime")
    tagger = load_backend(str(tiny_model("wd-tagger")))
    settings = GenerationSettings(temperature=1.0, captions_per_image=2)
    with pytest.raises(BackendError, match="one tag list per image"):
        caption_images(tagger, _images()[:1], "tags", settings)


def test_a_remote_model_samples_one_seeded_request_per_caption(tiny_model):
    pytest.importorskip("fastapi")
    from test_serve import _uvicorn

    from loracap.backends.openai_remote import OpenAIRemoteBackend
    from loracap.serve import create_app

    blip = load_backend(str(tiny_model("blip")), device="cpu")
    # The server's beam search gives way to a request that samples.
    app = create_app(blip, generation=GenerationSettings(max_new_tokens=6, min_new_tokens=2, num_beams=2))
    images = _images()[:2]
    with (
        _uvicorn(app) as base,
        OpenAIRemoteBackend("tiny", f"{base}/v1", api_key_env="LORACAP_NO_KEY") as remote,
    ):
        captions = caption_images(remote, images, "*", SAMPLED)
        assert all(len(_lines(c)) == 2 for c in captions)
        assert caption_images(remote, images, "*", SAMPLED) == captions
        assert caption_images(remote, images, "*", replace(SAMPLED, seed=8)) != captions
        with pytest.raises(BackendError, match="by sampling"):
            caption_images(remote, images, "*", GenerationSettings(num_beams=2, captions_per_image=2))


# --- reading N captions as alternatives -------------------------------------------------------------------


def test_the_report_checks_each_line_as_a_caption(tmp_path, tiny_model):
    medium = "ohwx, a cat " + " ".join(["on a red mat"] * 8)  # ~50 CLIP tokens: two fit no 77-token window
    write_images(tmp_path, ["a.png", "b.png", "c.png"])
    (tmp_path / "a.txt").write_text(f"{medium}\n{medium} too")
    (tmp_path / "b.txt").write_text("ohwx, a red square\na red square without it")
    (tmp_path / "c.txt").write_text("ohwx, " + ", ".join(f"word{i}" for i in range(30)))
    out = tmp_path / "out"
    argv = ["report", str(tmp_path), "--clip-model", str(tiny_model("clip")), "--out", str(out)]
    assert main([*argv, "--trigger", "ohwx", "--no-images", "--quiet"]) == 0
    pairs = {p["path"]: p for p in json.loads((out / "report.json").read_text())["pairs"]}
    assert not pairs["a.png"]["truncated"] and pairs["c.png"]["truncated"]  # each line is a caption
    assert pairs["a.png"]["tokens"] < 77
    assert pairs["b.png"]["trigger"] == "missing" and pairs["a.png"]["trigger"] == "ok"  # a line lacks it
    for name in ("a.png", "b.png"):  # the mean of its lines, each scored alone
        lines = pairs[name]["clip_lines"]
        assert len(lines) == 2 and pairs[name]["clip"] == pytest.approx(sum(lines) / 2, abs=0.01)
    assert "clip_lines" not in pairs["c.png"]


def test_dreambooth_draws_one_line_per_step_with_the_trigger_on_each(tmp_path):
    from loracap.dreambooth.cache import text_cache_plan
    from loracap.dreambooth.captions import read_instances, training_caption

    write_images(tmp_path, ["a.png"])
    (tmp_path / "a.txt").write_text("a red cat\nohwx, a cat on a mat\n\na sleeping cat")
    caption = read_instances(tmp_path, trigger="ohwx", instance_prompt=None).items[0].caption
    assert _lines(caption) == ["ohwx, a red cat", "ohwx, a cat on a mat", "ohwx, a sleeping cat"]

    def draw(seed: int) -> str:
        return training_caption(
            caption, random.Random(seed), tags=False, dropout=0.0, shuffle=False, keep_tokens=0
        )

    drawn = [draw(seed) for seed in range(40)]
    assert set(drawn) == set(_lines(caption))  # one line a step, every line in time
    assert drawn == [draw(seed) for seed in range(40)]  # the step's seed decides: a resume draws the same
    config = SimpleNamespace(
        cache_text=True, train_text_encoder=False, shuffle_tags=False, caption_dropout=0.0, class_prompt=None
    )
    texts, _ = text_cache_plan(config, [caption])
    assert texts == sorted(_lines(caption))  # the text cache holds what a step trains with


def test_train_draws_a_line_per_epoch_and_scores_against_every_line(tmp_path, tiny_model):
    from transformers import AutoImageProcessor

    from loracap.train.batches import CaptionDataset, EpochSampler
    from loracap.train.data import load_examples

    write_images(tmp_path, ["a.png", "b.png"])
    (tmp_path / "a.txt").write_text("first\nsecond\nthird")
    (tmp_path / "b.txt").write_text("only one")
    examples = load_examples(tmp_path)
    assert [e.references for e in examples] == [["first", "second", "third"], ["only one"]]
    processor = AutoImageProcessor.from_pretrained(tiny_model("vit-gpt2"))

    def epochs(seed: int) -> list[dict[str, str]]:
        dataset, sampler = CaptionDataset(examples, processor), EpochSampler(len(examples), seed)
        seen = []
        for epoch in range(20):
            sampler.set_epoch(epoch)
            seen.append({examples[i % 2].key: dataset[i]["caption"] for i in sampler})
        return seen

    run = epochs(seed=0)
    assert {e["b.png"] for e in run} == {"only one"}
    assert {e["a.png"] for e in run} == {"first", "second", "third"}  # a line per epoch, each in time
    assert epochs(seed=0) == run  # a resumed run draws the same lines
    assert epochs(seed=1) != run
