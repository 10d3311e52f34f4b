"""`loracap dreambooth`'s data path on the test kit's tiny SD 1.5 and SDXL pipelines, at 32 px, a few steps,
one torch thread: kohya's aspect-ratio buckets (the same assignment `loracap report` previews, one bucket
per batch, SDXL's size and crop conditioning), the latent cache (the same training as encoding afresh, keyed
by the image's content and the VAE, never paired with another image's caption), the text cache (on while
the text encoders are frozen, off when captions change every step), and the options' refusals."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

from safetensors.torch import load_file  # noqa: E402
from test_dreambooth import settings as dreambooth_settings  # noqa: E402

from loracap.cli import main  # noqa: E402
from loracap.dataset.buckets import BucketSettings, make_bucket_resolutions  # noqa: E402
from loracap.dreambooth import families  # noqa: E402
from loracap.dreambooth.captions import read_instances  # noqa: E402
from loracap.dreambooth.data import bucket_settings, place_images  # noqa: E402
from loracap.dreambooth.loop import dreambooth  # noqa: E402
from loracap.dreambooth.settings import DreamBoothConfig, check_config  # noqa: E402
from loracap.quality.images import image_report  # noqa: E402
from loracap.testing import make_tiny_model  # noqa: E402

# Distinct, saturated colours: a uniform image keeps its colour through any resize and crop, so a batch's
# pixels say which image they are.
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread per test


COLOURS = [(220, 30, 30), (30, 30, 220), (30, 200, 30), (250, 250, 250), (20, 20, 20), (230, 200, 20)]

# At 32 px, buckets from 16 to 64 px in steps of 8: 16x48 ... 24x40, 32x32, 40x24 ... 64x16;
#   64x32 (2.0), 60x40 (1.5), 72x40 (1.8) -> 40x24 (1.67);  32x64 -> 24x40;  48x48, 40x40 -> 32x32
MIXED = {
    "wide": (64, 32),
    "wide3x2": (60, 40),
    "wider": (72, 40),
    "tall": (32, 64),
    "square": (48, 48),
    "small": (40, 40),
}
BUCKETS = {"wide": (40, 24), "wide3x2": (40, 24), "wider": (40, 24), "tall": (24, 40), "square": (32, 32),
           "small": (32, 32)}  # fmt: skip
LATENT_LINE = re.compile(r"latent cache (.+): (\d+) of (\d+) entries there, (\d+) to encode")


def images(root: Path, sizes: dict[str, tuple[int, int]], *, noise: bool = False) -> Path:
    """NAME.png of each size (a colour of its own, or seeded noise), captioned "ohwx NAME"."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (name, (width, height)) in enumerate(sizes.items()):
        if noise:
            image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        else:
            image = Image.new("RGB", (width, height), COLOURS[i % len(COLOURS)])
        image.save(root / f"{name}.png")
        (root / f"{name}.txt").write_text(f"ohwx {name}", encoding="utf-8")
    return root


def settings(data: Path, base: Path, out: Path, **overrides) -> DreamBoothConfig:
    """test_dreambooth's settings, with buckets down to 16 px (at 32 px the default minimum, 32, leaves
    only the square bucket)."""
    return dreambooth_settings(data, base, out, **{"min_bucket_reso": 16, **overrides})


@pytest.fixture
def batches(monkeypatch) -> list:
    """Every `Batch` that reaches a UNet family's loss, with the family that got it."""
    seen: list = []
    original = families.NoisePrediction.loss

    def spy(self, batch, generator):
        seen.append((self, batch))
        return original(self, batch, generator)

    monkeypatch.setattr(families.NoisePrediction, "loss", spy)
    return seen


def latent_lines(caplog) -> list[tuple[int, int, int]]:
    """(there, entries, to encode) of each "latent cache" line logged so far."""
    found = [
        LATENT_LINE.search(r.getMessage()) for r in caplog.records if r.name == "loracap.dreambooth.cache"
    ]
    return [(int(m[2]), int(m[3]), int(m[4])) for m in found if m]


def entries(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.safetensors"))


def loaded(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


# --- buckets ------------------------------------------------------------------------------------------------


def test_the_trainers_buckets_are_the_reports_preview(tmp_path, tiny_model, caplog):
    """The same folder, the same bucket options: `loracap report`'s preview, the trainer's placement and the
    line a real run logs before training agree, an EXIF-rotated photo going by its upright shape."""
    data = images(tmp_path / "data", MIXED)
    # A phone photo: stored 64x32 landscape, EXIF says rotate 90 degrees, so it is a 32x64 portrait.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (64, 32), (90, 90, 90)).save(data / "phone.jpg", exif=exif)
    (data / "phone.txt").write_text("ohwx phone", encoding="utf-8")

    config = settings(data, tiny_model("sd15"), tmp_path / "out", max_steps=1)
    bucket_options = bucket_settings(config, 32)
    assert bucket_options == BucketSettings(resolution=32, min_bucket_reso=16, max_bucket_reso=64,
                                            bucket_reso_steps=8)  # fmt: skip
    instances = read_instances(data, trigger=None, instance_prompt=None)
    placements = place_images([(i.image, *i.size) for i in instances.items], bucket_options, 32)
    trained = {i.image.stem: (p.bucket, p.resized) for i, p in zip(instances.items, placements, strict=True)}

    report = image_report(sorted(data.glob("*.*g")), buckets=bucket_options, workers=1)
    previewed = {a.path.stem: (a.bucket, a.resized) for a in report.assignments}
    assert trained == previewed
    assert {name: bucket for name, (bucket, _) in trained.items()} == {**BUCKETS, "phone": (24, 40)}

    caplog.set_level(logging.INFO, logger="loracap")
    dreambooth(config)
    logged = [r.getMessage() for r in caplog.records if r.name == "loracap.dreambooth.loop"]
    counts = ", ".join(f"{b.width}x{b.height}: {b.count}" for b in report.buckets)
    assert counts == "40x24: 3, 24x40: 2, 32x32: 2"
    assert f"3 aspect-ratio bucket(s) (resolution 32, 16-64 px in steps of 8): {counts}" in logged


def test_every_batch_holds_one_bucket_and_every_image_once_an_epoch(tmp_path, tiny_model, batches):
    """Batch size 2 over six images in three buckets: each batch's pixels are one bucket's size (the one
    each of its images belongs to), each image trains once per epoch and with its own caption; without
    buckets every batch is the resolution's square."""
    data = images(tmp_path / "data", MIXED)
    colour = {name: COLOURS[i] for i, name in enumerate(MIXED)}
    base = tiny_model("sd15")

    def check(batch, bucket_of):
        names = [caption.removeprefix("ohwx ") for caption in batch.captions]
        width, height = bucket_of(names[0])
        assert batch.target_size == (height, width)
        assert batch.pixel_values.shape == (len(names), 3, height, width)
        for name, pixels in zip(names, batch.pixel_values, strict=True):
            assert bucket_of(name) == (width, height), names
            expected = torch.tensor(colour[name]) / 127.5 - 1
            assert torch.allclose(pixels.mean(dim=(1, 2)), expected, atol=0.02), name
        return names

    dreambooth(settings(data, base, tmp_path / "out", max_steps=None, epochs=2, batch_size=2))
    # 40x24 holds three images (a batch of 2 and one of 1), 24x40 one, 32x32 two: 4 batches an epoch.
    assert len(batches) == 8
    for epoch in (batches[:4], batches[4:]):
        names = [n for _, batch in epoch for n in check(batch, BUCKETS.get)]
        assert sorted(names) == sorted(MIXED)
    assert {b.target_size for _, b in batches} == {(24, 40), (40, 24), (32, 32)}
    assert sorted(len(b.captions) for _, b in batches[:4]) == [1, 1, 2, 2]

    batches.clear()
    dreambooth(
        settings(data, base, tmp_path / "square", max_steps=None, epochs=1, batch_size=2, bucket=False)
    )
    assert len(batches) == 3
    names = [n for _, batch in batches for n in check(batch, lambda name: (32, 32))]
    assert sorted(names) == sorted(MIXED)


@pytest.mark.parametrize("cache_latents", [False, True])
def test_sdxl_is_conditioned_on_the_files_size_the_crop_and_the_bucket(
    tmp_path, tiny_model, monkeypatch, cache_latents
):
    """SDXL's six time ids per image: (height, width) of the file, (top, left) of the centre crop in the
    resized image, (height, width) of the bucket; the same from cached latents."""
    data = images(tmp_path / "data", {"wide": (64, 32), "wide3x2": (60, 40), "tall": (32, 64)}, noise=True)
    # By hand (kohya: scale the image to cover its bucket, crop the middle):
    #   wide 64x32 -> 40x24 bucket: scale 24/32 = 0.75 -> 48x24, 8 px to spare across: top 0, left 4
    #   wide3x2 60x40 -> 40x24: scale 40/60 -> 40x26.67, rounded 40x27, 3 px to spare down: top 1, left 0
    #   tall 32x64 -> 24x40: scale 24/32 = 0.75 -> 24x48, 8 px to spare down: top 4, left 0
    expected = {
        "ohwx wide": [32, 64, 0, 4, 24, 40],
        "ohwx wide3x2": [40, 60, 1, 0, 24, 40],
        "ohwx tall": [64, 32, 4, 0, 40, 24],
    }
    seen: dict[str, list[float]] = {}
    original = families.SDXL.predict

    def spy(self, noisy, timesteps, conditioning, batch):
        unet = self.denoiser

        def record(*args, **kwargs):
            for caption, row in zip(batch.captions, kwargs["added_cond_kwargs"]["time_ids"], strict=True):
                seen[caption] = row.tolist()
            return unet(*args, **kwargs)

        self.denoiser = record
        try:
            return original(self, noisy, timesteps, conditioning, batch)
        finally:
            self.denoiser = unet

    monkeypatch.setattr(families.SDXL, "predict", spy)
    dreambooth(
        settings(data, tiny_model("sdxl"), tmp_path / "out", max_steps=None, epochs=1, batch_size=2,
                 cache_latents=cache_latents)
    )  # fmt: skip
    assert seen == expected


def test_the_reports_preview_at_a_resolution_is_the_trainers_default_there(tmp_path):
    """`loracap report --resolution 768` previews, and `loracap dreambooth --resolution 768` trains, a 6:1
    panorama in the same bucket (768 px: SD 2.x-768's own side; no other bucket option given to either)."""
    path = tmp_path / "panorama.png"
    Image.new("RGB", (2304, 384), (90, 90, 90)).save(path)
    report = image_report([path], resolution=768, workers=1)
    config = DreamBoothConfig(data=str(tmp_path), base="base", out=str(tmp_path / "out"), resolution=768)
    (trained,) = place_images([(path, 2304, 384)], bucket_settings(config, 768), 768)
    assert trained.bucket == report.assignments[0].bucket


# --- the latent cache ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("random_flip", "prior"),
    [(False, False), (True, False), (True, True)],
    ids=["plain", "flip", "flip+prior"],
)
def test_cached_latents_train_as_encoding_afresh(tmp_path, tiny_model, random_flip, prior, caplog):
    """From the same seed, a run on cached latents has the loss history and the LoRA of a run that encodes
    every step (to float rounding: the VAE encodes other batches); the cache under OUT/cache/latents holds
    one entry per image and flip, and with prior preservation one per class image, bucket and flip."""
    caplog.set_level(logging.INFO, logger="loracap")
    data = images(tmp_path / "data", {"wide": (64, 32), "wide3x2": (60, 40), "tall": (32, 64)}, noise=True)
    base = tiny_model("sd15")
    common = {"max_steps": 5, "batch_size": 2, "lr": 1e-2, "random_flip": random_flip}
    if prior:
        common |= {
            "class_prompt": "a texture",
            "num_class_images": 2,
            "class_data_dir": str(tmp_path / "class"),
        }
    fresh = dreambooth(settings(data, base, tmp_path / "fresh", **common))
    cached = dreambooth(settings(data, base, tmp_path / "cached", cache_latents=True, **common))

    assert not (tmp_path / "fresh" / "cache").exists()
    flips = 2 if random_flip else 1
    count = 3 * flips + (2 * 2 * flips if prior else 0)  # class images: in each of the 2 buckets
    assert len(entries(tmp_path / "cached" / "cache" / "latents")) == count
    assert latent_lines(caplog) == [(0, count, count)]

    keys = ["loss", "instance_loss", "prior_loss"] if prior else ["loss"]
    for key in keys:
        assert [h[key] for h in cached.history] == pytest.approx([h[key] for h in fresh.history], rel=1e-5)
    a, b = loaded(fresh.lora), loaded(cached.lora)
    assert a.keys() == b.keys()
    for key in a:  # the LoRA moved by up to ~0.06 in these steps; float rounding moves it by ~1e-5
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=5e-4)


def test_the_latent_cache_encodes_again_only_what_changed(tmp_path, tiny_model, caplog):
    """A cache shared by runs (--cache-dir): damaged entries are encoded again, never used; an edited image
    (same name, same size) gets a new entry and the others are reused; another VAE gets all-new ones."""
    caplog.set_level(logging.INFO, logger="loracap")
    data = images(tmp_path / "data", {"wide": (64, 32), "wide3x2": (60, 40), "tall": (32, 64)}, noise=True)
    base = tiny_model("sd15")
    shared = tmp_path / "shared"
    # One epoch: batches 40x24 (wide, wide3x2) and 24x40 (tall), so every entry trains.
    common = {"max_steps": 2, "batch_size": 2, "cache_latents": True, "cache_dir": str(shared)}

    first = dreambooth(settings(data, base, tmp_path / "one", **common))
    stored = entries(shared / "latents")
    assert len(stored) == 3 and not (tmp_path / "one" / "cache").exists()

    stored[0].write_bytes(stored[0].read_bytes()[:300])  # cut short
    stored[1].write_bytes(stored[2].read_bytes())  # another image's entry in its place
    again = dreambooth(settings(data, base, tmp_path / "two", **common))
    assert [h["loss"] for h in again.history] == pytest.approx([h["loss"] for h in first.history], rel=1e-5)
    assert entries(shared / "latents") == stored  # encoded again, in place
    assert stored[1].read_bytes() != stored[2].read_bytes()

    edited = np.asarray(Image.open(data / "tall.png")).copy()
    edited[:8] = 255 - edited[:8]
    Image.fromarray(edited).save(data / "tall.png")
    dreambooth(settings(data, base, tmp_path / "three", **common))
    assert len(entries(shared / "latents")) == 4  # its new entry, next to the old ones

    other_vae = tmp_path / "other-vae"  # the same base but for its VAE
    shutil.copytree(base, other_vae)
    shutil.rmtree(other_vae / "vae")
    shutil.copytree(make_tiny_model("sd15", tmp_path / "seed1", seed=1) / "vae", other_vae / "vae")
    dreambooth(settings(data, other_vae, tmp_path / "four", **common))
    assert len(entries(shared / "latents")) == 7

    assert latent_lines(caplog) == [(0, 3, 3), (1, 3, 2), (2, 3, 1), (0, 3, 3)]


def test_a_cached_latent_goes_with_its_own_images_caption(tmp_path, tiny_model, batches, caplog):
    """Two images swap contents after a cached run: the next run finds both in the cache, and each caption
    trains with the latents of the pixels now under its name, never with the old ones."""
    caplog.set_level(logging.INFO, logger="loracap")
    data = images(tmp_path / "data", {"a": (32, 32), "b": (32, 32)})
    base = tiny_model("sd15")
    common = {"max_steps": 2, "cache_latents": True, "cache_dir": str(tmp_path / "cache")}
    dreambooth(settings(data, base, tmp_path / "one", **common))

    a, b = (data / "a.png").read_bytes(), (data / "b.png").read_bytes()
    (data / "a.png").write_bytes(b)
    (data / "b.png").write_bytes(a)
    batches.clear()
    dreambooth(settings(data, base, tmp_path / "two", **common))
    assert latent_lines(caplog)[-1] == (2, 2, 0)  # nothing new to encode: both contents are in the cache

    assert sorted(c for _, batch in batches for c in batch.captions) == ["ohwx a", "ohwx b"]
    for family, batch in batches:
        for caption, parameters in zip(batch.captions, batch.latent_parameters, strict=True):
            image = np.asarray(Image.open(data / f"{caption.removeprefix('ohwx ')}.png"), dtype=np.float32)
            pixels = torch.from_numpy(image).permute(2, 0, 1)[None] / 127.5 - 1
            torch.testing.assert_close(parameters, family.latent_parameters(pixels)[0], rtol=0, atol=1e-5)


def test_an_undecodable_class_image_is_left_out_with_cached_latents_too(tmp_path, tiny_model):
    """A class image of your own that is cut short (its header reads, its pixels do not): training goes on
    without it, named in a warning, with the latent cache as without it."""
    data = images(tmp_path / "data", {"a": (32, 32), "b": (32, 32)})
    own = images(tmp_path / "class", {"good": (32, 32), "bad": (32, 32)}, noise=True)
    whole = (own / "bad.png").read_bytes()
    (own / "bad.png").write_bytes(whole[: len(whole) // 2])
    base = tiny_model("sd15")
    common = {"max_steps": 4, "class_prompt": "a texture", "class_data_dir": str(own), "num_class_images": 2}
    assert dreambooth(settings(data, base, tmp_path / "fresh", **common)).steps == 4
    assert dreambooth(settings(data, base, tmp_path / "cached", cache_latents=True, **common)).steps == 4


# --- the text cache -----------------------------------------------------------------------------------------


@pytest.fixture
def encoded(monkeypatch) -> list[list[str]]:
    """The captions of every call of SD 1.5's text encoding."""
    calls: list[list[str]] = []
    original = families.SD15.encode_text

    def spy(self, captions, device):
        calls.append(list(captions))
        return original(self, captions, device)

    monkeypatch.setattr(families.SD15, "encode_text", spy)
    return calls


def test_the_text_cache_encodes_each_caption_once_and_trains_the_same(tmp_path, tiny_model, encoded, caplog):
    """Frozen text encoders: each distinct caption is encoded once before training (the empty one too with
    caption dropout) and the run trains as one that encodes every step."""
    caplog.set_level(logging.INFO, logger="loracap")
    data = images(tmp_path / "data", {"a": (32, 32), "b": (32, 32), "c": (32, 32)})
    base = tiny_model("sd15")
    common = {"max_steps": 4, "lr": 1e-2, "caption_dropout": 0.5}
    cached = dreambooth(settings(data, base, tmp_path / "cached", **common))
    assert encoded == [["", "ohwx a", "ohwx b", "ohwx c"]]  # once, before the first step
    assert "text cache: 4 distinct caption texts encoded once" in caplog.messages

    encoded.clear()
    plain = dreambooth(settings(data, base, tmp_path / "plain", cache_text=False, **common))
    assert len(encoded) == 4  # every step
    assert "" in {c for call in encoded for c in call}  # the dropout did happen in these steps
    assert [h["loss"] for h in cached.history] == pytest.approx([h["loss"] for h in plain.history], rel=1e-5)
    assert "text cache off (--no-cache-text): captions are encoded every step" in caplog.messages


@pytest.mark.parametrize(
    ("option", "why"),
    [
        ({"shuffle_tags": True}, "text cache off: --shuffle-tags makes a new caption text nearly every step"),
        ({"train_text_encoder": True}, "text cache off: the text encoders train"),
    ],
    ids=["shuffle-tags", "train-text-encoder"],
)
def test_the_text_cache_is_off_when_captions_or_encoders_change(
    tmp_path, tiny_model, encoded, caplog, option, why
):
    """Shuffled tags make a new text nearly every step, a trained encoder a new output: no cache, the
    captions encoded every step as they come, and the log says why."""
    caplog.set_level(logging.INFO, logger="loracap")
    data = images(tmp_path / "data", {"a": (32, 32)})
    (data / "a.txt").write_text("red, square, big, shiny, flat", encoding="utf-8")
    dreambooth(settings(data, tiny_model("sd15"), tmp_path / "out", max_steps=3, trigger="ohwx", **option))
    assert any(m.startswith(why) for m in caplog.messages)
    assert len(encoded) == 3 and all(len(call) == 1 for call in encoded)
    if "shuffle_tags" in option:
        assert len({call[0] for call in encoded}) > 1  # each step its own order


# --- options ------------------------------------------------------------------------------------------------


def refuse_loading(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the base was loaded")

    monkeypatch.setattr("loracap.dreambooth.loop.load_base", fail)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--cache-latents", "--crop", "random"],
            "--cache-latents encodes each image once, so it needs --crop center",
        ),
        (["--bucket-reso-steps", "24"], "--resolution 32 is not a multiple of --bucket-reso-steps 24"),
    ],
    ids=["cache-latents-random-crop", "steps-not-dividing-resolution"],
)
def test_contradicting_data_options_are_refused_before_loading(tmp_path, tiny_model, monkeypatch, capsys,
                                                               flags, message):  # fmt: skip
    """One line, exit status 2, before the base loads and before OUT is made."""
    refuse_loading(monkeypatch)
    data = images(tmp_path / "data", {"a": (32, 32)})
    base = tiny_model("sd15")
    capsys.readouterr()  # the test kit's own output, when it builds the model now
    args = ["dreambooth", str(data), "--base", str(base), "--out", str(tmp_path / "out")]
    assert main([*args, "--resolution", "32", *flags, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("loracap: error: ") and message in err[0]
    assert not (tmp_path / "out").exists()


def test_no_bucket_from_the_command_line_crops_every_image_square(tmp_path, tiny_model, batches, capsys):
    """--no-bucket: a wide and a tall image both train as the resolution's square (the bucket steps do not
    matter then)."""
    data = images(tmp_path / "data", {"wide": (64, 32), "tall": (32, 64)})
    args = ["dreambooth", str(data), "--base", str(tiny_model("sd15")), "--out", str(tmp_path / "out")]
    flags = ["--resolution", "32", "--bucket-reso-steps", "24", "--max-steps", "2", "--workers", "0"]
    assert main([*args, *flags, "--no-bucket"]) == 0
    assert "loracap: no buckets: every image cropped to 32x32: 2" in capsys.readouterr().err
    assert [tuple(b.pixel_values.shape) for _, b in batches] == [(1, 3, 32, 32), (1, 3, 32, 32)]
    run = json.loads((tmp_path / "out" / "loracap-dreambooth.json").read_text())
    assert run["settings"]["bucket"] is False


@pytest.mark.parametrize(("low", "high"), [(20, 64), (16, 60)], ids=["min-20", "max-60"])
def test_bucket_sides_are_multiples_of_the_steps_whatever_the_limits(low, high):
    """kohya's BucketManager rounds --min-bucket-reso down and --max-bucket-reso up to the steps, so every
    bucket side is a whole number of steps (of latent patches); loracap may round or refuse, not train at
    a 20 or 60 px side."""
    config = DreamBoothConfig(data="d", base="b", out="o", resolution=32, bucket_reso_steps=8,
                              min_bucket_reso=low, max_bucket_reso=high)  # fmt: skip
    try:
        check_config(config)
        resos = make_bucket_resolutions(bucket_settings(config, 32))
    except ValueError:
        return  # refused with a message: fine too
    assert all(w % 8 == 0 and h % 8 == 0 for w, h in resos), resos
