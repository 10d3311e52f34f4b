"""LoRA files load everywhere at the trained strength: diffusers reproduces the in-memory model's image from
both layouts, and every key of the default layout is one that ComfyUI's (and so Forge's) key map knows,
applied at the trained alpha.

The pipelines are the test kit's tiny SD 1.5 / SDXL / Flux; LoRA weights are seeded random values (nothing is
trained) with alpha != rank, so a file that loses the alpha gives another image. Generation runs 2 steps at
64 px on one torch thread.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from loracap.dreambooth.lora_files import TrainingInfo, load_lora_state, save_lora, tag_frequency  # noqa: E402
from loracap.testing import make_tiny_model  # noqa: E402

FAMILIES = ("sd15", "sdxl", "flux")
RANK, ALPHA = 4, 2.0
# Attention (what diffusers' DreamBooth scripts target) plus feed-forward and, on the SD UNet, the 1x1-conv or
# linear proj_in, so the key rules see more than q/k/v; Flux adds its single blocks' proj_mlp/proj_out.
DENOISER_TARGETS = {
    "sd15": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in"],
    "sdxl": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in"],
    "flux": [
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
        "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
        "ff_context.net.2", "proj_mlp", "proj_out",
    ],
}  # fmt: skip
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora-files")
    return {family: make_tiny_model(family, root / family) for family in FAMILIES}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread per test


def _load(path: Path):
    import diffusers

    pipe = diffusers.DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _denoiser(pipe):
    return pipe.transformer if hasattr(pipe, "transformer") else pipe.unet


def _text_encoders(pipe, family: str) -> list:
    return [pipe.text_encoder, pipe.text_encoder_2] if family == "sdxl" else [pipe.text_encoder]


def _adapted(path: Path, family: str, *, rank: int = RANK, alpha: float = ALPHA, seed: int = 0):
    """The tiny pipeline with LoRA on the denoiser and each CLIP text encoder, set to seeded random values."""
    import torch
    from peft import LoraConfig

    pipe = _load(path)
    _denoiser(pipe).add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=DENOISER_TARGETS[family]))
    for encoder in _text_encoders(pipe, family):
        encoder.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=TEXT_TARGETS))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in (_denoiser(pipe), *_text_encoders(pipe, family)):
            for name, param in model.named_parameters():
                if ".lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return pipe


def _generate(pipe, family: str):
    import torch

    extra = {"max_sequence_length": 48} if family == "flux" else {}
    return pipe(
        "a photo of sks dog",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        **extra,
    ).images


def _save(pipe, family: str, path: Path, fmt: str, **kw) -> Path:
    return save_lora(
        path,
        _denoiser(pipe),
        _text_encoders(pipe, family),
        family=family,
        rank=RANK,
        alpha=ALPHA,
        fmt=fmt,
        **kw,
    )


# --- diffusers -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_loads_both_layouts_as_the_trained_model(built, tmp_path: Path, family: str) -> None:
    import numpy as np

    base_image = _generate(_load(built[family]), family)
    trained = _adapted(built[family], family)
    trained_image = _generate(trained, family)
    # The LoRA changes the image, so the comparisons below can fail.
    assert np.abs(trained_image - base_image).max() > 1e-2
    for fmt in ("kohya", "diffusers"):
        path = _save(trained, family, tmp_path / f"{fmt}.safetensors", fmt)
        pipe = _load(built[family])
        pipe.load_lora_weights(str(path), adapter_name="loracap")
        np.testing.assert_allclose(_generate(pipe, family), trained_image, atol=1e-5, err_msg=fmt)
        pipe.set_adapters(["loracap"], adapter_weights=[0.0])  # strength 0: the base model's image
        np.testing.assert_allclose(_generate(pipe, family), base_image, atol=1e-5, err_msg=fmt)


# --- ComfyUI ---------------------------------------------------------------------------------------------
# ComfyUI's LoRA key maps, encoded from its source (rules, not code):
#   Comfy-Org/ComfyUI@ec93dcacb96b922f7cb1417b3ba22bccb082df32 comfy/lora.py: model_lora_keys_unet (every
#     diffusers name `unet_to_diffusers` maps -> "lora_unet_" + name with "_" for "."; Flux: "transformer." +
#     every name `flux_to_diffusers` maps), model_lora_keys_clip (LORA_CLIP_MAP: lora_te_/lora_te1_/
#     text_encoder. for clip_l or clip_h, lora_te2_/text_encoder_2. for clip_g beside clip_l), load_lora
#     (`.alpha` per key, unknown keys logged "lora key not loaded").
#   Comfy-Org/ComfyUI@b3be02d6e766a8d3743dcf99cc967118f3ec8e3e comfy/utils.py: unet_to_diffusers
#     (UNET_MAP_RESNET, UNET_MAP_ATTENTIONS, TRANSFORMER_BLOCKS, UNET_MAP_BASIC), flux_to_diffusers.
#   comfyanonymous/ComfyUI@0323d8746da9beb8f3face4b77305af8d58319d6 comfy/weight_adapter/lora.py: the up/down
#     suffix pairs, scale alpha / rank (rank = rows of the down matrix), 1.0 when there is no `.alpha`.
# ComfyUI's UNet config (blocks, transformer depths) is taken from the diffusers config the way its model
# detection reads a checkpoint; each mapped name is checked against the tiny model's own parameters.

_RESNET = ("norm1", "conv1", "time_emb_proj", "norm2", "conv2", "conv_shortcut")
_ATTENTION = ("norm", "proj_in", "proj_out")
_TRANSFORMER_BLOCK = ("norm1", "norm2", "norm3", "ff.net.0.proj", "ff.net.2") + tuple(
    f"{attn}.{p}" for attn in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")
)
_UNET_BASIC = (
    "class_embedding.linear_1", "class_embedding.linear_2", "add_embedding.linear_1",
    "add_embedding.linear_2", "conv_in", "conv_norm_out", "conv_out", "time_embedding.linear_1",
    "time_embedding.linear_2",
)  # fmt: skip
_FLUX_DOUBLE = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
    "attn.to_out.0", "norm1.linear", "norm1_context.linear", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
    "ff_context.net.0.proj", "ff_context.net.2", "ff.linear_in", "ff.linear_out", "ff_context.linear_in",
    "ff_context.linear_out", "attn.norm_q", "attn.norm_k", "attn.norm_added_q", "attn.norm_added_k",
)  # fmt: skip
_FLUX_SINGLE = (
    "attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "norm.linear", "proj_out", "attn.norm_q",
    "attn.norm_k", "attn.to_qkv_mlp_proj", "attn.to_out",
)  # fmt: skip
_FLUX_BASIC = (
    "proj_out", "x_embedder", "context_embedder", "norm_out.linear", "controlnet_x_embedder",
    *(f"time_text_embed.{e}.linear_{i}" for e in ("timestep_embedder", "text_embedder", "guidance_embedder")
      for i in (1, 2)),
)  # fmt: skip
_LORA_CLIP_MAP = ("mlp.fc1", "mlp.fc2", "self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj")
_LORA_CLIP_MAP += ("self_attn.out_proj",)
# load_lora's (up, down) suffix pairs, in the order it tries them.
_COMFY_PAIRS = (
    (".lora_up.weight", ".lora_down.weight"),
    ("_lora.up.weight", "_lora.down.weight"),
    (".lora_B.weight", ".lora_A.weight"),
    (".lora.up.weight", ".lora.down.weight"),
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
)


def _unet_to_diffusers_names(config) -> set[str]:
    """The diffusers module names comfy.utils.unet_to_diffusers maps for a UNet with this config."""
    levels = len(config.block_out_channels)
    depth = config.transformer_layers_per_block
    depth = [depth] * levels if isinstance(depth, int) else list(depth)
    names = set(_UNET_BASIC)

    def block(prefix: str, attention_depth: int, resnets: int) -> None:
        for i in range(resnets):
            names.update(f"{prefix}.resnets.{i}.{r}" for r in _RESNET)
            if attention_depth:
                names.update(f"{prefix}.attentions.{i}.{a}" for a in _ATTENTION)
                names.update(
                    f"{prefix}.attentions.{i}.transformer_blocks.{t}.{b}"
                    for t in range(attention_depth)
                    for b in _TRANSFORMER_BLOCK
                )

    for x, kind in enumerate(config.down_block_types):
        block(f"down_blocks.{x}", depth[x] if "CrossAttn" in kind else 0, config.layers_per_block)
        names.add(f"down_blocks.{x}.downsamplers.0.conv")
    names.update(f"mid_block.resnets.{i}.{r}" for i in (0, 1) for r in _RESNET)
    names.update(f"mid_block.attentions.0.{a}" for a in _ATTENTION)
    names.update(
        f"mid_block.attentions.0.transformer_blocks.{t}.{b}"
        for t in range(depth[-1])
        for b in _TRANSFORMER_BLOCK
    )
    for x, kind in enumerate(config.up_block_types):
        block(f"up_blocks.{x}", depth[::-1][x] if "CrossAttn" in kind else 0, config.layers_per_block + 1)
        names.add(f"up_blocks.{x}.upsamplers.0.conv")
    return names


def _flux_to_diffusers_names(config) -> set[str]:
    """The diffusers module names comfy.utils.flux_to_diffusers maps for a Flux transformer like this."""
    names = set(_FLUX_BASIC)
    names.update(f"transformer_blocks.{i}.{b}" for i in range(config.num_layers) for b in _FLUX_DOUBLE)
    names.update(
        f"single_transformer_blocks.{i}.{b}" for i in range(config.num_single_layers) for b in _FLUX_SINGLE
    )
    return names


def _comfy_key_map(pipe, family: str) -> dict[str, tuple[int | None, str]]:
    """ComfyUI's {LoRA key: (None for the denoiser or the text encoder's index, diffusers module name)}."""
    denoiser = _denoiser(pipe)
    if family == "flux":
        key_map = {f"transformer.{n}": (None, n) for n in _flux_to_diffusers_names(denoiser.config)}
    else:
        key_map = {
            f"lora_unet_{n.replace('.', '_')}": (None, n) for n in _unet_to_diffusers_names(denoiser.config)
        }
    # Text encoders: SD 1.x and Flux have clip_l (SD 2.x clip_h, keyed alike); SDXL clip_l then clip_g.
    for index, encoder in enumerate(_text_encoders(pipe, family)):
        for b in range(min(encoder.config.num_hidden_layers, 32)):
            for c in _LORA_CLIP_MAP:
                target = (index, f"encoder.layers.{b}.{c}")
                kohya = f"text_model_encoder_layers_{b}_{c.replace('.', '_')}"
                diffusers = f"text_model.encoder.layers.{b}.{c}"
                if index == 0:
                    keys = [f"lora_te_{kohya}", f"lora_te1_{kohya}", f"text_encoder.{diffusers}"]
                else:
                    keys = [f"lora_te2_{kohya}", f"text_encoder_2.{diffusers}"]
                key_map.update(dict.fromkeys(keys, target))
    return key_map


def _comfy_load(lora: dict, key_map: dict) -> tuple[dict, set[str]]:
    """ComfyUI's load_lora over a file's tensors: {key: (up, down, alpha or None)}, and the keys it leaves."""
    patches, loaded = {}, set()
    for x in key_map:
        alpha = lora.get(f"{x}.alpha")
        if alpha is not None:
            loaded.add(f"{x}.alpha")
        for up_suffix, down_suffix in _COMFY_PAIRS:
            if x + up_suffix in lora:
                alpha = None if alpha is None else alpha.item()
                patches[x] = lora[x + up_suffix], lora[x + down_suffix], alpha
                loaded.update((x + up_suffix, x + down_suffix))
                break
    return patches, set(lora) - loaded


def _module(model, name: str):
    for candidate in (name, f"text_model.{name}"):
        try:
            return model.get_submodule(candidate)
        except AttributeError:
            continue
    raise AssertionError(f"no module {name} in {type(model).__name__}")


@pytest.mark.parametrize("family", FAMILIES)
def test_comfyui_loads_every_key_at_the_trained_strength(built, tmp_path: Path, family: str) -> None:
    import torch

    trained = _adapted(built[family], family)
    lora, _ = load_lora_state(_save(trained, family, tmp_path / "lora.safetensors", "kohya"))
    patches, not_loaded = _comfy_load(lora, _comfy_key_map(trained, family))
    assert not not_loaded, f"ComfyUI would log 'lora key not loaded' for {sorted(not_loaded)[:5]}"
    encoders = _text_encoders(trained, family)
    models = [_denoiser(trained), *encoders]
    adapted = {
        (index, name.removeprefix("text_model."))
        for index, model in zip([None, *range(len(encoders))], models, strict=True)
        for name, module in model.named_modules()
        if hasattr(module, "lora_A")
    }
    key_map = _comfy_key_map(trained, family)
    assert {key_map[x] for x in patches} == adapted  # every adapted module is in the file, once
    for x, (up, down, alpha) in patches.items():
        index, name = key_map[x]
        module = _module(models[0 if index is None else index + 1], name)
        weight = module.base_layer.weight
        # ComfyUI: weight += (alpha / rank) * (up @ down) reshaped to the weight (a 1x1 conv included).
        scale = 1.0 if alpha is None else alpha / down.shape[0]
        patched = weight + scale * (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
        torch.testing.assert_close(patched, weight + module.get_delta_weight("default"), msg=x)


# Names ComfyUI maps that a given model may lack: unused embeddings, shortcuts of resnets that keep their
# width, the last level's down/upsampler, Flux's guidance and ControlNet inputs, Flux 2 and LyCORIS names.
_MAY_BE_ABSENT = re.compile(
    r"^(class|add)_embedding\.|\.conv_shortcut$|^down_blocks\.\d+\.downsamplers|^up_blocks\.\d+\.upsamplers"
    r"|^controlnet_x_embedder$|guidance_embedder|\.to_qkv_mlp_proj$|\.linear_(in|out)$"
    r"|^single_transformer_blocks\.\d+\.attn\.to_out$"
)


@pytest.mark.parametrize("family", FAMILIES)
def test_comfyui_key_map_encoding_matches_the_tiny_models(built, family: str) -> None:
    """The encoded maps name the models' own modules: the config reading above agrees with the models."""
    pipe = _load(built[family])
    models = [_denoiser(pipe), *_text_encoders(pipe, family)]
    absent = set()
    for index, name in set(_comfy_key_map(pipe, family).values()):
        try:
            _module(models[0 if index is None else index + 1], name)
        except AssertionError:
            absent.add(name)
    assert all(_MAY_BE_ABSENT.search(name) for name in absent), sorted(absent)
    assert len(absent) < 10, sorted(absent)


# --- metadata, layout, refusals ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_kohya_file_keys_alpha_and_metadata(built, tmp_path: Path, family: str) -> None:
    trained = _adapted(built[family], family)
    info = TrainingInfo(
        base_model=str(built[family]),
        trigger="sks dog",
        steps=500,
        resolution=512,
        tag_frequency=tag_frequency("10_sks dog", ["sks dog, grass", "Sks Dog, beach , "]),
    )
    tensors, header = load_lora_state(
        _save(trained, family, tmp_path / "dog.safetensors", "kohya", metadata=info)
    )
    alphas = {k: v for k, v in tensors.items() if k.endswith(".alpha")}
    assert alphas and all(v.ndim == 0 and v.is_floating_point() for v in alphas.values())
    assert {v.item() for v in alphas.values()} == {ALPHA}  # the trained alpha, not the rank
    modules = {k.removesuffix(".alpha") for k in alphas}
    down, up = ("lora_A", "lora_B") if family == "flux" else ("lora_down", "lora_up")
    assert set(tensors) == {f"{m}.{s}" for m in modules for s in ("alpha", f"{down}.weight", f"{up}.weight")}
    prefixes = {"sd15": ("lora_unet_", "lora_te_"), "sdxl": ("lora_unet_", "lora_te1_", "lora_te2_")}
    prefixes["flux"] = ("transformer.", "text_encoder.text_model.encoder.layers.")
    assert {next(p for p in prefixes[family] if m.startswith(p)) for m in modules} == set(prefixes[family])
    assert header["ss_network_dim"] == "4" and header["ss_network_alpha"] == "2.0"
    assert header["ss_network_module"] == ("networks.lora_flux" if family == "flux" else "networks.lora")
    versions = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0", "flux": "flux1"}
    assert header["ss_base_model_version"] == versions[family] and header["ss_v2"] == "False"
    assert header["ss_sd_model_name"] == family  # a local folder is recorded by its name
    assert header["ss_output_name"] == "dog" and header["ss_steps"] == "500"
    assert header["ss_resolution"] == "(512, 512)" and header["modelspec.resolution"] == "512x512"
    assert json.loads(header["ss_tag_frequency"]) == {"10_sks dog": {"sks dog": 2, "grass": 1, "beach": 1}}
    assert header["loracap.trigger"] == header["modelspec.trigger_phrase"] == "sks dog"


def test_diffusers_layout_keeps_alpha_in_its_header(built, tmp_path: Path) -> None:
    trained = _adapted(built["sdxl"], "sdxl")
    tensors, header = load_lora_state(_save(trained, "sdxl", tmp_path / "lora.safetensors", "diffusers"))
    assert {k.split(".")[0] for k in tensors} == {"unet", "text_encoder", "text_encoder_2"}
    assert not any(k.endswith(".alpha") for k in tensors)
    adapters = json.loads(header["lora_adapter_metadata"])
    assert {k: v for k, v in adapters.items() if k.endswith((".r", ".lora_alpha"))} == {
        f"{part}.{key}": value
        for part in ("unet", "text_encoder", "text_encoder_2")
        for key, value in (("r", RANK), ("lora_alpha", ALPHA))
    }
    assert header["ss_network_alpha"] == "2.0"


def test_writes_atomically_over_an_old_file(built, tmp_path: Path) -> None:
    trained = _adapted(built["sd15"], "sd15")
    path = tmp_path / "out" / "lora.safetensors"
    for fmt in ("diffusers", "kohya"):
        _save(trained, "sd15", path, fmt)
        assert [p.name for p in path.parent.iterdir()] == ["lora.safetensors"]  # no temporary file left
    tensors, header = load_lora_state(path)
    assert any(k.startswith("lora_unet_") for k in tensors)
    assert header["ss_output_name"] == "lora" and header["ss_network_alpha"] == "2.0"
    assert not {"ss_resolution", "ss_sd_model_name", "loracap.trigger"} & set(header)  # no TrainingInfo


def test_refuses_what_the_file_cannot_say(built, tmp_path: Path) -> None:
    from peft import LoraConfig

    trained = _adapted(built["sd15"], "sd15")
    path = tmp_path / "lora.safetensors"
    with pytest.raises(ValueError, match="rank 4 and alpha 2.0, not rank 4 alpha 4"):
        save_lora(path, trained.unet, family="sd15", rank=4, alpha=4)
    with pytest.raises(ValueError, match="family"):
        save_lora(path, trained.unet, family="sd3", rank=RANK, alpha=ALPHA)
    with pytest.raises(ValueError, match="fmt"):
        save_lora(path, trained.unet, family="sd15", rank=RANK, alpha=ALPHA, fmt="peft")
    with pytest.raises(ValueError, match=r"hold 1 text encoder\(s\), not text encoder 2"):
        save_lora(path, trained.unet, [trained.text_encoder] * 2, family="sd15", rank=RANK, alpha=ALPHA)
    plain = _load(built["sd15"])
    with pytest.raises(ValueError, match="exactly one LoRA adapter, not 0"):
        save_lora(path, plain.unet, family="sd15", rank=RANK, alpha=ALPHA)
    plain.unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["to_q"], use_rslora=True))
    with pytest.raises(ValueError, match="use_rslora"):
        save_lora(path, plain.unet, family="sd15", rank=RANK, alpha=ALPHA)
    assert not path.exists()


def test_flux_takes_its_t5_unadapted_only(built, tmp_path: Path) -> None:
    from peft import LoraConfig

    trained = _adapted(built["flux"], "flux")
    encoders = [trained.text_encoder, trained.text_encoder_2]
    path = save_lora(
        tmp_path / "lora.safetensors", trained.transformer, encoders, family="flux", rank=RANK, alpha=ALPHA
    )
    assert {k.split(".")[0] for k in load_lora_state(path)[0]} == {"transformer", "text_encoder"}
    trained.text_encoder_2.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["q", "v"]))
    with pytest.raises(ValueError, match="not text encoder 2"):
        save_lora(path, trained.transformer, encoders, family="flux", rank=RANK, alpha=ALPHA)
