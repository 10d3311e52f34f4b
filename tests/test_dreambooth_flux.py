"""`loracap dreambooth` on Flux, and the memory options: the test kit's tiny Flux.1 (schnell and dev
layouts) at 32 px, a few steps, one torch thread. The tests check what a user sees: the loss is finite and
falls, the LoRA file loads in diffusers at the strength it was trained with and changes the images, a
resumed run ends with the uninterrupted run's weights, dev-style models get the guidance input, the
timestep sampling options draw what their names say, fp8 and Adafactor runs train, nf4 is refused on a
CPU with one line."""

from __future__ import annotations

import math
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
from test_dreambooth import COLOURS, dataset, image_array  # noqa: E402
from test_dreambooth import settings as dreambooth_settings  # noqa: E402

from loracap.cli import main  # noqa: E402
from loracap.dreambooth import families  # noqa: E402
from loracap.dreambooth.generate import GenerateConfig, apply_lora, generate  # noqa: E402
from loracap.dreambooth.loop import dreambooth  # noqa: E402
from loracap.dreambooth.settings import DreamBoothConfig  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread per test


def settings(data: Path, base: Path, out: Path, **overrides) -> DreamBoothConfig:
    """test_dreambooth's settings, with a short T5 window (the tiny T5 reads 32 tokens as well as 512)."""
    return dreambooth_settings(data, base, out, **{"max_sequence_length": 32, **overrides})


def test_flux_loss_is_finite_and_falls_on_a_single_repeated_image(tmp_path, tiny_model):
    data = dataset(tmp_path / "data", dict.fromkeys("abcd", "ohwx square"), size=(32, 32))
    for name in "bcd":
        Image.new("RGB", (32, 32), COLOURS[0]).save(data / f"{name}.png")
    result = dreambooth(
        settings(data, tiny_model("flux"), tmp_path / "out", max_steps=24, lr=2e-2, rank=4, batch_size=2)
    )  # fmt: skip
    assert result.family == "flux"
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 24 and all(math.isfinite(x) for x in losses)
    # Seeded: the same numbers every run. The last third's mean over the first third's: 0.59-0.82 over
    # seeds 0-2 (0.82 for seed 0); 1.04 at a learning rate of 1e-9 (the timesteps' noise alone).
    assert statistics.mean(losses[-8:]) < 0.9 * statistics.mean(losses[:8])


def test_flux_lora_loads_in_diffusers_at_its_trained_strength_and_changes_the_images(tmp_path, tiny_model):
    """The file holds `transformer.<diffusers path>.lora_A/B` and `.alpha` (the trained alpha, not the
    rank); diffusers applies it at alpha / rank, so fusing it gives base + alpha/rank x B A exactly; the
    images change, and scale 0 gives the base's back."""
    from diffusers import FluxPipeline

    base = tiny_model("flux")
    data = dataset(tmp_path / "data", {"a": "ohwx square", "b": "ohwx square"})
    result = dreambooth(settings(data, base, tmp_path / "out", max_steps=3, lr=5e-2, rank=4, alpha=8.0))
    tensors = load_file(str(result.lora))
    ups = sorted(k for k in tensors if k.endswith(".lora_B.weight"))
    assert ups and all(k.startswith("transformer.") for k in tensors)
    module = ups[0].removesuffix(".lora_B.weight")
    assert tensors[f"{module}.alpha"].item() == 8.0

    pipe = FluxPipeline.from_pretrained(base)
    path = module.removeprefix("transformer.")
    weight = pipe.transformer.get_submodule(path).weight.detach().clone()
    apply_lora(pipe, result.lora)
    pipe.fuse_lora(components=["transformer"], lora_scale=1.0)
    fused = pipe.transformer.get_submodule(path)
    fused = getattr(fused, "base_layer", fused).weight.detach()
    delta = tensors[f"{module}.lora_B.weight"] @ tensors[f"{module}.lora_A.weight"]
    torch.testing.assert_close(fused, weight + (8.0 / 4) * delta, rtol=1e-5, atol=1e-6)

    def first_image(name: str, **lora) -> np.ndarray:
        config = GenerateConfig(
            base=str(base), prompts=["ohwx square"], n=1, steps=2, width=32, height=32,
            out=tmp_path / name / "grid.png", progress=False, **lora,
        )  # fmt: skip
        return image_array(generate(config)[0])

    plain = first_image("base")
    assert np.abs(first_image("lora", lora=result.lora) - plain).max() > 8
    assert np.abs(first_image("zero", lora=result.lora, lora_scale=0.0) - plain).max() <= 1


def test_flux_resumed_run_ends_with_the_uninterrupted_runs_weights(tmp_path, tiny_model):
    data = dataset(tmp_path / "data", {"a": "ohwx red", "b": "ohwx blue", "c": "ohwx green"}, size=(48, 32))
    common = {
        "max_steps": 4,
        "checkpoint_every": 2,
        "lr": 1e-2,
        "random_flip": True,
        "caption_dropout": 0.3,
        "class_prompt": "a square",
        "num_class_images": 2,
        "class_data_dir": str(tmp_path / "class"),
        "timestep_shift": 3.0,
    }
    base = tiny_model("flux")
    whole = dreambooth(settings(data, base, tmp_path / "whole", **common))

    def stop_at_3(state):
        if state["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        dreambooth(settings(data, base, tmp_path / "parts", **common), on_step=stop_at_3)
    resumed = dreambooth(settings(data, base, tmp_path / "parts", resume=True, **common))
    assert resumed.resumed_from == 3 and resumed.steps == 4
    a = load_file(str(tmp_path / "whole" / "checkpoints" / "step-4" / "lora.safetensors"))
    b = load_file(str(tmp_path / "parts" / "checkpoints" / "step-4" / "lora.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("denoiser.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert whole.history[-1]["loss"] == resumed.history[-1]["loss"]


def test_a_dev_model_gets_the_guidance_input_and_a_schnell_model_none(tmp_path, tiny_model, monkeypatch):
    seen: list[object] = []
    original = families.Flux.loss

    def spy(self, batch, generator):
        forward = self.denoiser.forward

        def record(*args, **kwargs):
            guidance = kwargs.get("guidance")
            seen.append(None if guidance is None else guidance.tolist())
            return forward(*args, **kwargs)

        monkeypatch.setattr(self.denoiser, "forward", record)
        try:
            return original(self, batch, generator)
        finally:
            monkeypatch.undo()

    monkeypatch.setattr(families.Flux, "loss", spy)
    data = dataset(tmp_path / "data", {"a": "ohwx", "b": "ohwx"})
    dreambooth(settings(data, tiny_model("flux-dev"), tmp_path / "dev", batch_size=2, max_steps=1,
                        flux_guidance=2.5))  # fmt: skip
    monkeypatch.setattr(families.Flux, "loss", spy)
    dreambooth(settings(data, tiny_model("flux"), tmp_path / "schnell", batch_size=2, max_steps=1))
    assert seen == [[2.5, 2.5], None]


@pytest.mark.parametrize(
    ("sampling", "shift", "extra", "median"),
    [
        ("uniform", 1.0, {}, 0.5),
        ("sigmoid", 1.0, {}, 0.5),
        ("sigmoid", 3.0, {}, 0.75),  # 3 x 0.5 / (1 + 2 x 0.5): shifted towards noise
        ("logit-normal", 1.0, {"logit_mean": 1.0}, 1 / (1 + math.exp(-1))),
    ],
)
def test_timestep_sampling_draws_what_its_name_says(tiny_model, sampling, shift, extra, median):
    from diffusers import FluxPipeline

    config = settings(Path("."), tiny_model("flux"), Path("."), timestep_sampling=sampling,
                      timestep_shift=shift, **extra)  # fmt: skip
    family = families.Flux(FluxPipeline.from_pretrained(tiny_model("flux")), config)
    t = family.timesteps(20000, torch.Generator().manual_seed(0))
    assert t.min() > 0 and t.max() < 1
    assert t.median().item() == pytest.approx(median, abs=0.01)
    spread = (t.quantile(0.9) - t.quantile(0.1)).item()
    # uniform spreads over 0.8 of the range; a logistic of a normal concentrates around its median
    assert spread == pytest.approx(0.8, abs=0.02) if sampling == "uniform" else spread < 0.6


def test_fp8_base_and_adafactor_train(tmp_path, tiny_model):
    """--quantize-base fp8 stores the frozen transformer's weights as float8 (the LoRA stays float32) and
    still trains; Adafactor moves the weights like AdamW does."""
    data = dataset(tmp_path / "data", {"a": "ohwx red", "b": "ohwx blue"})
    seen: dict[str, set[torch.dtype]] = {}
    original = families.Flux.loss

    def spy(self, batch, generator):
        params = dict(self.denoiser.named_parameters())
        seen["frozen"] = {
            p.dtype for n, p in params.items() if not p.requires_grad and n.endswith("to_q.base_layer.weight")
        }
        seen["lora"] = {p.dtype for p in params.values() if p.requires_grad}
        return original(self, batch, generator)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(families.Flux, "loss", spy)
        result = dreambooth(settings(data, tiny_model("flux"), tmp_path / "fp8", quantize_base="fp8",
                                     optimizer="adafactor", lr=1e-2, max_steps=3))  # fmt: skip
    assert seen == {"frozen": {torch.float8_e4m3fn}, "lora": {torch.float32}}
    assert all(math.isfinite(h["loss"]) for h in result.history)
    tensors = load_file(str(result.lora))
    assert any(t.abs().max() > 0 for k, t in tensors.items() if k.endswith("lora_B.weight"))  # B starts at 0


def test_nf4_and_text_encoder_training_are_refused_for_what_cannot_run(tmp_path, tiny_model, capsys):
    data = dataset(tmp_path / "data", {"a": "ohwx"})
    args = [
        "dreambooth",
        str(data),
        "--base",
        str(tiny_model("flux")),
        "--out",
        str(tmp_path / "out"),
        "--quiet",
    ]
    assert main([*args, "--quantize-base", "nf4"]) == 2
    assert "--quantize-base nf4 needs a CUDA GPU" in capsys.readouterr().err
    assert main([*args, "--train-text-encoder"]) == 2
    assert "--train-text-encoder is for SD 1.x/2.x and SDXL" in capsys.readouterr().err
    assert main([*args, "--resolution", "33", "--no-bucket"]) == 2
    assert "--resolution must be a multiple of 8" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_flux_from_the_command_line_with_class_images_and_validation(tmp_path, tiny_model, capsys):
    """The whole command on Flux: class images generated with Flux's guidance default, a validation grid,
    the LoRA in OUT, and the peak memory said at the end."""
    data = dataset(tmp_path / "data", {"a": "ohwx red", "b": "ohwx blue"})
    out = tmp_path / "out"
    code = main(["dreambooth", str(data), "--base", str(tiny_model("flux-dev")), "--out", str(out),
                 "--resolution", "32", "--bucket-reso-steps", "8", "--max-steps", "2", "--workers", "0",
                 "--class-prompt", "a square", "--num-class-images", "2", "--class-inference-steps", "1",
                 "--validation-prompt", "[trigger] square", "--trigger", "ohwx", "--validation-every", "2",
                 "--validation-inference-steps", "1", "--max-sequence-length", "32", "--quiet",
                 "-v"])  # fmt: skip
    assert code == 0
    err = capsys.readouterr().err
    assert "peak process memory (RSS):" in err
    assert (out / "out.safetensors").is_file() and sorted((out / "samples").iterdir())
    manifest = (out / "class-images" / "loracap-class-images.json").read_text()
    assert '"guidance": 3.5' in manifest


def test_compile_trains_the_same_steps_and_saves_the_same_lora(tmp_path, tiny_model):
    """--compile (the transformer's repeated blocks through torch.compile; about 40 s of compiling on a CPU)
    gives the losses and the LoRA file of the eager run."""
    data = dataset(tmp_path / "data", {"a": "ohwx red", "b": "ohwx blue"})
    eager = dreambooth(settings(data, tiny_model("flux"), tmp_path / "eager", max_steps=3, lr=1e-2))
    compiled = dreambooth(settings(data, tiny_model("flux"), tmp_path / "compiled", max_steps=3, lr=1e-2,
                                   compile=True))  # fmt: skip
    assert [h["loss"] for h in compiled.history] == pytest.approx(
        [h["loss"] for h in eager.history], rel=1e-4
    )
    a, b = load_file(str(eager.lora)), load_file(str(compiled.lora))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-6)
