"""`loracap generate` on the test kit's tiny SD 1.5 / SDXL / Flux pipelines: files and grid, seeds, CFG in one
batched UNet call, negative prompts, schedulers, LoRAs (diffusers and kohya files), and bases refused before
anything loads. One torch thread, 2 steps, 64 px."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("diffusers")

from loracap.cli import main  # noqa: E402
from loracap.dreambooth.base import base_family, load_base, prediction_type, resolve_base  # noqa: E402
from loracap.dreambooth.generate import (  # noqa: E402
    FLUX_SCHEDULERS,
    SCHEDULERS,
    GenerateConfig,
    generate,
    render_images,
    set_scheduler,
)

FAMILIES = ("sd15", "sdxl", "flux")
PIPELINES = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "flux": "FluxPipeline"}
# On the CPU wherever the tests run: exact pixel comparisons need its determinism.
FAST = {"steps": 2, "width": 64, "height": 64, "progress": False, "device": "cpu"}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread per test


def run(base: Path, out: Path, prompts: list[str], **settings) -> list[Path]:
    return generate(GenerateConfig(base=str(base), prompts=prompts, out=str(out), **{**FAST, **settings}))


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def make_lora(base: Path, family: str, out: Path) -> Path:
    """A diffusers-format LoRA for `base`: a peft adapter with random non-zero weights on the denoiser's
    attention projections, saved with the pipeline class's own `save_lora_weights`."""
    import diffusers
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(adapted_denoiser(base, family)))
    assert state and all(t.abs().sum() > 0 for t in state.values())
    key = "transformer_lora_layers" if family == "flux" else "unet_lora_layers"
    getattr(diffusers, PIPELINES[family]).save_lora_weights(out, **{key: state})
    return out


def adapted_denoiser(base: Path, family: str):
    """The base's UNet / transformer with one LoRA adapter (rank 4, alpha 4) of seeded random weights."""
    import diffusers
    import torch
    from peft import LoraConfig

    cls, sub = (
        ("FluxTransformer2DModel", "transformer") if family == "flux" else ("UNet2DConditionModel", "unet")
    )
    model = getattr(diffusers, cls).from_pretrained(base, subfolder=sub)
    torch.manual_seed(0)
    config = LoraConfig(
        r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"]
    )
    model.add_adapter(config)
    return model


# --------------------------------------------------------------------------------------------- the files


@pytest.mark.parametrize("family", FAMILIES)
def test_writes_each_image_and_one_grid(tiny_model, tmp_path, family):
    written = run(tiny_model(family), tmp_path / "out" / "grid.png", ["a red square", "a blue circle"], n=3)
    images, grid = written[:-1], written[-1]
    assert grid == tmp_path / "out" / "grid.png"
    assert [p.name for p in images] == [f"grid-{i}-{j}.png" for i in range(2) for j in range(3)]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in written)
    assert all(Image.open(p).size == (64, 64) for p in images)
    assert Image.open(grid).size == (3 * 64, 2 * 64)  # a column per image, a row per prompt
    # The grid is the images themselves, in place.
    assert np.array_equal(pixels(grid)[64:128, 128:192], pixels(images[5]))
    parameters = Image.open(images[4]).text["parameters"]
    assert parameters.startswith("a blue circle\n") and "Seed: 1," in parameters and "Steps: 2," in parameters


def test_default_size_is_the_bases_native_one(tiny_model, tmp_path):
    written = run(tiny_model("sd15"), tmp_path / "grid.png", ["a dog"], n=1, width=None, height=None)
    assert Image.open(written[0]).size == (64, 64)  # the kit's UNet sample_size 32 x VAE factor 2


def test_out_may_name_a_folder(tiny_model, tmp_path):
    written = run(tiny_model("sd15"), tmp_path, ["a dog"], n=1)
    assert written == [tmp_path / "grid-0-0.png", tmp_path / "grid.png"]


# --------------------------------------------------------------------------------------------- seeds


def test_same_seed_same_image_and_image_j_uses_seed_plus_j(tiny_model, tmp_path):
    base = tiny_model("sd15")
    first = run(base, tmp_path / "a" / "g.png", ["a dog"], n=2, seed=5, batch_size=1)
    again = run(base, tmp_path / "b" / "g.png", ["a dog"], n=2, seed=5, batch_size=1)
    shifted = run(base, tmp_path / "c" / "g.png", ["a dog"], n=2, seed=6, batch_size=1)
    assert np.array_equal(pixels(first[0]), pixels(again[0]))
    assert np.array_equal(pixels(first[1]), pixels(again[1]))
    assert not np.array_equal(pixels(first[0]), pixels(first[1]))  # seeds 5 and 6 differ
    assert np.array_equal(pixels(first[1]), pixels(shifted[0]))  # both seed 6


def test_adding_a_prompt_leaves_the_first_prompts_images_alone(tiny_model, tmp_path):
    base = tiny_model("sdxl")
    one = run(base, tmp_path / "one" / "g.png", ["a dog"], n=3, seed=2)
    two = run(base, tmp_path / "two" / "g.png", ["a dog", "a cat"], n=3, seed=2)
    for j in range(3):
        assert np.array_equal(pixels(one[j]), pixels(two[j]))
    assert not np.array_equal(pixels(two[0]), pixels(two[3]))  # the second prompt draws something else


# --------------------------------------------------------------------------------------- guidance


def _denoiser_batches(family: str, base: Path, cfg: float, n: int) -> list[int]:
    """The batch size of every call of the pipeline's real UNet / transformer, seen by a forward hook."""
    pipe = load_base(base, device="cpu", progress=False)
    set_scheduler(pipe, "default" if family == "flux" else "ddim")  # DDIM: one UNet call a step
    denoiser = pipe.transformer if family == "flux" else pipe.unet
    batches: list[int] = []
    denoiser.register_forward_hook(lambda module, args, output: batches.append(output[0].shape[0]))
    render_images(
        pipe, GenerateConfig(prompts=["a dog"], n=n, cfg=cfg, batch_size=n, negative="blur", **FAST)
    )
    return batches


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_cfg_runs_prompt_and_negative_as_one_unet_batch(tiny_model, family):
    assert _denoiser_batches(family, tiny_model(family), cfg=7.0, n=3) == [6, 6]  # 2 steps, one call each
    assert _denoiser_batches(family, tiny_model(family), cfg=1.0, n=3) == [3, 3]  # no guidance: no uncond


def test_flux_cfg_is_diffusers_true_cfg_with_a_second_pass(tiny_model):
    assert _denoiser_batches("flux", tiny_model("flux"), cfg=1.0, n=2) == [2, 2]
    assert _denoiser_batches("flux", tiny_model("flux"), cfg=4.0, n=2) == [2, 2, 2, 2]  # prompt, negative


@pytest.mark.parametrize("family", FAMILIES)
def test_negative_prompt_changes_the_image_with_cfg(tiny_model, tmp_path, family):
    base = tiny_model(family)
    plain = run(base, tmp_path / "plain" / "g.png", ["a dog"], n=1, cfg=4.0)
    negative = run(base, tmp_path / "neg" / "g.png", ["a dog"], n=1, cfg=4.0, negative="a red cat, blurry")
    assert not np.array_equal(pixels(plain[0]), pixels(negative[0]))


def test_negative_without_cfg_changes_nothing_and_says_so(tiny_model, tmp_path, capsys):
    base = tiny_model("sd15")
    plain = run(base, tmp_path / "plain" / "g.png", ["a dog"], n=1, cfg=1.0)
    negative = run(base, tmp_path / "neg" / "g.png", ["a dog"], n=1, cfg=1.0, negative="a red cat")
    assert np.array_equal(pixels(plain[0]), pixels(negative[0]))
    assert "--negative has no effect without --cfg above 1" in capsys.readouterr().err


def test_cfg_changes_the_image(tiny_model, tmp_path):
    base = tiny_model("sd15")
    low = run(base, tmp_path / "low" / "g.png", ["a dog"], n=1, cfg=1.0)
    high = run(base, tmp_path / "high" / "g.png", ["a dog"], n=1, cfg=9.0)
    assert not np.array_equal(pixels(low[0]), pixels(high[0]))


# ------------------------------------------------------------------------------------------ schedulers


def test_every_scheduler_generates_sd_and_samples_its_own_way(tiny_model, tmp_path):
    base = tiny_model("sd15")
    images = {}
    for name in SCHEDULERS:
        written = run(base, tmp_path / name / "g.png", ["a dog"], n=2, scheduler=name)
        assert [Image.open(p).size for p in written] == [(64, 64), (64, 64), (128, 64)], name
        images[name] = pixels(written[0])
    for name in set(SCHEDULERS) - {"default", "pndm"}:  # the kit's base samples with PNDM
        assert not np.array_equal(images[name], images["default"]), name
    assert np.array_equal(images["pndm"], images["default"])


def test_schedulers_keep_the_noise_schedule_and_a_v_prediction(tiny_model, tmp_path):
    import diffusers

    folder = tmp_path / "sd-v"
    shutil.copytree(tiny_model("sd15"), folder)
    config_file = folder / "scheduler" / "scheduler_config.json"
    config_file.write_text(
        json.dumps({**json.loads(config_file.read_text()), "prediction_type": "v_prediction"})
    )
    assert prediction_type(folder) == "v_prediction"
    pipe = load_base(folder, device="cpu", progress=False)
    for name, (cls, _) in SCHEDULERS.items():
        set_scheduler(pipe, name)
        assert type(pipe.scheduler).__name__ == (cls or "PNDMScheduler") or name == "default"
        assert pipe.scheduler.config.prediction_type == "v_prediction", name
        assert pipe.scheduler.config.beta_schedule == "scaled_linear", name
    karras = diffusers.DPMSolverMultistepScheduler
    set_scheduler(pipe, "dpm++-karras")
    assert isinstance(pipe.scheduler, karras) and pipe.scheduler.config.use_karras_sigmas


def test_flux_takes_only_flow_matching_schedulers(tiny_model, tmp_path):
    assert set(FLUX_SCHEDULERS) == {"default", "euler"}
    written = run(tiny_model("flux"), tmp_path / "g.png", ["a dog"], n=1, scheduler="euler")
    assert len(written) == 2
    with pytest.raises(ValueError, match="scheduler 'ddim' does not sample flux"):
        run(tiny_model("flux"), tmp_path / "g.png", ["a dog"], n=1, scheduler="ddim")


# ------------------------------------------------------------------------------------------------ LoRA


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_changes_the_image_and_scale_zero_is_the_base_exactly(tiny_model, tmp_path, family):
    base = tiny_model(family)
    lora = make_lora(base, family, tmp_path / "lora")
    kw = {"n": 2, "seed": 3, "cfg": 3.0}
    plain = run(base, tmp_path / "base" / "g.png", ["a dog"], **kw)
    tuned = run(base, tmp_path / "lora-1" / "g.png", ["a dog"], lora=str(lora), **kw)
    off = run(base, tmp_path / "lora-0" / "g.png", ["a dog"], lora=str(lora), lora_scale=0.0, **kw)
    file = lora / "pytorch_lora_weights.safetensors"
    half = run(base, tmp_path / "lora-h" / "g.png", ["a dog"], lora=str(file), lora_scale=0.5, **kw)
    for j in range(2):
        assert not np.array_equal(pixels(plain[j]), pixels(tuned[j]))
        assert np.array_equal(pixels(plain[j]), pixels(off[j]))
        assert not np.array_equal(pixels(half[j]), pixels(tuned[j]))


@pytest.mark.parametrize("family", FAMILIES)
def test_a_kohya_file_from_lora_files_gives_the_same_images(tiny_model, tmp_path, family):
    lora_files = pytest.importorskip("loracap.dreambooth.lora_files")
    base = tiny_model(family)
    diffusers_lora = make_lora(base, family, tmp_path / "diffusers")
    kohya = lora_files.save_lora(
        tmp_path / "kohya" / "ohwx.safetensors",
        adapted_denoiser(base, family),
        family=family,
        rank=4,
        alpha=4,
    )
    kw = {"n": 1, "seed": 1, "cfg": 3.0}
    plain = run(base, tmp_path / "base" / "g.png", ["a dog"], **kw)
    from_kohya = run(base, tmp_path / "k" / "g.png", ["a dog"], lora=str(kohya.parent), **kw)
    from_diffusers = run(base, tmp_path / "d" / "g.png", ["a dog"], lora=str(diffusers_lora), **kw)
    assert not np.array_equal(pixels(plain[0]), pixels(from_kohya[0]))
    assert np.abs(pixels(from_kohya[0]) - pixels(from_diffusers[0])).max() <= 1  # same weights, other keys


def test_a_lora_for_another_family_is_refused(tiny_model, tmp_path):
    lora = make_lora(tiny_model("flux"), "flux", tmp_path / "flux-lora")
    with pytest.raises(ValueError, match="matches no layer of this sd15 base"):
        run(tiny_model("sd15"), tmp_path / "g.png", ["a dog"], n=1, lora=str(lora))


def test_a_missing_lora_is_refused_before_the_base_loads(tmp_path):
    with pytest.raises(FileNotFoundError, match="no LoRA file or folder"):
        run(tmp_path / "no-base", tmp_path / "g.png", ["a dog"], lora=str(tmp_path / "nothing"))


# ------------------------------------------------------------------------------------------------ bases


@pytest.mark.parametrize("family", FAMILIES)
def test_base_family_reads_model_index(tiny_model, family):
    assert base_family(tiny_model(family)) == family


def _copy_with_index(source: Path, folder: Path, **changes) -> Path:
    shutil.copytree(source, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, **changes}))
    return folder


def test_base_family_refuses_what_is_not_a_text_to_image_base(tiny_model, tmp_path):
    with pytest.raises(ValueError, match=r"no model_index.json; its config.json describes a Blip"):
        base_family(tiny_model("blip"))
    with pytest.raises(ValueError, match="holds a StableDiffusion3Pipeline, not a base"):
        base_family(
            _copy_with_index(tiny_model("sd15"), tmp_path / "sd3", _class_name="StableDiffusion3Pipeline")
        )
    with pytest.raises(ValueError, match=r"without text_encoder, tokenizer \(an SDXL refiner\?\)"):
        base_family(
            _copy_with_index(
                tiny_model("sdxl"), tmp_path / "refiner", text_encoder=[None, None], tokenizer=[None, None]
            )
        )
    inpaint = _copy_with_index(tiny_model("sd15"), tmp_path / "inpaint")
    unet_config = inpaint / "unet" / "config.json"
    unet_config.write_text(json.dumps({**json.loads(unet_config.read_text()), "in_channels": 9}))
    with pytest.raises(ValueError, match="takes 9 input channels"):
        base_family(inpaint)


def test_cli_refuses_another_pipeline_in_one_line_before_loading_weights(tiny_model, tmp_path, capsys):
    folder = _copy_with_index(tiny_model("sd15"), tmp_path / "other", _class_name="KandinskyV22Pipeline")
    for weights in folder.rglob("*.safetensors"):
        weights.write_bytes(b"not weights: reading these would fail loudly")
    status = main(["generate", "a dog", "--base", str(folder), "--out", str(tmp_path / "g.png"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert err == [f"loracap: error: {folder} holds a KandinskyV22Pipeline, not a base loracap can use: "
                   "Stable Diffusion 1.x/2.x (StableDiffusionPipeline), SDXL (StableDiffusionXLPipeline) "
                   "or Flux (FluxPipeline)"]  # fmt: skip
    assert not (tmp_path / "g.png").exists()


def test_cli_refuses_a_captioning_model_folder(tiny_model, tmp_path, capsys):
    status = main(["generate", "a dog", "--base", str(tiny_model("blip")), "--out", str(tmp_path / "g.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1
    assert "is not a diffusers pipeline folder: it has no model_index.json" in err[0]


def test_online_a_hub_base_is_checked_before_its_weights_download(tiny_model, tmp_path, monkeypatch):
    """No hub here: the two downloads are stand-ins serving the kit's folders, to show their order."""
    import diffusers
    import huggingface_hub

    served = {
        "someone/sd3": _copy_with_index(
            tiny_model("sd15"), tmp_path / "sd3", _class_name="StableDiffusion3Pipeline"
        ),
        "someone/sd15": tiny_model("sd15"),
    }
    downloads = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name, **kw: str(served[repo] / name))
    monkeypatch.setattr(
        diffusers.DiffusionPipeline,
        "download",
        lambda repo, **kw: downloads.append((repo, kw)) or str(served[repo]),
    )
    with pytest.raises(ValueError, match="holds a StableDiffusion3Pipeline, not a base"):
        resolve_base("someone/sd3", offline=False)
    assert downloads == []
    assert resolve_base("someone/sd15", offline=False) == served["someone/sd15"]
    [(repo, options)] = downloads
    assert repo == "someone/sd15" and options["safety_checker"] is None  # not fetched: generate leaves it off


def test_cli_missing_base_offline_says_how_to_fix_it(tmp_path, capsys):
    status = main(["generate", "a dog", "--base", "nobody/no-such-base", "--out", str(tmp_path / "g.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1
    assert "nobody/no-such-base is not in the local Hugging Face cache" in err[0]
    assert "hf download nobody/no-such-base" in err[0] and "--base PATH" in err[0]


# -------------------------------------------------------------------------------------------------- CLI


def test_cli_generates_from_prompts_a_file_and_a_config(tiny_model, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\n  a red bird  \n")
    config = tmp_path / "gen.toml"
    config.write_text(f'base = "{tiny_model("sd15")}"\nsteps = 2\nn = 2\nscheduler = "euler-a"\n')
    out = tmp_path / "out" / "grid.png"
    argv = ["generate", "a dog", "--prompts-file", str(prompts), "--config", str(config), "--out", str(out)]
    status = main([*argv, "--seed", "1", "--cfg", "6", "--negative", "blurry", "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert status == 0
    assert Image.open(out).size == (2 * 64, 3 * 64)  # three prompts: the argument, then the file's two
    assert (
        Image.open(out.parent / "grid-2-1.png")
        .text["parameters"]
        .startswith("a red bird\nNegative prompt: blurry")
    )
    assert "Sampler: euler-a" in Image.open(out.parent / "grid-0-0.png").text["parameters"]
    assert (
        "loracap: 6 image(s) in " in err and f"grid {out}, images beside it as grid-PROMPT-IMAGE.png" in err
    )


def test_cli_needs_a_prompt_and_a_base(tiny_model, tmp_path, capsys):
    assert main(["generate", "--base", str(tiny_model("sd15")), "--out", str(tmp_path / "g.png")]) == 2
    assert main(["generate", "a dog", "--out", str(tmp_path / "g.png")]) == 2
    assert main(["generate", "a dog", "--base", "x", "--out", str(tmp_path / "g.jpg")]) == 2
    err = capsys.readouterr().err
    assert "no prompt: give one or more prompts" in err
    assert "no base model: give --base" in err
    assert "--out names the grid PNG" in err
    assert not list(tmp_path.iterdir())


def test_captions_write_each_images_prompt_beside_it(tiny_model, tmp_path):
    """Generated images that join a dataset come captioned with the prompt they were made from."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("ohwx, red hat\nohwx, blue coat\n", encoding="utf-8")
    out = tmp_path / "gen" / "grid.png"
    code = main(["generate", "--base", str(tiny_model("sd15")), "--prompts-file", str(prompts), "--n", "2",
                 "--steps", "1", "--out", str(out), "--captions", "--quiet"])  # fmt: skip
    assert code == 0
    captions = {p.stem: p.read_text(encoding="utf-8").strip() for p in sorted(out.parent.glob("*.txt"))}
    assert captions == {"grid-0-0": "ohwx, red hat", "grid-0-1": "ohwx, red hat",
                        "grid-1-0": "ohwx, blue coat", "grid-1-1": "ohwx, blue coat"}  # fmt: skip
    assert all((out.parent / f"{stem}.png").is_file() for stem in captions)
