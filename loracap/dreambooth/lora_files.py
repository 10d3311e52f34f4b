"""The LoRA file `loracap dreambooth` writes: one `.safetensors` that the usual tools load at full strength.

`save_lora(path, denoiser, text_encoders, family=..., rank=..., alpha=...)` takes the peft-adapted models
(`unet.add_adapter(LoraConfig(...))`, as diffusers' train_dreambooth_lora*.py scripts do) and writes one of
two layouts, atomically (a temporary file renamed over `path`):

fmt="kohya" (the default), SD 1.x/2.x and SDXL: kohya-ss sd-scripts' layout (networks/lora.py).
    `lora_unet_<diffusers module path, "." -> "_">`, `lora_te_<...>` (SD 1.x/2.x, one text encoder) or
    `lora_te1_<...>` / `lora_te2_<...>` (SDXL: CLIP-L, CLIP-G), the text encoder path in the hub layout
    (`text_model_encoder_layers_N_self_attn_q_proj`); per module `.lora_down.weight` (peft's lora_A),
    `.lora_up.weight` (lora_B) and `.alpha`, a float scalar equal to the trained lora_alpha, so a tool's
    scale alpha / rank is peft's. (diffusers' `convert_state_dict_to_kohya` writes alpha = rank instead,
    which loses any other trained alpha.) Who reads it:
    - ComfyUI (comfy/lora.py `model_lora_keys_unet`, `model_lora_keys_clip`; comfy/utils.py
      `unet_to_diffusers`): `lora_unet_` + any diffusers UNet path `unet_to_diffusers` maps (resnets,
      attentions, transformer blocks, samplers, embeddings); `lora_te_`/`lora_te1_` (CLIP-L, or SD 2.x's
      CLIP-H) and `lora_te2_` (CLIP-G) for `self_attn.{q,k,v,out}_proj` and `mlp.fc1/fc2`; `.alpha` per
      module, scale 1.0 without one. Forge loads LoRAs through the same ComfyUI key maps
      (backend/patcher/lora.py).
    - A1111 (extensions-builtin/Lora/networks.py `convert_diffusers_name_to_compvis`): `lora_unet_`
      `down_blocks_`/`mid_block_`/`up_blocks_` paths, renumbered for the 2 resnets per level that SD 1.x/2.x
      and SDXL have; `lora_te_text_model_encoder_layers_` (SD 1.x; OpenCLIP names on SD 2.x),
      `lora_te1_text_model`, `lora_te2_text_model_encoder_layers_` (OpenCLIP attention: it needs q, k, v
      and out_proj together).
    - diffusers' `load_lora_weights` (`_convert_non_diffusers_lora_to_diffusers`), and so SD.Next;
      InvokeAI keeps diffusers-path SDXL keys as they are.
fmt="kohya", Flux: `transformer.<diffusers path>.lora_A.weight` / `.lora_B.weight`, and
    `text_encoder.text_model.<path>...` for CLIP-L, each module with an `.alpha` (the trained alpha).
    ComfyUI maps `transformer.` + every path `flux_to_diffusers` knows (to_q/k/v into the fused qkv) and
    reads `.alpha`, and so does Forge; diffusers' Flux loader turns the `.alpha` tensors into network_alphas.
fmt="diffusers": what the pipeline class's `save_lora_weights` writes (`unet.`, `transformer.`,
    `text_encoder.` keys with peft's lora_A/lora_B), with `lora_adapter_metadata` in the header holding each
    adapter's LoraConfig: that is how diffusers keeps an alpha other than the rank. Only diffusers reads
    that header, and ComfyUI has no map for these SD/SDXL keys: other tools want the default.

Both layouts carry kohya's `ss_*` training metadata (the names and value formats of sd-scripts'
train_network.py: base model, network module/dim/alpha, steps, resolution, tag frequencies), SAI's
`modelspec.*` basics (sd-scripts' library/sai_model_spec.py) and `loracap.trigger`; all values are strings.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loracap.dreambooth.base import FAMILIES, PIPELINE_CLASSES
from loracap.files import atomic_write_bytes

if TYPE_CHECKING:
    import torch

FORMATS: tuple[str, ...] = ("kohya", "diffusers")

# Per family: the denoiser's kohya prefix, then one per text encoder slot.
_KOHYA_PREFIXES = {
    "sd15": ("lora_unet", ("lora_te",)),
    "sdxl": ("lora_unet", ("lora_te1", "lora_te2")),
    "flux": ("transformer", ("text_encoder",)),  # diffusers-style names: see the module docstring
}
_DIFFUSERS_PREFIXES = {
    "sd15": ("unet", ("text_encoder",)),
    "sdxl": ("unet", ("text_encoder", "text_encoder_2")),
    "flux": ("transformer", ("text_encoder",)),
}
# sd-scripts' model version strings (model_util.get_model_version_str_for_sd1_sd2, sdxl_model_util,
# flux_utils) and network modules; SAI model spec architectures (sai_model_spec.py ARCH_*).
_BASE_VERSIONS = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0", "flux": "flux1"}
_NETWORK_MODULES = {"sd15": "networks.lora", "sdxl": "networks.lora", "flux": "networks.lora_flux"}
_ARCHITECTURES = {
    "sd_v1": "stable-diffusion-v1",
    "sd_v2": "stable-diffusion-v2-512",
    "sd_v2_v": "stable-diffusion-v2-768-v",
    "sdxl_base_v1-0": "stable-diffusion-xl-v1-base",
    "flux1": "flux-1",
}


@dataclass(frozen=True)
class TrainingInfo:
    """What a LoRA file records about its training (kohya `ss_*` metadata and `modelspec.*`); an empty
    base model, resolution or trigger is left out of the header."""

    base_model: str = ""
    """Hub id or folder of the base pipeline; a folder is recorded by its name only."""
    trigger: str = ""
    steps: int = 0
    resolution: int | tuple[int, int] = 0
    """Training side in pixels, or (width, height)."""
    tag_frequency: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    """{dataset folder name: {tag: count}}, as kohya records it; see `tag_frequency`."""
    output_name: str = ""
    """Default: the file's stem."""
    base_model_version: str = ""
    """sd-scripts' version string; default per family ("sd_v1", "sdxl_base_v1-0", "flux1"). Give "sd_v2"
    or "sd_v2_v" (v-prediction) for an SD 2.x base."""
    extra: Mapping[str, str] = field(default_factory=dict)
    """More header entries (e.g. "ss_learning_rate"), written as given."""


def tag_frequency(folder_name: str, captions: Iterable[str]) -> dict[str, dict[str, int]]:
    """kohya's `ss_tag_frequency` entry for one dataset folder: comma-separated tags, stripped and lowercased,
    counted over `captions` (sd-scripts library/train_util.py `set_tag_frequency`)."""
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in caption.split(","):
            tag = tag.strip().lower()
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return {folder_name: counts}


def save_lora(
    path: str | Path,
    denoiser: Any,
    text_encoders: Sequence[Any | None] = (),
    *,
    family: str,
    rank: int,
    alpha: float,
    fmt: str = "kohya",
    metadata: TrainingInfo | None = None,
) -> Path:
    """Write the LoRA adapters of `denoiser` (UNet or Flux transformer) and of the `text_encoders` that
    have one to `path` in layout `fmt` ("kohya" or "diffusers"), with `metadata` in the header; return `path`.

    `text_encoders` in pipeline order: SD [text_encoder], SDXL [text_encoder, text_encoder_2], Flux
    [text_encoder] (CLIP-L; its T5 may follow unadapted); a None or unadapted one is left out. Each adapted
    model must hold exactly one LoRA adapter of rank `rank` and lora_alpha `alpha`, plain LoRA (no DoRA,
    rsLoRA or per-module ranks, which these files cannot say): ValueError otherwise, and for an unknown
    family or format.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, not {family!r}")
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(FORMATS)}, not {fmt!r}")
    path = Path(path)
    slots = len(_KOHYA_PREFIXES[family][1])
    # {None: the denoiser, i: text encoder i} -> ({module path: (lora_A, lora_B)}, LoraConfig as a dict)
    parts: dict[int | None, tuple[dict[str, tuple[Any, Any]], dict[str, Any]]] = {}
    parts[None] = _adapter(denoiser, rank, alpha, "the denoiser")
    for index, encoder in enumerate(text_encoders):
        if encoder is not None and getattr(encoder, "peft_config", None):
            if index >= slots:  # an adapted T5 on Flux
                raise ValueError(
                    f"{family} LoRA files hold {slots} text encoder(s), not text encoder {index + 1}"
                )
            pairs, config = _adapter(encoder, rank, alpha, f"text encoder {index + 1}")
            if not hasattr(encoder, "text_model"):
                # transformers 5 flattens CLIPTextModel; files keep the hub layout every tool expects
                pairs = {f"text_model.{name}": pair for name, pair in pairs.items()}
            parts[index] = pairs, config
    header = _metadata(metadata or TrainingInfo(), family=family, rank=rank, alpha=alpha, stem=path.stem)
    if fmt == "kohya":
        tensors = _kohya_tensors(parts, family, alpha)
    else:
        tensors, header = _diffusers_tensors(parts, family, header, path.parent)
    _write(path, tensors, header)
    return path


def load_lora_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the header metadata of a LoRA `.safetensors` file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118


def _adapter(model: Any, rank: int, alpha: float, what: str) -> tuple[dict[str, tuple[Any, Any]], dict]:
    """{module path: (lora_A weight, lora_B weight)} of the model's one adapter, and its config as a dict."""
    from peft.utils import get_peft_model_state_dict

    configs = getattr(model, "peft_config", None) or {}
    if len(configs) != 1:
        raise ValueError(f"{what} must hold exactly one LoRA adapter, not {len(configs)}")
    ((name, config),) = configs.items()
    options = ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern", "lora_bias", "modules_to_save")
    unsupported = [option for option in options if getattr(config, option, None)]
    if unsupported:
        raise ValueError(f"{what}: LoRA files for these tools cannot carry {', '.join(unsupported)}")
    if config.r != rank or config.lora_alpha != alpha:
        raise ValueError(
            f"{what} was trained with rank {config.r} and alpha {config.lora_alpha}, "
            f"not rank {rank} alpha {alpha}"
        )
    state = get_peft_model_state_dict(model, adapter_name=name)
    pairs: dict[str, dict[str, Any]] = {}
    for key, tensor in state.items():
        module, dot, part = key.rpartition(".lora_")
        if not dot or part not in ("A.weight", "B.weight"):
            raise ValueError(f"{what}: unexpected adapter tensor {key}")
        pairs.setdefault(module, {})[part[0]] = tensor.detach().to("cpu").contiguous()
    return {module: (ab["A"], ab["B"]) for module, ab in pairs.items()}, config.to_dict()


def _kohya_tensors(parts: Mapping[int | None, tuple[Mapping, Any]], family: str, alpha: float) -> dict:
    import torch

    unet_prefix, te_prefixes = _KOHYA_PREFIXES[family]
    out = {}
    for index, (pairs, _config) in parts.items():
        prefix = unet_prefix if index is None else te_prefixes[index]
        for module, (down, up) in sorted(pairs.items()):
            if family == "flux":
                name, down_key, up_key = f"{prefix}.{module}", "lora_A", "lora_B"
            else:
                name, down_key, up_key = f"{prefix}_{module.replace('.', '_')}", "lora_down", "lora_up"
            out[f"{name}.{down_key}.weight"] = down
            out[f"{name}.{up_key}.weight"] = up
            out[f"{name}.alpha"] = torch.tensor(float(alpha))  # float: diffusers' Flux loader requires it
    return out


def _diffusers_tensors(
    parts: Mapping[int | None, tuple[Mapping[str, Any], dict[str, Any]]],
    family: str,
    header: dict[str, str],
    folder: Path,
) -> tuple[dict, dict[str, str]]:
    """The pipeline class's `save_lora_weights` output (written to a temporary folder beside the target and
    read back), with `header` added to the metadata it writes."""
    import diffusers

    unet_name, te_names = _DIFFUSERS_PREFIXES[family]
    kwargs: dict[str, Any] = {}
    for index, (pairs, config) in parts.items():
        name = unet_name if index is None else te_names[index]
        # peft's own keys, not convert_state_dict_to_diffusers': that renames Linear layers only, and
        # diffusers (0.42, loaders/peft.py load_lora_adapter) converts names back only when the first key
        # lacks "lora_A", so a LoRA on a 1x1 conv (proj_in) would load without the attention layers.
        kwargs[f"{name}_lora_layers"] = {
            f"{module}.lora_{part}.weight": tensor
            for module, (down, up) in pairs.items()
            for part, tensor in (("A", down), ("B", up))
        }
        kwargs[f"{name}_lora_adapter_metadata"] = config
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".lora-") as tmp:
        pipeline_class = getattr(diffusers, PIPELINE_CLASSES[family])
        pipeline_class.save_lora_weights(tmp, weight_name="lora.safetensors", **kwargs)
        tensors, written = load_lora_state(Path(tmp) / "lora.safetensors")
    return tensors, {**header, **written}


def _metadata(info: TrainingInfo, *, family: str, rank: int, alpha: float, stem: str) -> dict[str, str]:
    """kohya's `ss_*` keys (sd-scripts train_network.py: str() of each value, JSON for tag frequencies),
    `modelspec.*` (sai_model_spec.py) and loracap's own."""
    version = info.base_model_version or _BASE_VERSIONS[family]
    base = info.base_model
    if base and Path(base).exists():  # sd-scripts records a local model by its file name
        base = Path(base).name
    name = info.output_name or stem
    header = {
        "ss_output_name": name,
        "ss_base_model_version": version,
        "ss_v2": str(version.startswith("sd_v2")),
        "ss_network_module": _NETWORK_MODULES[family],
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(alpha)),
        "ss_steps": str(info.steps),
        "ss_tag_frequency": json.dumps({folder: dict(tags) for folder, tags in info.tag_frequency.items()}),
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": f"{_ARCHITECTURES.get(version, version)}/lora",
        "modelspec.implementation": "diffusers",  # module names are diffusers' (IMPL_DIFFUSERS)
        "modelspec.title": name,
    }
    if base:
        header["ss_sd_model_name"] = base
    if info.resolution:
        side = info.resolution
        width, height = side if isinstance(side, tuple) else (side, side)
        header["ss_resolution"] = str((width, height))
        header["modelspec.resolution"] = f"{width}x{height}"
    if info.trigger:
        header["loracap.trigger"] = header["modelspec.trigger_phrase"] = info.trigger
    header.update(info.extra)
    return header


def _write(path: Path, tensors: Mapping[str, Any], header: Mapping[str, str]) -> None:
    from safetensors.torch import save

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, save(dict(tensors), metadata=dict(header)))
