"""The prefix-conditioned captioner: frozen vision tower -> trainable projector -> decoder-only LM.

    image -> vision tower (SigLIP / CLIP vision, frozen) -> patch features (B, N, Dv)
          -> optional pixel shuffle (2x2 patches folded: N/4 tokens of 4*Dv)
          -> projector (linear or MLP) -> prefix embeddings (B, P, Dt)
    [prefix][prompt tokens][caption tokens][eos] -> LM (LoRA-adapted during training)

A plain `PreTrainedModel`: `save_pretrained` writes config + safetensors (LoRA merged into the LM), and
`PrefixCaptioner.from_pretrained` (or `AutoModel`, once this module is imported) loads it back.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from loracap.hub import resolve_model

MODEL_TYPE = "loracap_prefix_captioner"
PROJECTORS = ("linear", "mlp")

__all__ = ["MODEL_TYPE", "PrefixCaptioner", "PrefixCaptionerConfig", "build_captioner", "pixel_shuffle"]


class PrefixCaptionerConfig(PretrainedConfig):
    """`vision_config` / `text_config` are the towers' own configs as dicts (with `model_type`), so the
    folder records exactly which architectures it holds and any transformers version can read them."""

    model_type = MODEL_TYPE

    def __init__(
        self,
        vision_config: dict[str, Any] | None = None,
        text_config: dict[str, Any] | None = None,
        projector: str = "mlp",
        pixel_shuffle: int = 1,
        prompt: str = "",
        max_caption_tokens: int = 64,
        caption_format: str = "prose",
        vision_id: str | None = None,
        lm_id: str | None = None,
        **kwargs: Any,
    ) -> None:
        if projector not in PROJECTORS:
            raise ValueError(f"projector must be one of {', '.join(PROJECTORS)}, not {projector!r}")
        if pixel_shuffle < 1:
            raise ValueError(f"pixel_shuffle must be >= 1, got {pixel_shuffle}")
        self.vision_config = _as_dict(vision_config)
        self.text_config = _as_dict(text_config)
        self.projector = projector
        self.pixel_shuffle = pixel_shuffle
        self.prompt = prompt
        """Text between the prefix and the caption ("A photo of"), the same at training and inference."""
        self.max_caption_tokens = max_caption_tokens
        self.caption_format = caption_format
        """"tags" when the training captions were tag lists: `loracap caption` then cleans them up as tags."""
        self.vision_id = vision_id
        self.lm_id = lm_id
        """Where the towers came from (hub ids or folders), for the record."""
        super().__init__(**kwargs)

    def vision(self) -> PretrainedConfig:
        return _config(self.vision_config)

    def text(self) -> PretrainedConfig:
        return _config(self.text_config)


def _as_dict(config: Any) -> dict[str, Any]:
    if config is None:
        return {}
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def _config(data: dict[str, Any]) -> PretrainedConfig:
    data = dict(data)
    return AutoConfig.for_model(data.pop("model_type"), **data)


def pixel_shuffle(features: torch.Tensor, factor: int) -> torch.Tensor:
    """Fold each factor x factor block of patches into one token: (B, s*s, D) -> (B, (s/f)^2, f*f*D).

    Fewer, wider prefix tokens (196 -> 49 at factor 2) make the LM's sequence shorter without dropping
    any feature, as in Idefics3 / SmolVLM."""
    if factor == 1:
        return features
    b, n, d = features.shape
    side = math.isqrt(n)
    if side * side != n or side % factor:
        raise ValueError(f"pixel shuffle needs a square grid divisible by {factor}; got {n} tokens")
    grid = features.reshape(b, side // factor, factor, side // factor, factor, d)
    return grid.permute(0, 1, 3, 2, 4, 5).reshape(b, (side // factor) ** 2, factor * factor * d)


class PrefixCaptioner(PreTrainedModel):
    config_class = PrefixCaptionerConfig
    base_model_prefix = "captioner"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def __init__(
        self,
        config: PrefixCaptionerConfig,
        vision_tower: nn.Module | None = None,
        language_model: PreTrainedModel | None = None,
    ) -> None:
        """Towers given (`build_captioner`'s pretrained ones) are kept as they are; towers not given are
        built from `config` (random until `from_pretrained` loads the folder's weights into them)."""
        super().__init__(config)
        self.vision_tower = (
            vision_tower if vision_tower is not None else _image_tower(AutoModel.from_config(config.vision()))
        )
        self.language_model = (
            language_model if language_model is not None else AutoModelForCausalLM.from_config(config.text())
        )
        width = _hidden_size(config.vision()) * config.pixel_shuffle**2
        hidden = self.language_model.config.hidden_size
        if config.projector == "linear":
            self.projector = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, hidden))
        else:
            self.projector = nn.Sequential(
                nn.LayerNorm(width), nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, hidden)
            )
        self.post_init()

    # The towers come with their own initialisation (or weights); only the projector is new here.
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear) and any(module is m for m in self.projector.modules()):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    # --- the prefix -------------------------------------------------------------------------------------

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch features of the vision tower's last layer, without a CLS token: (B, N, Dv)."""
        features = self.vision_tower(pixel_values=pixel_values).last_hidden_state
        n = features.shape[1]
        if math.isqrt(n) ** 2 != n and math.isqrt(n - 1) ** 2 == n - 1:
            features = features[:, 1:]  # CLIP puts a CLS token before the patch grid
        return features

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Vision features -> prefix embeddings in the LM's input space: (B, P, Dt)."""
        folded = pixel_shuffle(features, self.config.pixel_shuffle)
        dtype = self.projector[1].weight.dtype
        return self.projector(folded.to(dtype))

    def prefix(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Images -> prefix embeddings: (B, P, Dt)."""
        return self.project(self.vision_features(pixel_values))

    # --- training ---------------------------------------------------------------------------------------

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """Teacher-forced pass over [prefix][text]. `input_ids` / `attention_mask` / `labels` are the text
        part as `loracap.prefix.batching.encode_captions` makes them (right-padded; labels -100 on the
        prompt and on padding); the prefix positions are always attended and never predicted.

        `vision_features` (B, N, Dv), what `vision_features(pixel_values)` returned earlier (`loracap train
        --cache-features`), stands in for `pixel_values`: the prefix is then `project(vision_features)`."""
        if (pixel_values is None) == (vision_features is None):
            raise ValueError("pass either pixel_values or vision_features")
        prefix = self.prefix(pixel_values) if vision_features is None else self.project(vision_features)
        b, p, _ = prefix.shape
        text = self.get_input_embeddings()(input_ids)
        embeds = torch.cat([prefix.to(text.dtype), text], dim=1)
        ones = torch.ones(b, p, dtype=attention_mask.dtype, device=attention_mask.device)
        mask = torch.cat([ones, attention_mask], dim=1)
        full_labels = None
        if labels is not None:
            ignore = torch.full((b, p), -100, dtype=labels.dtype, device=labels.device)
            full_labels = torch.cat([ignore, labels], dim=1)
        out = self.language_model(inputs_embeds=embeds, attention_mask=mask, labels=full_labels, **kwargs)
        out.prefix = prefix
        return out

    # --- inference --------------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate_captions(
        self,
        pixel_values: torch.Tensor,
        prompt_ids: list[int],
        *,
        eos_token_id: int,
        pad_token_id: int,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """New token ids for each image. Every row is [prefix][prompt] of the same length, so a batch
        needs no padding at all: nothing sits between the prefix and the text, as in training."""
        prefix = self.prefix(pixel_values)
        embed = self.get_input_embeddings()
        parts = [prefix.to(embed.weight.dtype)]
        if prompt_ids:
            ids = torch.tensor([prompt_ids], device=prefix.device).expand(prefix.shape[0], -1)
            parts.append(embed(ids))
        embeds = torch.cat(parts, dim=1)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return self.language_model.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            **generate_kwargs,
        )


def build_captioner(
    vision: str | Path | Any,
    lm: str | Path | Any,
    *,
    projector: str = "mlp",
    pixel_shuffle: int = 1,
    prompt: str = "",
    max_caption_tokens: int = 64,
    caption_format: str = "prose",
    vision_id: str | None = None,
    lm_id: str | None = None,
) -> PrefixCaptioner:
    """A new captioner from pretrained towers (hub ids or folders; loaded models are taken as they are):
    the vision tower and LM keep their weights, the projector starts fresh. `vision_id` / `lm_id` are
    recorded in the config as where the towers came from (default: `vision` / `lm` as given)."""
    vision_id = vision_id or _name(vision)
    lm_id = lm_id or _name(lm)
    if isinstance(vision, str | Path):
        vision = _load_image_model(vision)
    if isinstance(lm, str | Path):
        lm = AutoModelForCausalLM.from_pretrained(_folder(lm), dtype=_TRAINING_DTYPE)
    # Record only the image tower's config (SiglipVisionConfig, not the dual encoder's), so loading the
    # captioner never builds the text tower it does not use.
    vision_config = getattr(vision.config, "vision_config", None) or vision.config
    config = PrefixCaptionerConfig(
        vision_config=vision_config.to_dict(),
        text_config=lm.config.to_dict(),
        projector=projector,
        pixel_shuffle=pixel_shuffle,
        prompt=prompt,
        max_caption_tokens=max_caption_tokens,
        caption_format=caption_format,
        vision_id=vision_id,
        lm_id=lm_id,
    )
    return PrefixCaptioner(config, vision_tower=_image_tower(vision), language_model=lm)


# The towers are trained (LoRA, an unfrozen vision top) in float32 whatever dtype the checkpoint is stored
# in; accelerate's autocast brings in bf16/fp16. from_pretrained alone would keep a bf16 checkpoint bf16.
_TRAINING_DTYPE = torch.float32


def _load_image_model(spec: str | Path) -> PreTrainedModel:
    """The pretrained image tower alone. Of a dual encoder (CLIP, SigLIP) only the vision model is built
    and loaded, from the checkpoint's `vision_config`; its text tower's weights are skipped."""
    folder = _folder(spec)
    vision_config = getattr(AutoConfig.from_pretrained(folder), "vision_config", None)
    if vision_config is None:  # a vision-only checkpoint
        return AutoModel.from_pretrained(folder, dtype=_TRAINING_DTYPE)
    # transformers reports every skipped text-tower weight as "unexpected", in a table hundreds of rows
    # long for a hub checkpoint. Skipping them is the point, so that report is held back and what would
    # matter in it, vision weights the checkpoint lacks or has in another shape, is checked here.
    with _without_load_report():
        model, info = AutoModel.from_pretrained(
            folder, config=vision_config, dtype=_TRAINING_DTYPE, output_loading_info=True
        )
    broken = sorted(info["missing_keys"]) + sorted(str(k) for k in info["mismatched_keys"])
    if broken:
        raise ValueError(f"{spec}: its vision weights do not fit its vision_config: {', '.join(broken[:5])}")
    return model


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()


@contextmanager
def _without_load_report() -> Iterator[None]:
    # A filter, not a higher log level: transformers 5 runs an extra tensor-parallel check (with warnings
    # of its own) when modeling_utils' level is raised.
    logger = logging.getLogger("transformers.modeling_utils")
    drop = _DropLoadReport()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _image_tower(model: nn.Module) -> nn.Module:
    # A dual encoder (SiglipModel, CLIPModel) keeps its image tower in .vision_model; so does a
    # vision-only model (SiglipVisionModel). Only that tower is kept.
    return model.vision_model if hasattr(model, "vision_model") else model


def _folder(spec: str | Path) -> Path:
    return resolve_model(str(spec))


def _name(tower: str | Path | Any) -> str | None:
    name = str(tower) if isinstance(tower, str | Path) else getattr(tower, "name_or_path", None)
    return name or None


def _hidden_size(config: PretrainedConfig) -> int:
    vision = getattr(config, "vision_config", None) or config
    return vision.hidden_size


AutoConfig.register(MODEL_TYPE, PrefixCaptionerConfig, exist_ok=True)
AutoModel.register(PrefixCaptionerConfig, PrefixCaptioner, exist_ok=True)
