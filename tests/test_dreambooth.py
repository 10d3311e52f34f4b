"""`loracap dreambooth`: DreamBooth-LoRA on the test kit's tiny SD 1.5 and SDXL pipelines, at 32 px, a few
steps, one torch thread. The tests check behaviour: the loss falls, the LoRA changes the images and scale
0 gives the base back, a resumed run ends with an uninterrupted one's weights, Ctrl-C saves a checkpoint,
captions reach training as the trigger rule says, class images are reused only when they fit, bad input
is refused with one line."""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

from safetensors.torch import load_file  # noqa: E402

from loracap.cli import main  # noqa: E402
from loracap.dreambooth import families  # noqa: E402
from loracap.dreambooth.generate import GenerateConfig, generate  # noqa: E402
from loracap.dreambooth.loop import dreambooth  # noqa: E402
from loracap.dreambooth.prior import MANIFEST, ClassRecipe, prepare_class_images  # noqa: E402
from loracap.dreambooth.settings import DreamBoothConfig  # noqa: E402

COLOURS = [(220, 30, 30), (30, 30, 220), (30, 200, 30), (250, 250, 250)]
# Conv layers too: the tiny UNets' attention alone is too small to learn an image in a few dozen steps.
WIDE_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "conv_in", "conv_out")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread per test


def dataset(root: Path, captions: dict[str, str | None], size: tuple[int, int] = (40, 36)) -> Path:
    """NAME.png (colours in turn) per entry, with NAME.txt holding its caption unless it is None."""
    root.mkdir(parents=True)
    for i, (name, caption) in enumerate(captions.items()):
        Image.new("RGB", size, COLOURS[i % len(COLOURS)]).save(root / f"{name}.png")
        if caption is not None:
            (root / f"{name}.txt").write_text(caption, encoding="utf-8")
    return root


def settings(data: Path, base: Path, out: Path, **overrides) -> DreamBoothConfig:
    values = {
        "data": str(data),
        "base": str(base),
        "out": str(out),
        "resolution": 32,
        "bucket_reso_steps": 8,
        "max_steps": 2,
        "workers": 0,
        "progress": False,
        "checkpoint_every": 1000,
        "class_inference_steps": 2,
        "validation_inference_steps": 2,
    }
    return DreamBoothConfig(**{**values, **overrides})


@pytest.fixture
def seen(monkeypatch) -> list[tuple[list[str], int]]:
    """(captions, instance count) of every batch that reaches a family's loss."""
    batches: list[tuple[list[str], int]] = []
    original = families.NoisePrediction.loss

    def spy(self, batch, generator):
        batches.append((list(batch.captions), batch.instance_count))
        return original(self, batch, generator)

    monkeypatch.setattr(families.NoisePrediction, "loss", spy)
    return batches


def image_array(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


# --- training -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_loss_is_finite_and_falls_on_a_single_repeated_image(tmp_path, tiny_model, arch):
    data = dataset(tmp_path / "data", dict.fromkeys("abcd", "ohwx square"), size=(32, 32))
    for name in "bcd":  # the same image four times
        Image.new("RGB", (32, 32), COLOURS[0]).save(data / f"{name}.png")
    result = dreambooth(
        settings(data, tiny_model(arch), tmp_path / "out", max_steps=24, lr=3e-2, rank=4, batch_size=2,
                 lora_targets=WIDE_TARGETS)
    )  # fmt: skip
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 24 and all(math.isfinite(x) for x in losses)
    # Seeded, so the same numbers every run. Measured over seeds 0-2: the last third's mean is 73-79% of
    # the first third's for SD 1.5, 82-86% for SDXL; step-to-step noise moves a third's mean by about 1%.
    assert statistics.mean(losses[-8:]) < 0.92 * statistics.mean(losses[:8])


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_the_lora_changes_the_images_and_scale_zero_gives_the_base_back(tmp_path, tiny_model, arch):
    base = tiny_model(arch)
    data = dataset(tmp_path / "data", {"a": "ohwx square", "b": "ohwx square"})
    result = dreambooth(
        settings(data, base, tmp_path / "out", max_steps=3, lr=5e-2, rank=4, lora_targets=WIDE_TARGETS,
                 train_text_encoder=True)
    )  # fmt: skip
    assert result.lora == tmp_path / "out" / "out.safetensors"
    keys = load_file(str(result.lora)).keys()
    assert any(k.startswith("lora_unet_") for k in keys)
    assert any(k.startswith("lora_te") for k in keys)  # the text encoder's adapters are in the file too

    def first_image(name: str, **lora) -> np.ndarray:
        config = GenerateConfig(
            base=str(base), prompts=["ohwx square"], n=1, steps=2, width=32, height=32,
            out=tmp_path / name / "grid.png", progress=False, **lora,
        )  # fmt: skip
        return image_array(generate(config)[0])

    plain = first_image("base")
    assert np.abs(first_image("lora", lora=result.lora) - plain).max() > 8
    assert np.abs(first_image("zero", lora=result.lora, lora_scale=0.0) - plain).max() <= 1


def test_the_other_training_options_run_together(tmp_path, tiny_model):
    """min-SNR, noise offset, gradient checkpointing, bf16 autocast (on the CPU), warmup then cosine,
    gradient accumulation, epochs, random crops and flips, and the text encoders trained too (SDXL: both)."""
    data = dataset(tmp_path / "data", {"a": "ohwx red", "b": "ohwx blue"}, size=(48, 36))
    result = dreambooth(
        settings(data, tiny_model("sdxl"), tmp_path / "out", max_steps=None, epochs=2, grad_accum=2,
                 snr_gamma=5.0, noise_offset=0.05, gradient_checkpointing=True, mixed_precision="bf16",
                 lr_scheduler="cosine", warmup_steps=1, crop="random", random_flip=True,
                 train_text_encoder=True)
    )  # fmt: skip
    assert result.steps == 2  # 2 epochs of one optimizer step (2 images, 2 batches accumulated)
    assert all(math.isfinite(h["loss"]) for h in result.history)
    assert [h["lr"] for h in result.history] == pytest.approx([1e-4, 0.0])  # warmed up, then decayed
    keys = load_file(str(result.lora)).keys()
    assert any(k.startswith("lora_te1_") for k in keys) and any(k.startswith("lora_te2_") for k in keys)


def test_resumed_run_ends_with_the_uninterrupted_runs_weights(tmp_path, tiny_model):
    """Interrupted at step 3 (a checkpoint is saved on the way out), resumed to step 4: the same weights as
    4 steps in one go, with prior preservation, gradient accumulation, random crops, flips and caption
    dropout all drawing on the way."""
    data = dataset(tmp_path / "data", {"a": "ohwx red", "b": "ohwx blue", "c": "ohwx green"}, size=(48, 36))
    common = {
        "max_steps": 4,
        "checkpoint_every": 2,
        "grad_accum": 2,
        "lr": 1e-2,
        "crop": "random",
        "random_flip": True,
        "caption_dropout": 0.3,
        "class_prompt": "a square",
        "num_class_images": 2,
        "class_data_dir": str(tmp_path / "class"),
        "train_text_encoder": True,
    }
    base = tiny_model("sd15")
    whole = dreambooth(settings(data, base, tmp_path / "whole", **common))

    def stop_at_3(state):
        if state["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        dreambooth(settings(data, base, tmp_path / "parts", **common), on_step=stop_at_3)
    parts = tmp_path / "parts" / "checkpoints"
    assert sorted(p.name for p in parts.iterdir()) == ["step-2", "step-3"]  # step 3: saved on Ctrl-C
    run = json.loads((tmp_path / "parts" / "loracap-dreambooth.json").read_text())
    assert run["status"] == "interrupted" and run["state"]["step"] == 3

    resumed = dreambooth(settings(data, base, tmp_path / "parts", resume=True, **common))
    assert resumed.resumed_from == 3 and resumed.steps == 4
    assert resumed.class_images.reused == 2 and resumed.class_images.generated == 0
    a = load_file(str(tmp_path / "whole" / "checkpoints" / "step-4" / "lora.safetensors"))
    b = load_file(str(parts / "step-4" / "lora.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("text_encoder.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert whole.history[-1]["loss"] == resumed.history[-1]["loss"]


def test_ctrl_c_saves_a_checkpoint_before_stopping(tmp_path, tiny_model):
    data = dataset(tmp_path / "data", {"a": "ohwx", "b": "ohwx"})

    def press_ctrl_c(state):
        if state["step"] == 1:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        dreambooth(settings(data, tiny_model("sd15"), tmp_path / "out", max_steps=5), on_step=press_ctrl_c)
    checkpoint = tmp_path / "out" / "checkpoints" / "step-1"
    assert (checkpoint / "lora.safetensors").is_file() and (checkpoint / "optimizer.bin").is_file()
    assert (checkpoint / "out.safetensors").is_file()  # a usable LoRA of that step
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state == {"step": 1, "epoch": 0, "batch": 1}


def test_old_checkpoints_are_rotated_out(tmp_path, tiny_model):
    from safetensors import safe_open

    data = dataset(tmp_path / "data", {"a": "ohwx"})
    result = dreambooth(
        settings(data, tiny_model("sd15"), tmp_path / "out", max_steps=4, checkpoint_every=1,
                 checkpoints_total_limit=2, resolution=None)
    )  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == ["step-3", "step-4"]
    with safe_open(str(result.lora), framework="pt") as f:  # no --resolution: the base's own, 64 px
        assert f.metadata()["ss_resolution"] == "(64, 64)"


def test_validation_grids_start_with_the_base_and_reach_tensorboard(tmp_path, tiny_model):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    base = tiny_model("sd15")
    data = dataset(tmp_path / "data", {"a": "ohwx square", "b": "ohwx square"})
    result = dreambooth(
        settings(data, base, tmp_path / "out", max_steps=4, lr=5e-2, lora_targets=WIDE_TARGETS,
                 validation_prompt=("[trigger] square", "a dog"), validation_every=2, trigger="ohwx")
    )  # fmt: skip
    samples = tmp_path / "out" / "samples"
    assert result.grids == [samples / "step-0.png", samples / "step-2.png", samples / "step-4.png"]
    first, last = image_array(samples / "step-0.png"), image_array(samples / "step-4.png")
    assert first.shape == (64, 64, 3)  # 2 prompts x 2 seeds at 32 px
    assert np.abs(last - first).max() > 8  # the subject appears (the LoRA changed the images)
    # Step 0 is the base model itself: `loracap generate` at the same seeds draws the same images.
    for row, prompt in enumerate(["ohwx square", "a dog"]):
        config = GenerateConfig(
            base=str(base), prompts=[prompt], n=2, steps=2, cfg=7.5, width=32, height=32,
            out=tmp_path / f"base-{row}" / "grid.png", progress=False,
        )  # fmt: skip
        for column, path in enumerate(generate(config)[:2]):
            cell = first[row * 32 : (row + 1) * 32, column * 32 : (column + 1) * 32]
            assert np.abs(cell - image_array(path)).max() <= 1
    events = EventAccumulator(str(next((tmp_path / "out" / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert {"train/loss", "train/instance_loss", "train/lr"} <= set(events.Tags()["scalars"])
    assert "validation" in events.Tags()["images"]


# --- captions -----------------------------------------------------------------------------------------------


def test_captions_reach_training_with_the_trigger_and_the_instance_prompt(tmp_path, tiny_model, seen, capsys):
    data = dataset(tmp_path / "data", {"a": "a photo of [trigger] in a park", "b": "a red square", "c": None})
    result = dreambooth(
        settings(data, tiny_model("sd15"), tmp_path / "out", max_steps=3, trigger="ohwx",
                 instance_prompt="a photo")
    )  # fmt: skip
    assert result.without_caption == 1
    assert "no caption for 1 image, trained with the instance prompt 'ohwx, a photo': c.png" in (
        capsys.readouterr().err
    )
    trained = {captions[0] for captions, _ in seen}
    assert trained == {"a photo of ohwx in a park", "ohwx, a red square", "ohwx, a photo"}


def test_caption_dropout_one_trains_every_image_uncaptioned(tmp_path, tiny_model, seen):
    data = dataset(tmp_path / "data", {"a": "ohwx red", "b": "ohwx blue"})
    dreambooth(settings(data, tiny_model("sd15"), tmp_path / "out", max_steps=2, caption_dropout=1.0))
    assert [captions for captions, _ in seen] == [[""], [""]]


def test_shuffled_tags_keep_the_first_keep_tokens_in_place(tmp_path, tiny_model, seen):
    data = dataset(tmp_path / "data", {"a": "red, square, big, shiny, flat, small"})
    dreambooth(
        settings(data, tiny_model("sd15"), tmp_path / "out", max_steps=8, trigger="ohwx", shuffle_tags=True,
                 keep_tokens=2)
    )  # fmt: skip
    captions = [c[0] for c, _ in seen]
    tags = [c.split(", ") for c in captions]
    assert all(t[:2] == ["ohwx", "red"] for t in tags)  # the trigger went first, then kept in place
    assert all(sorted(t) == sorted(["ohwx", "red", "square", "big", "shiny", "flat", "small"]) for t in tags)
    assert len(set(captions)) > 1  # the rest is shuffled


# --- class-prior preservation -------------------------------------------------------------------------------


def fake_generator(calls: list[list[int]]):
    def generate(seeds: list[int]) -> list[Image.Image]:
        calls.append(list(seeds))
        return [Image.new("RGB", (8, 8), (s, 0, 0)) for s in seeds]

    return generate


def test_class_images_are_generated_once_and_redone_when_the_recipe_changes(tmp_path):
    folder, calls = tmp_path / "class", []
    recipe = ClassRecipe(base="fingerprint", prompt="photo of a woman", size=32, steps=2, guidance=7.5)
    made = prepare_class_images(folder, 3, recipe, seed=5, batch_size=2, generate=fake_generator(calls))
    assert calls == [[5, 6], [7]] and made.generated == 3 and len(made.images) == 3
    manifest = json.loads((folder / MANIFEST).read_text())["images"]
    assert {r["seed"] for r in manifest.values()} == {5, 6, 7}
    assert all(r["prompt"] == "photo of a woman" and r["size"] == 32 for r in manifest.values())

    again = prepare_class_images(folder, 3, recipe, seed=5, batch_size=2, generate=fake_generator(calls))
    assert len(calls) == 2 and again.reused == 3 and again.generated == 0

    for changed in ({"prompt": "photo of a man"}, {"base": "another base"}, {"size": 64}):
        other = ClassRecipe(**{**recipe.__dict__, **changed})
        redone = prepare_class_images(folder, 3, other, seed=5, batch_size=4, generate=fake_generator(calls))
        assert redone.removed == 3 and redone.generated == 3 and calls[-1] == [5, 6, 7], changed
        assert len(list(folder.glob("*.png"))) == 3  # the old ones are gone, not passed off as your own


def test_your_own_class_images_are_used_and_never_removed(tmp_path):
    folder, calls = tmp_path / "class", []
    folder.mkdir()
    Image.new("RGB", (40, 40), "white").save(folder / "mine.png")
    recipe = ClassRecipe(base="fingerprint", prompt="photo of a woman", size=32, steps=2, guidance=7.5)
    made = prepare_class_images(folder, 2, recipe, seed=0, batch_size=4, generate=fake_generator(calls))
    assert made.own == 1 and made.generated == 1 and made.images[0] == folder / "mine.png"
    other = ClassRecipe(**{**recipe.__dict__, "prompt": "photo of a man"})
    prepare_class_images(folder, 2, other, seed=0, batch_size=4, generate=fake_generator(calls))
    assert (folder / "mine.png").is_file()


def test_prior_preservation_trains_on_class_images_with_the_class_prompt(tmp_path, tiny_model, seen):
    data = dataset(tmp_path / "data", {"a": "ohwx red", "b": "ohwx blue"})
    own = tmp_path / "class"
    own.mkdir()
    Image.new("RGB", (40, 40), "white").save(own / "mine.png")
    result = dreambooth(
        settings(data, tiny_model("sdxl"), tmp_path / "out", max_steps=2, class_prompt="a square",
                 class_data_dir=str(own), num_class_images=2, prior_loss_weight=0.5)
    )  # fmt: skip
    assert result.class_images.own == 1 and result.class_images.generated == 1
    assert len(json.loads((own / MANIFEST).read_text())["images"]) == 1  # only the generated one
    assert [(captions[1], count) for captions, count in seen] == [("a square", 1), ("a square", 1)]
    for record in result.history:
        assert record["loss"] == pytest.approx(record["instance_loss"] + 0.5 * record["prior_loss"])


# --- bad input ----------------------------------------------------------------------------------------------


def test_an_unreadable_image_is_listed_and_left_out(tmp_path, tiny_model, capsys):
    data = dataset(tmp_path / "data", {"a": "ohwx red", "b": "ohwx blue"})
    (data / "broken.png").write_bytes(b"not a png at all")
    (data / "broken.txt").write_text("ohwx broken")
    result = dreambooth(settings(data, tiny_model("sd15"), tmp_path / "out", max_steps=1))
    assert result.instances == 2 and len(result.unreadable) == 1 and "broken.png" in result.unreadable[0]
    assert "left out 1 unreadable images: broken.png" in capsys.readouterr().err


def refuse_loading(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the base was loaded")

    monkeypatch.setattr("loracap.dreambooth.loop.load_base", fail)


def test_a_base_that_is_not_stable_diffusion_is_refused_before_loading(tmp_path, monkeypatch, capsys):
    refuse_loading(monkeypatch)
    base = tmp_path / "kandinsky"
    base.mkdir()
    (base / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyV22Pipeline"}))
    data = dataset(tmp_path / "data", {"a": "ohwx"})
    assert main(["dreambooth", str(data), "--base", str(base), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "KandinskyV22Pipeline" in err[0] and "not a base" in err[0]
    assert not (tmp_path / "out").exists()


def test_strict_makes_a_missing_caption_an_error(tmp_path, tiny_model, monkeypatch, capsys):
    refuse_loading(monkeypatch)
    data = dataset(tmp_path / "data", {"a": "ohwx red", "b": None})
    args = ["dreambooth", str(data), "--base", str(tiny_model("sd15")), "--out", str(tmp_path / "out")]
    assert main([*args, "--trigger", "ohwx", "--strict", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("loracap: error: --strict: no caption for 1 image") and "\n" not in err


def test_8bit_adam_is_refused_on_a_cpu(tmp_path, tiny_model, monkeypatch, capsys):
    refuse_loading(monkeypatch)
    data = dataset(tmp_path / "data", {"a": "ohwx"})
    args = ["dreambooth", str(data), "--base", str(tiny_model("sd15")), "--out", str(tmp_path / "out")]
    assert main([*args, "--use-8bit-adam", "--quiet"]) == 2
    assert "(--use-8bit-adam) needs a CUDA GPU" in capsys.readouterr().err


def test_an_out_folder_with_a_run_needs_resume_or_overwrite(tmp_path, tiny_model, capsys):
    """The same run from a --config file (a flag overrides it); run again, it is refused and nothing of
    the first run changes; --resume with another rank is refused; --overwrite starts over."""
    data = dataset(tmp_path / "data", {"a": "ohwx"})
    out = tmp_path / "out"
    config = tmp_path / "ohwx.toml"
    config.write_text(
        f'data = "{data}"\nbase = "{tiny_model("sd15")}"\nout = "{out}"\nresolution = 32\nmax-steps = 3\n'
        "workers = 0\nrank = 4\nbucket-reso-steps = 8\n",
        encoding="utf-8",
    )
    assert main(["dreambooth", "--config", str(config), "--max-steps", "1", "--quiet"]) == 0
    run = json.loads((out / "loracap-dreambooth.json").read_text())
    assert run["status"] == "done" and run["state"]["step"] == 1 and run["settings"]["rank"] == 4
    lora = (out / "out.safetensors").read_bytes()
    capsys.readouterr()

    assert main(["dreambooth", "--config", str(config), "--quiet"]) == 2
    assert "already holds a DreamBooth run (step 1, done): add --resume" in capsys.readouterr().err
    assert (out / "out.safetensors").read_bytes() == lora
    assert main(["dreambooth", "--config", str(config), "--resume", "--rank", "8", "--quiet"]) == 2
    assert "--rank was 4 in the run" in capsys.readouterr().err
    assert main(["dreambooth", "--config", str(config), "--overwrite", "--quiet"]) == 0
    assert json.loads((out / "loracap-dreambooth.json").read_text())["state"]["step"] == 3


def test_every_setting_has_a_flag_and_every_flag_is_a_setting():
    from loracap.cli import build_parser
    from loracap.config import setting_names

    commands = next(a for a in build_parser()._subparsers._group_actions if "dreambooth" in a.choices)
    sub = commands.choices["dreambooth"]
    dests = {a.dest for a in sub._actions if a.dest not in ("help", "config", "offline", "verbose")}
    assert dests == set(setting_names(DreamBoothConfig))
