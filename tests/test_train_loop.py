"""`loracap train`'s loop: early stopping, an unfrozen vision top, TensorBoard logs, bf16 on a CPU and
several processes, with tiny SigLIP and Llama checkpoints (see test_train.py for the rest)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import GEN_ARGS
from PIL import Image

from loracap.cli import main
from loracap.prefix.io import load_captioner
from loracap.prefix.modeling import build_captioner

pytest.importorskip("peft")
pytest.importorskip("accelerate")

from loracap.train.loop import train  # noqa: E402  (needs peft and accelerate)
from loracap.train.settings import TrainSettings  # noqa: E402

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "white": (250, 250, 250)}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one torch thread is as fast as several, and far faster when other processes keep the
    cores busy (threads spinning on each other's work made a 1 s run take a minute). Results do not depend
    on it: every assertion here holds whatever the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def towers(tiny_model) -> tuple[Path, Path]:
    """(vision, lm): a tiny SigLIP tower (two encoder layers) and a tiny SmolLM2-shaped Llama."""
    return tiny_model("siglip"), tiny_model("llama")


def dataset(root: Path, captions: list[str], splits: dict[str, list[int]] | None = None) -> Path:
    """One 40x40 colour square per caption (colours in turn), as `NNN.png` + `NNN.txt`; `splits` (indices)
    becomes the dataset's own splits.json."""
    root.mkdir(parents=True)
    names = list(COLOURS)
    for i, caption in enumerate(captions):
        Image.new("RGB", (40, 40), COLOURS[names[i % len(names)]]).save(root / f"{i:03d}.png")
        (root / f"{i:03d}.txt").write_text(caption, encoding="utf-8")
    if splits is not None:
        doc = {name: [f"{i:03d}.png" for i in keys] for name, keys in splits.items()}
        (root / "splits.json").write_text(json.dumps(doc), encoding="utf-8")
    return root


def colour_dataset(root: Path, n: int = 16) -> Path:
    names = list(COLOURS)
    return dataset(root, [f"a {names[i % len(names)]} square" for i in range(n)])


def diverging_dataset(root: Path) -> Path:
    """Trained on one caption, validated on another: the captioner learns "a red square" so well that the
    validation captions soon become less likely, and the validation loss turns and climbs."""
    captions = ["a red square"] * 12 + ["the blue circle"] * 4
    return dataset(root, captions, {"train": list(range(12)), "val": list(range(12, 16)), "test": []})


def settings(data: Path, out: Path, towers, **overrides) -> TrainSettings:
    base = {
        "data": str(data),
        "out": str(out),
        "vision": str(towers[0]),
        "lm": str(towers[1]),
        "batch_size": 4,
        "workers": 0,
        "warmup_steps": 0,
        "progress": False,
        "val_metrics": False,
        "test_metrics": False,
        "mixed_precision": "no",
    }
    return TrainSettings(**{**base, **overrides})


def val_loss_of_saved(out: Path, data: Path) -> float:
    """The validation loss of the captioner saved in `out`, loaded as `loracap caption --model` loads it."""
    from loracap.train.batches import CaptionDataset, make_collate
    from loracap.train.data import load_examples, read_split
    from loracap.train.validation import evaluate_loss

    loaded = load_captioner(out)
    val_keys = set(read_split(out)["val"])
    examples = [e for e in load_examples(data) if e.key in val_keys]
    dataset_ = CaptionDataset(examples, loaded.image_processor)
    config = loaded.model.config
    collate = make_collate(loaded.tokenizer, loaded.image_processor, config.prompt, config.max_caption_tokens)
    batches = [collate([dataset_[i] for i in range(len(dataset_))])]

    class OneProcess:
        num_processes, device = 1, torch.device("cpu")

    return evaluate_loss(loaded.model, batches, OneProcess())


# --- early stopping ------------------------------------------------------------------------------------

DIVERGING = {"max_steps": 20, "eval_every": 1, "lr_projector": 3e-2, "lr_lora": 3e-2}


def test_early_stopping_stops_and_keeps_the_best_validation_step(towers, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    data, out = diverging_dataset(tmp_path / "data"), tmp_path / "cap"
    result = train(settings(data, out, towers, patience=3, **DIVERGING))

    assert result.stopped_early and result.steps < 20
    losses = [h["val_loss"] for h in result.history]
    assert [h["step"] for h in result.history] == list(range(1, result.steps + 1))
    assert result.best_val_loss == min(losses) and result.best_step == losses.index(min(losses)) + 1
    # It stopped at the third evaluation in a row without a better loss, not before and not after.
    assert result.steps == result.best_step + 3
    assert losses[-1] > result.best_val_loss + 1e-3  # the last step's weights are measurably worse

    # The folder holds the best step's weights, not the last step's: its validation loss is the best one,
    # and its projector is the one kept on disk at the best step.
    assert val_loss_of_saved(out, data) == pytest.approx(result.best_val_loss, abs=1e-4)
    best = load_file(str(out / "best-trainable.safetensors"))
    saved = load_captioner(out).model.state_dict()
    projector = [k for k in best if k.startswith("projector.")]
    assert projector and all(torch.equal(saved[k], best[k]) for k in projector)
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["best_step"] == result.best_step and state["step"] == result.steps


def test_patience_zero_never_stops_early(towers, tmp_path: Path) -> None:
    data = diverging_dataset(tmp_path / "data")
    result = train(settings(data, tmp_path / "cap", towers, patience=0, **DIVERGING))

    assert not result.stopped_early and result.steps == 20
    assert [h["step"] for h in result.history] == list(range(1, 21))
    # ... although the validation loss went three (and more) evaluations without improving.
    losses = [h["val_loss"] for h in result.history]
    worse_in_a_row, longest, best = 0, 0, float("inf")
    for loss in losses:
        worse_in_a_row = 0 if loss < best else worse_in_a_row + 1
        best, longest = min(best, loss), max(longest, worse_in_a_row)
    assert longest >= 3


# --- an unfrozen vision top ----------------------------------------------------------------------------


@pytest.mark.parametrize("layers", [0, 1, 2])
def test_unfreeze_vision_layers_trains_exactly_the_top_layers(towers, tmp_path: Path, layers: int) -> None:
    """One optimizer step: the top `layers` encoder layers move, by lr_vision (one AdamW step moves each
    weight by about its learning rate), while the lower layers, the patch embeddings and the rest of the
    tower stay bit-identical to the checkpoint."""
    lr_vision = 3e-3  # apart from the projector's 1e-3 and LoRA's 2e-4
    data, out = colour_dataset(tmp_path / "data"), tmp_path / "cap"
    train(
        settings(
            data, out, towers, max_steps=1, unfreeze_vision_layers=layers, lr_vision=lr_vision, eval_every=1
        )
    )

    original = build_captioner(str(towers[0]), str(towers[1]))
    before, after = original.vision_tower.state_dict(), load_captioner(out).model.vision_tower.state_dict()
    assert before.keys() == after.keys()
    depth = len(original.vision_tower.encoder.layers)
    assert depth == 2
    top = tuple(f"encoder.layers.{i}." for i in range(depth - layers, depth))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if layers and k.startswith(top)}
    assert any(k.startswith("embeddings.patch_embedding") for k in before)  # among the unchanged keys
    for prefix in top:
        moved = max((after[k] - before[k]).abs().max().item() for k in before if k.startswith(prefix))
        assert moved == pytest.approx(lr_vision, rel=0.02)

    # The run did train: the LoRA merged into the LM moved its attention weights.
    lm_before = original.language_model.state_dict()
    lm_after = load_captioner(out).model.language_model.state_dict()
    assert any(not torch.equal(lm_before[k], lm_after[k]) for k in lm_before)


def test_unfrozen_vision_layers_follow_lr_vision_not_the_other_rates(towers, tmp_path: Path) -> None:
    """lr_vision=0 with a layer opened: the projector and LoRA train at their rates, the tower not at all."""
    data, out = colour_dataset(tmp_path / "data"), tmp_path / "cap"
    train(settings(data, out, towers, max_steps=2, unfreeze_vision_layers=1, lr_vision=0.0, eval_every=1))
    original = build_captioner(str(towers[0]), str(towers[1]))
    before, after = original.vision_tower.state_dict(), load_captioner(out).model.vision_tower.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    lm_before = original.language_model.state_dict()
    lm_after = load_captioner(out).model.language_model.state_dict()
    assert any(not torch.equal(lm_before[k], lm_after[k]) for k in lm_before)


# --- TensorBoard ---------------------------------------------------------------------------------------


def read_scalars(logs: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the event files under `logs`: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[tuple[int, float]]] = {}
    for folder in sorted({p.parent for p in logs.rglob("events.out.tfevents.*")}):
        events = EventAccumulator(str(folder))
        events.Reload()
        for tag in events.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in events.Scalars(tag))
    return scalars


def test_tensorboard_logs_hold_train_and_validation_scalars(towers, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    data, out = colour_dataset(tmp_path / "data"), tmp_path / "cap"
    result = train(settings(data, out, towers, max_steps=6, eval_every=4, val_metrics=True))

    assert list((out / "logs").rglob("events.out.tfevents.*"))
    scalars = read_scalars(out / "logs")
    assert [step for step, _ in scalars["train/loss"]] == [1, 2, 3, 4, 5, 6]
    # Validation every 4 steps and at the last one.
    assert [step for step, _ in scalars["val/val_loss"]] == [4, 6] == [h["step"] for h in result.history]
    for (_, logged), record in zip(scalars["val/val_loss"], result.history, strict=True):
        assert logged == pytest.approx(record["val_loss"], rel=1e-6)
    assert dict(scalars["train/loss"])[6] == pytest.approx(result.history[-1]["train_loss"], rel=1e-6)
    assert [step for step, _ in scalars["val/cider"]] == [4, 6]
    # The learning rate decays (cosine) and reaches 0 at the last step.
    lrs = [lr for _, lr in scalars["train/lr"]]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False)) and lrs[-1] == pytest.approx(0.0, abs=1e-9)


# --- bf16 on a CPU -------------------------------------------------------------------------------------


def test_bf16_on_cpu_trains_and_saves_a_float32_captioner(towers, tmp_path: Path) -> None:
    """`--mixed-precision bf16` on a CPU: accelerate autocasts to bfloat16 there. Run as its own process,
    as the CLI always is (train() twice in one process with two precisions is the test below)."""
    from accelerate.utils import is_bf16_available

    if not is_bf16_available():
        pytest.skip("this torch / accelerate has no bf16 autocast on a CPU")
    data = colour_dataset(tmp_path / "data")
    args = ["--batch-size", "4", "--workers", "0", "--warmup-steps", "0", "--max-steps", "3", "--quiet"]
    args += ["--eval-every", "3", "--test-share", "0", "--vision", str(towers[0]), "--lm", str(towers[1])]
    bf16 = tmp_path / "bf16"
    run = subprocess.run(
        [sys.executable, "-m", "loracap.cli", "train", str(data), "--out", str(bf16), *args]
        + ["--mixed-precision", "bf16"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "trained 3 steps" in run.stdout

    loaded = load_captioner(bf16)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}
    assert json.loads((bf16 / "config.json").read_text())["dtype"] == "float32"
    # bf16 was really in effect: the same run in float32 scores other losses.
    fp32 = train(settings(data, tmp_path / "fp32", towers, max_steps=3, eval_every=3, test_share=0.0))
    bf16_history = json.loads((bf16 / "trainer_state.json").read_text())["history"]
    assert [h["step"] for h in bf16_history] == [h["step"] for h in fp32.history] == [3]
    assert bf16_history[0]["val_loss"] != pytest.approx(fp32.history[0]["val_loss"], rel=1e-6)

    images = tmp_path / "new"
    images.mkdir()
    Image.new("RGB", (40, 40), COLOURS["red"]).save(images / "x.png")
    assert main(["caption", str(images), "--model", str(bf16), *GEN_ARGS]) == 0
    assert (images / "x.txt").read_text(encoding="utf-8").strip()


def test_train_twice_in_one_process_with_another_precision(towers, tmp_path: Path) -> None:
    from accelerate.utils import is_bf16_available

    if not is_bf16_available():
        pytest.skip("this torch / accelerate has no bf16 autocast on a CPU")
    data = colour_dataset(tmp_path / "data")
    for precision in ("no", "bf16"):
        result = train(
            settings(data, tmp_path / precision, towers, max_steps=1, eval_every=1, mixed_precision=precision)
        )
        assert result.steps == 1


# --- several processes ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_run(towers, tmp_path_factory):
    """`accelerate launch` of `loracap train` in two CPU processes (gloo), validating every 2 steps.

    `accelerate launch --cpu --num_processes 2` would start ONE process: with --cpu accelerate 1.x always
    takes its simple launcher, which starts several CPU processes only through mpirun (--mpirun_hostfile).
    Two torchrun processes that accelerate treats as CPU ranks are --multi_gpu's launcher with
    ACCELERATE_USE_CPU=1 (without it, on a machine with no GPU, each process would train alone as rank 0 of
    1, both writing the same folder)."""
    work = tmp_path_factory.mktemp("two-processes")
    # Three validation images in batches of 2: one process scores two of them, the other one, so the two
    # would disagree on the validation loss if their sums were not shared.
    captions = [f"a {name} square" for name in COLOURS] * 3 + [
        "a red square",
        "the blue circle",
        "a green ring",
    ]
    data = dataset(work / "data", captions, {"train": list(range(12)), "val": [12, 13, 14], "test": []})
    out = work / "cap"
    # A HF_HOME of its own: no accelerate config file of this machine's (HF_HOME/accelerate) applies.
    hf_home = tmp_path_factory.mktemp("hf-home")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HOME": str(hf_home), "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(free_port()), "-m", "loracap.cli", "train", str(data)]
    args = ["--out", str(out), "--vision", str(towers[0]), "--lm", str(towers[1]), "--batch-size", "2"]
    args += ["--workers", "0", "--warmup-steps", "0", "--max-steps", "5", "--eval-every", "2", "--quiet"]
    args += ["--mixed-precision", "no"]
    run = subprocess.run([*launch, *args], capture_output=True, text=True, timeout=300, env=env)
    return run, work, out


def test_two_processes_train_one_captioner(two_process_run) -> None:
    run, work, out = two_process_run
    assert run.returncode == 0, run.stderr[-3000:]
    # The main process reports (once) and saves; the other one ran the loop to the end with it. That both
    # take the same validation decisions is tested in test_train.py (validation loss on every process).
    reports = [line for line in run.stdout.splitlines() if line.startswith("loracap: trained 5 steps")]
    assert len(reports) == 1 and run.stdout.count("captioner saved to") == 1
    # ... and shared the data: 12 training images in batches of 2 are 3 steps an epoch for each of two
    # processes (6 for one), so after 5 steps the run is in its second epoch.
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["epoch"] == 1 and [h["step"] for h in state["history"]] == [2, 4, 5]
    # One folder, one split, written once.
    assert sorted(p.name for p in work.iterdir()) == ["cap", "data"]
    assert [p.relative_to(work) for p in work.rglob("split.json")] == [Path("cap/split.json")]
    split = json.loads((out / "split.json").read_text())
    assert split["val"] == ["012.png", "013.png", "014.png"] and len(split["train"]) == 12
    assert {p.dtype for p in load_captioner(out).model.parameters()} == {torch.float32}
    images = work / "new"
    images.mkdir()
    Image.new("RGB", (40, 40), COLOURS["blue"]).save(images / "x.png")
    assert main(["caption", str(images), "--model", str(out), *GEN_ARGS]) == 0
    assert (images / "x.txt").read_text(encoding="utf-8").strip()


def test_two_processes_learning_rate_decays_over_the_whole_run(two_process_run) -> None:
    run, _, out = two_process_run
    assert run.returncode == 0, run.stderr[-3000:]
    lrs = [lr for _, lr in read_scalars(out / "logs")["train/lr"]]
    assert len(lrs) == 5
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False)) and lrs[-1] == pytest.approx(0.0, abs=1e-9)
