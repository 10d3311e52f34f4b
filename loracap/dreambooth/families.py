"""Each model family's conditioning + loss: the one step that differs between SD 1.5, SDXL and Flux.

The loop knows a family only through `Family`: the module LoRA goes on (`denoiser`), the text encoders,
the VAE, and `loss(batch, generator)`, each item's loss (the loop weighs the instance and class halves).

    sd15    noise prediction (epsilon or v) at a uniform DDPM timestep, optional min-SNR weighting and
            noise offset; one CLIP text encoder's last hidden state
    sdxl    the same UNet training; two CLIP encoders' penultimate hidden states, concatenated, plus the
            second one's pooled embedding and the six size/crop numbers ("time ids") SDXL was trained with
    flux    rectified flow (see `Flux`); T5 token states and CLIP's pooled embedding

`_Common.latents` is the one place images become latents (from pixels, or from the latent cache's stored
distribution: the same draw either way), `_Common.conditioning` the one place captions become
conditioning (from the text encoders, or from the text cache).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from loracap.dreambooth.data import Batch
from loracap.dreambooth.settings import FLUX_TARGETS, UNET_TARGETS, DreamBoothConfig

__all__ = [
    "DEFAULT_GUIDANCE",
    "FAMILIES",
    "SD15",
    "SDXL",
    "Family",
    "Flux",
    "NoisePrediction",
    "default_targets",
    "flux_sequence_length",
    "make_family",
    "native_side",
    "size_multiple",
]


class Family(Protocol):
    """What the training loop needs of a model family."""

    name: str
    denoiser: torch.nn.Module
    """The network LoRA goes on (UNet or Flux transformer); the loop may swap in accelerate's wrapper."""
    text_encoders: list[torch.nn.Module]
    """The text encoders, in the pipeline's order; the loop may swap in wrappers of trained ones."""
    vae: torch.nn.Module
    text_cache: dict[str, dict[str, torch.Tensor]] | None
    """Conditioning per exact caption text, when the loop cached it (`encode_text` is then not called)."""

    def encode_text(self, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """The conditioning tensors of `captions`, each with the batch as its first dimension."""
        ...

    def loss(self, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        """Each item's loss, shape (B,), for a batch; all randomness from `generator`."""
        ...


class _Common:
    """What every family shares: latents from pixels or from the latent cache, conditioning from the text
    encoders or from the text cache."""

    name = ""
    shift_factor = 0.0

    def __init__(self, pipeline: Any, *, train_text_encoder: bool) -> None:
        self.pipeline = pipeline
        self.vae = pipeline.vae
        self.text_encoders = [
            e for e in (pipeline.text_encoder, getattr(pipeline, "text_encoder_2", None)) if e
        ]
        self.tokenizers = [t for t in (pipeline.tokenizer, getattr(pipeline, "tokenizer_2", None)) if t]
        self.train_text_encoder = train_text_encoder
        self.text_cache: dict[str, dict[str, torch.Tensor]] | None = None

    def encode_text(self, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def latent_parameters(self, pixels: torch.Tensor) -> torch.Tensor:
        """The VAE's latent distribution of `pixels` (mean and log-variance, stacked on the channels): what
        the latent cache stores."""
        with torch.no_grad():
            return self.vae.encode(pixels.to(self.vae.device, dtype=self.vae.dtype)).latent_dist.parameters

    def latents(self, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        """The batch's images in the latent space, shifted and scaled as the denoiser was trained on them: a
        sample of the VAE's distribution, encoded now or read from the cache (the same draw either way)."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        if batch.latent_parameters is not None:
            parameters = batch.latent_parameters.to(generator.device, dtype=self.vae.dtype)
        else:
            parameters = self.latent_parameters(batch.pixel_values.to(generator.device))
        latents = DiagonalGaussianDistribution(parameters).sample(generator=generator).float()
        return (latents - self.shift_factor) * self.vae.config.scaling_factor

    def conditioning(self, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """The text conditioning of a batch: stacked from the text cache, or encoded (with gradients only
        when the text encoders train)."""
        if self.text_cache is not None:
            items = [self.text_cache[c] for c in captions]
            return {k: torch.stack([item[k] for item in items]).to(device) for k in items[0]}
        with torch.set_grad_enabled(self.train_text_encoder):
            return self.encode_text(captions, device)

    def token_ids(self, tokenizer: Any, captions: list[str], device: torch.device) -> torch.Tensor:
        ids = tokenizer(
            captions,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return ids.to(device)


class NoisePrediction(_Common):
    """A UNet that predicts the noise (or v) added to VAE latents at a random DDPM timestep."""

    def __init__(
        self, pipeline: Any, *, train_text_encoder: bool, snr_gamma: float | None, noise_offset: float
    ) -> None:
        from diffusers import DDPMScheduler

        super().__init__(pipeline, train_text_encoder=train_text_encoder)
        self.denoiser = pipeline.unet
        # Training always adds noise with the DDPM schedule the inference scheduler shares its betas with
        # (diffusers' trainers do the same for PNDM / Euler / DPM pipelines).
        self.scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
        self.prediction_type = self.scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"the base predicts {self.prediction_type!r}; only epsilon and v_prediction train"
            )
        self.snr_gamma = snr_gamma
        self.noise_offset = noise_offset

    def predict(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        conditioning: dict[str, torch.Tensor],
        batch: Batch,
    ) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        device = generator.device
        latents = self.latents(batch, generator)
        size = latents.shape[0]
        noise = torch.randn(latents.shape, generator=generator, device=device)
        if self.noise_offset:
            # A per-channel shift of the noise lets the model learn to change an image's mean brightness
            # (plain Gaussian noise leaves the lowest frequency almost untouched).
            offset = torch.randn((size, latents.shape[1], 1, 1), generator=generator, device=device)
            noise = noise + self.noise_offset * offset
        steps = self.scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (size,), generator=generator, device=device).long()
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        conditioning = self.conditioning(batch.captions, device)
        prediction = self.predict(noisy, timesteps, conditioning, batch)
        if prediction.shape[1] == 2 * latents.shape[1]:  # a learned-variance UNet: train the mean only
            prediction = prediction[:, : latents.shape[1]]
        target = (
            noise
            if self.prediction_type == "epsilon"
            else self.scheduler.get_velocity(latents, noise, timesteps)
        )
        loss = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if self.snr_gamma:
            loss = loss * self.min_snr_weights(timesteps)
        return loss

    def min_snr_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Min-SNR-gamma (Hang et al. 2023): min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v, so the
        nearly-clean timesteps stop dominating the gradient."""
        alphas = self.scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
        snr = alphas / (1 - alphas)
        clipped = torch.clamp(snr, max=self.snr_gamma)
        return clipped / (snr + 1 if self.prediction_type == "v_prediction" else snr)


class SD15(NoisePrediction):
    name = "sd15"

    def encode_text(self, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        ids = self.token_ids(self.tokenizers[0], captions, device)
        return {"encoder_hidden_states": self.text_encoders[0](ids)[0]}

    def predict(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        conditioning: dict[str, torch.Tensor],
        batch: Batch,
    ) -> torch.Tensor:
        return self.denoiser(noisy, timesteps, conditioning["encoder_hidden_states"], return_dict=False)[0]


class SDXL(NoisePrediction):
    name = "sdxl"

    def encode_text(self, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders, strict=True):
            output = encoder(self.token_ids(tokenizer, captions, device), output_hidden_states=True)
            # The pooled embedding is the last encoder's (CLIP-G's projection); both give their penultimate
            # layer's states, as the SDXL pipeline encodes prompts.
            pooled = output[0]
            hidden.append(output.hidden_states[-2])
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled}

    def predict(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        conditioning: dict[str, torch.Tensor],
        batch: Batch,
    ) -> torch.Tensor:
        target = batch.target_size  # (height, width) of the bucket
        time_ids = torch.tensor(
            [
                [*size, *crop, *target]
                for size, crop in zip(batch.original_sizes, batch.crop_top_lefts, strict=True)
            ],
            device=noisy.device,
            dtype=conditioning["text_embeds"].dtype,
        )
        added = {"text_embeds": conditioning["text_embeds"], "time_ids": time_ids}
        return self.denoiser(
            noisy,
            timesteps,
            conditioning["encoder_hidden_states"],
            added_cond_kwargs=added,
            return_dict=False,
        )[0]


class Flux(_Common):
    """Flux.1 (dev or schnell layout): a rectified-flow transformer. The noisy input is the straight line
    (1 - t) x latents + t x noise, the target its velocity noise - latents, at a t drawn by
    `--timestep-sampling` (then shifted); the latents go in as 2x2 patches (FluxPipeline's packing) with
    their positions, the caption as T5 token states plus CLIP's pooled embedding, and a model with a
    guidance input (dev) gets `--flux-guidance`. The loss is the plain MSE: the sampling density is the
    weighting (as in kohya's and ai-toolkit's Flux trainers)."""

    name = "flux"

    def __init__(self, pipeline: Any, config: DreamBoothConfig) -> None:
        super().__init__(pipeline, train_text_encoder=False)
        self.denoiser = pipeline.transformer
        self.shift_factor = pipeline.vae.config.shift_factor or 0.0
        self.vae_scale_factor = pipeline.vae_scale_factor
        self.sampling = config.timestep_sampling
        self.shift = config.timestep_shift
        self.logit_mean, self.logit_std = config.logit_mean, config.logit_std
        self.guidance = config.flux_guidance
        self.max_sequence_length = config.max_sequence_length or flux_sequence_length(
            pipeline.transformer.config
        )

    def encode_text(self, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        embeds, pooled, _ = self.pipeline.encode_prompt(
            prompt=captions, prompt_2=None, device=device, max_sequence_length=self.max_sequence_length
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def timesteps(self, size: int, generator: torch.Generator) -> torch.Tensor:
        """t in (0, 1) per item: 0 is the clean image, 1 pure noise."""
        device = generator.device
        if self.sampling == "uniform":
            t = torch.rand((size,), generator=generator, device=device)
        else:  # sigmoid is logit-normal(0, 1)
            normal = torch.randn((size,), generator=generator, device=device)
            if self.sampling == "logit-normal":
                normal = self.logit_mean + self.logit_std * normal
            t = torch.sigmoid(normal)
        if self.shift != 1.0:
            t = self.shift * t / (1 + (self.shift - 1) * t)
        return t

    def loss(self, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        from diffusers import FluxPipeline

        device = generator.device
        latents = self.latents(batch, generator)
        size, channels, height, width = latents.shape
        noise = torch.randn(latents.shape, generator=generator, device=device)
        t = self.timesteps(size, generator)
        noisy = (1 - t.view(-1, 1, 1, 1)) * latents + t.view(-1, 1, 1, 1) * noise
        conditioning = self.conditioning(batch.captions, device)
        hidden = conditioning["encoder_hidden_states"]
        packed = FluxPipeline._pack_latents(noisy, size, channels, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(
            size, height // 2, width // 2, device, hidden.dtype
        )
        text_ids = torch.zeros(hidden.shape[1], 3, device=device, dtype=hidden.dtype)
        guidance = None
        if self.denoiser_config().guidance_embeds:
            guidance = torch.full((size,), self.guidance, device=device)
        prediction = self.denoiser(
            hidden_states=packed,
            timestep=t,
            guidance=guidance,
            pooled_projections=conditioning["pooled_projections"],
            encoder_hidden_states=hidden,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        factor = self.vae_scale_factor
        prediction = FluxPipeline._unpack_latents(prediction, height * factor, width * factor, factor)
        target = noise - latents
        return F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))

    def denoiser_config(self) -> Any:
        # The loop may swap in accelerate's wrapper, which has no .config of its own.
        module = self.denoiser
        while not hasattr(module, "config"):
            module = getattr(module, "module", None) or module._orig_mod
        return module.config


FAMILIES = ("sd15", "sdxl", "flux")
_UNET_FAMILIES: dict[str, type[NoisePrediction]] = {"sd15": SD15, "sdxl": SDXL}
DEFAULT_GUIDANCE = {"sd15": 7.5, "sdxl": 7.5, "flux": 3.5}
"""Sampling guidance for class images and validation grids (Flux: its guidance input)."""


def flux_sequence_length(transformer_config: Any) -> int:
    """T5 tokens a Flux model reads by default: 512 for dev (with a guidance input), 256 for schnell."""
    return 512 if transformer_config.get("guidance_embeds") else 256


def default_targets(family: str) -> tuple[str, ...]:
    return FLUX_TARGETS if family == "flux" else UNET_TARGETS


def native_side(folder: Path) -> int:
    """The image side a pipeline was trained at, from its configs alone (before loading): the denoiser's
    latent sample size times the VAE's downscaling, 2 per block after the first (SD 1.5: 64 x 8 = 512,
    SD 2.x-768: 96 x 8, SDXL: 128 x 8 = 1024; Flux: FluxPipeline's 128 x 8 = 1024)."""
    vae = json.loads((folder / "vae" / "config.json").read_text(encoding="utf-8"))
    if (folder / "unet" / "config.json").is_file():
        unet = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
        sample = unet.get("sample_size", 64)
        sample = sample[0] if isinstance(sample, list) else sample
    else:
        sample = 128  # FluxPipeline.default_sample_size
    return int(sample) * 2 ** (len(vae.get("block_out_channels", (0, 0, 0, 0))) - 1)


def size_multiple(folder: Path, family: str) -> int:
    """What image sides must be multiples of: the VAE's factor, x2 for Flux (2x2 latent patches)."""
    vae = json.loads((folder / "vae" / "config.json").read_text(encoding="utf-8"))
    factor = 2 ** (len(vae.get("block_out_channels", (0, 0, 0, 0))) - 1)
    return 2 * factor if family == "flux" else factor


def make_family(name: str, pipeline: Any, config: DreamBoothConfig) -> Family:
    """The `Family` for a loaded base pipeline of family `name` ("sd15", "sdxl", "flux")."""
    if name == "flux":
        return Flux(pipeline, config)
    if name not in _UNET_FAMILIES:
        raise ValueError(f"DreamBooth training supports {', '.join(FAMILIES)} bases; this one is {name}")
    return _UNET_FAMILIES[name](
        pipeline,
        train_text_encoder=config.train_text_encoder,
        snr_gamma=config.snr_gamma,
        noise_offset=config.noise_offset,
    )
