"""`loracap train --cache-features`: the frozen vision tower's features computed once, on disk, keyed by
encoder and image content; training on them gives what training on the images gives."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from loracap.cli import main
from loracap.prefix.io import load_captioner
from loracap.prefix.modeling import build_captioner

pytest.importorskip("peft")

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "white": (250, 250, 250)}
COUNTS = re.compile(r"vision features: (\d+) reused, (\d+) computed")


@pytest.fixture(scope="module")
def towers(tiny_model) -> tuple[Path, Path]:
    return tiny_model("siglip"), tiny_model("llama")


def distinct_dataset(root: Path, n: int = 12, *, broken: bool = False) -> Path:
    """n images, no two alike (a colour square with one dark pixel in its own place: same-content images
    would share one cache entry), captioned by colour. Its splits.json puts the last two in val (and a
    broken file, if asked, in train), none in test."""
    root.mkdir(parents=True)
    names = list(COLOURS)
    keys = []
    for i in range(n):
        name = names[i % len(names)]
        image = Image.new("RGB", (40, 40), COLOURS[name])
        image.putpixel((i % 40, i // 40), (0, 0, 0))
        image.save(root / f"{i:03d}.png")
        (root / f"{i:03d}.txt").write_text(f"a {name} square", encoding="utf-8")
        keys.append(f"{i:03d}.png")
    if broken:
        (root / "broken.png").write_bytes(b"not a png at all")
        (root / "broken.txt").write_text("a broken square", encoding="utf-8")
    train = keys[:-2] + (["broken.png"] if broken else [])
    splits = {"train": train, "val": keys[-2:], "test": []}
    (root / "splits.json").write_text(json.dumps(splits), encoding="utf-8")
    return root


def run(towers, data: Path, out: Path, cache: Path | None, **extra):
    """A few CPU steps (two epochs of the 10-image train split), no captioning: only the loss path."""
    from loracap.train.loop import train
    from loracap.train.settings import TrainSettings

    settings = {
        "max_steps": 6,
        "eval_every": 3,
        "batch_size": 4,
        "workers": 0,
        "warmup_steps": 1,
        "lora_dropout": 0.3,  # dropout draws from the RNG: the cache must not shift what it draws
        "progress": False,
        "val_metrics": False,
        "test_metrics": False,
        **extra,
    }
    return train(
        TrainSettings(
            data=str(data),
            out=str(out),
            vision=str(towers[0]),
            lm=str(towers[1]),
            feature_cache_dir=str(cache) if cache is not None else None,
            **settings,
        )
    )


def counts(stderr: str) -> tuple[int, int]:
    """(reused, computed) from the line the run printed."""
    (found,) = COUNTS.findall(stderr)
    return int(found[0]), int(found[1])


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_captioner(out).model.state_dict()


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.allclose(a[k], b[k], rtol=0, atol=1e-6)]
    assert differ == []


def entries(cache: Path) -> list[Path]:
    return sorted(cache.glob("*/*.safetensors"))


@pytest.fixture
def tower_runs(monkeypatch) -> list[int]:
    """Images the vision tower encodes, batch by batch (every use of the tower goes through its forward)."""
    from transformers import SiglipVisionModel

    seen: list[int] = []
    real = SiglipVisionModel.forward

    def counting(self, pixel_values, *args, **kwargs):
        seen.append(pixel_values.shape[0])
        return real(self, pixel_values, *args, **kwargs)

    monkeypatch.setattr(SiglipVisionModel, "forward", counting)
    return seen


def test_training_on_cached_features_equals_training_on_images(towers, tmp_path: Path, capsys) -> None:
    data = distinct_dataset(tmp_path / "data", broken=True)
    plain = run(towers, data, tmp_path / "plain", None)
    assert capsys.readouterr().err.count("skipping broken.png") == 2  # once per epoch, as before

    cached = run(towers, data, tmp_path / "cached", tmp_path / "cache")
    err = capsys.readouterr().err
    assert counts(err) == (0, 12)  # 10 train + 2 val images; the broken one has no entry
    assert err.count("skipping broken.png") == 1  # reported once, when the cache is filled
    assert len(entries(tmp_path / "cache")) == 12
    # What the other processes of a multi-GPU run look up once the main one has filled the cache.
    from loracap.train.data import load_examples
    from loracap.train.features import FeatureCache, find_entries

    examples = load_examples(data)
    (folder,) = (tmp_path / "cache").iterdir()
    found = dict(zip([e.key for e in examples], find_entries(FeatureCache(folder), examples), strict=True))
    assert found.pop("broken.png") is None and all(found.values()) and len(found) == 12

    assert [h["val_loss"] for h in cached.history] == pytest.approx([h["val_loss"] for h in plain.history])
    assert [h["train_loss"] for h in cached.history] == pytest.approx(
        [h["train_loss"] for h in plain.history]
    )
    assert_same_weights(weights(tmp_path / "plain"), weights(tmp_path / "cached"))
    initial = build_captioner(str(towers[0]), str(towers[1])).state_dict()
    assert not torch.equal(weights(tmp_path / "cached")["projector.1.weight"], initial["projector.1.weight"])


def test_a_second_run_reuses_every_entry_and_never_runs_the_tower(
    towers, tmp_path: Path, capsys, tower_runs
) -> None:
    data = distinct_dataset(tmp_path / "data")
    run(towers, data, tmp_path / "first", tmp_path / "cache")
    assert counts(capsys.readouterr().err) == (0, 12) and sum(tower_runs) == 12

    tower_runs.clear()
    run(towers, data, tmp_path / "second", tmp_path / "cache")
    assert counts(capsys.readouterr().err) == (12, 0)
    assert tower_runs == []  # neither to fill the cache nor while training
    assert_same_weights(weights(tmp_path / "first"), weights(tmp_path / "second"))


def test_another_encoder_in_the_same_folder_gets_entries_of_its_own(towers, tmp_path: Path, capsys) -> None:
    """Same id (the same folder), same architecture, other weights: as when a tower is retrained in place."""
    from loracap.testing import make_tiny_model

    data = distinct_dataset(tmp_path / "data")
    vision = tmp_path / "vision"
    shutil.copytree(towers[0], vision)
    run((vision, towers[1]), data, tmp_path / "a", tmp_path / "cache")
    assert counts(capsys.readouterr().err) == (0, 12)

    shutil.rmtree(vision)
    make_tiny_model("siglip", vision, seed=1)
    run((vision, towers[1]), data, tmp_path / "b", tmp_path / "cache")
    assert counts(capsys.readouterr().err) == (0, 12)

    folders = sorted(p for p in (tmp_path / "cache").iterdir())
    assert len(folders) == 2
    first, second = ({p.name: p for p in f.glob("*.safetensors")} for f in folders)
    assert first.keys() == second.keys()  # the same images...
    from loracap.train.features import read_entry

    name = next(iter(first))
    assert not torch.allclose(read_entry(first[name]), read_entry(second[name]))  # ...other features


def test_a_changed_image_is_encoded_again(towers, tmp_path: Path, capsys) -> None:
    data = distinct_dataset(tmp_path / "data")
    run(towers, data, tmp_path / "before", tmp_path / "cache")
    capsys.readouterr()

    Image.new("RGB", (40, 40), (10, 10, 10)).save(data / "003.png")  # same name, new picture
    run(towers, data, tmp_path / "after", tmp_path / "cache")
    assert counts(capsys.readouterr().err) == (11, 1)
    run(towers, data, tmp_path / "plain", None)
    assert_same_weights(weights(tmp_path / "after"), weights(tmp_path / "plain"))  # it trained on the new one


def test_damaged_entries_are_computed_again(towers, tmp_path: Path, capsys) -> None:
    from loracap.train.features import read_entry

    data = distinct_dataset(tmp_path / "data")
    run(towers, data, tmp_path / "first", tmp_path / "cache")
    capsys.readouterr()
    truncated, zeros, altered, misplaced, other = entries(tmp_path / "cache")[:5]
    good = {p: read_entry(p) for p in (truncated, zeros, altered, misplaced)}
    truncated.write_bytes(truncated.read_bytes()[:1000])
    zeros.write_bytes(b"\x00" * 64)
    data_end = altered.read_bytes()  # a valid file whose numbers changed: only its checksum tells
    altered.write_bytes(data_end[:-1] + bytes([data_end[-1] ^ 0xFF]))
    shutil.copyfile(other, misplaced)  # a valid entry, of another image
    assert all(read_entry(p) is None for p in good)

    run(towers, data, tmp_path / "second", tmp_path / "cache")
    assert counts(capsys.readouterr().err) == (8, 4)
    # Written anew (in another batch than the first time, hence a tolerance: CPU kernels may round a
    # row differently with other rows beside it).
    assert all(torch.allclose(read_entry(p), features, rtol=0, atol=1e-6) for p, features in good.items())
    assert_same_weights(weights(tmp_path / "first"), weights(tmp_path / "second"))


def test_resume_with_the_cache_continues_exactly(towers, tmp_path: Path, monkeypatch) -> None:
    import loracap.train.loop as loop

    data = distinct_dataset(tmp_path / "data")
    args = {"checkpoint_every": 3, "eval_every": 100}
    run(towers, data, tmp_path / "straight", tmp_path / "cache", **args)

    real_checkpoint = loop._checkpoint

    def checkpoint_then_crash(accelerator, out, state, keep):
        real_checkpoint(accelerator, out, state, keep)
        raise KeyboardInterrupt  # the machine went away right after the step-3 checkpoint

    monkeypatch.setattr(loop, "_checkpoint", checkpoint_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run(towers, data, tmp_path / "resumed", tmp_path / "cache", **args)
    monkeypatch.setattr(loop, "_checkpoint", real_checkpoint)
    result = run(towers, data, tmp_path / "resumed", tmp_path / "cache", resume=True, **args)
    assert result.steps == 6
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []


def test_hugging_face_images_are_keyed_by_their_stored_bytes(towers, tmp_path: Path, capsys) -> None:
    import datasets

    names = list(COLOURS) * 3
    images = []
    for i, name in enumerate(names):
        image = Image.new("RGB", (40, 40), COLOURS[name])
        image.putpixel((i, 0), (0, 0, 0))
        images.append(image)
    table = datasets.Dataset.from_dict({"image": images, "text": [f"a {n} square" for n in names]})
    table.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "hf"))

    run(towers, tmp_path / "hf", tmp_path / "cached", tmp_path / "cache")
    split = json.loads((tmp_path / "cached" / "split.json").read_text())
    assert counts(capsys.readouterr().err) == (0, len(split["train"]) + len(split["val"]))
    assert entries(tmp_path / "cache") and all(
        p.name.startswith("bytes-") for p in entries(tmp_path / "cache")
    )
    run(towers, tmp_path / "hf", tmp_path / "plain", None)
    assert_same_weights(weights(tmp_path / "cached"), weights(tmp_path / "plain"))


def test_images_without_stored_bytes_are_keyed_by_their_pixels() -> None:
    from loracap.train.data import Example
    from loracap.train.features import image_key

    def example(colour: tuple[int, int, int]) -> Example:
        return Example("x", "a square", loader=lambda: Image.new("RGB", (8, 8), colour))

    red = image_key(example(COLOURS["red"]))
    assert red.startswith("pixels-") and red == image_key(example(COLOURS["red"]))
    assert red != image_key(example(COLOURS["blue"]))


def test_a_tower_being_trained_cannot_use_the_cache(towers, tmp_path: Path, capsys) -> None:
    data = distinct_dataset(tmp_path / "data")
    base = ["train", str(data), "--vision", str(towers[0]), "--lm", str(towers[1]), "--quiet"]
    for flag in (["--cache-features"], ["--feature-cache", str(tmp_path / "cache")]):
        assert main([*base, "--out", str(tmp_path / "out"), "--unfreeze-vision-layers", "1", *flag]) == 2
        err = capsys.readouterr().err
        assert "--cache-features needs a frozen vision tower" in err and "--unfreeze-vision-layers 1" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()

    # A cache folder that cannot be made is one line and exit status 2 too.
    (tmp_path / "a-file").write_text("not a folder", encoding="utf-8")
    assert main([*base, "--out", str(tmp_path / "no"), "--feature-cache", str(tmp_path / "a-file")]) == 2
    assert "cannot write the feature cache" in capsys.readouterr().err

    # The flag as such works from the command line (without --quiet, which hides the info line read here).
    quick = ["--max-steps", "1", "--batch-size", "4", "--workers", "0", "--warmup-steps", "1"]
    loud = [arg for arg in base if arg != "--quiet"]
    assert (
        main([*loud, "--out", str(tmp_path / "ok"), "--feature-cache", str(tmp_path / "cache"), *quick]) == 0
    )
    assert counts(capsys.readouterr().err) == (0, 12) and len(entries(tmp_path / "cache")) == 12
