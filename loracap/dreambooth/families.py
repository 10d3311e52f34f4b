"""Each model family's conditioning + loss: the one step that differs between SD 1.5, SDXL and, next, Flux.

The loop knows a family only through `Family`: the module LoRA goes on (`denoiser`), the text encoders,
and `loss(batch, generator)`, each item's loss (the loop weighs the instance and class halves). Both
families here are noise-prediction UNets trained the same way (DDPM noise at a uniform timestep, epsilon
or v target, optional min-SNR weighting and noise offset) and differ only in conditioning:

    sd15    one CLIP text encoder's last hidden state
    sdxl    two CLIP encoders' penultimate hidden states, concatenated, plus the second one's pooled
            embedding and the six size/crop numbers ("time ids") SDXL was trained with

Flux slots in as another `Family` (flow matching, packed latents, T5 + CLIP conditioning); cached latents
as a `Batch` that carries latents instead of pixels (`NoisePrediction.latents` is the one place images
are encoded).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from loracap.dreambooth.data import Batch

__all__ = ["FAMILIES", "Family", "NoisePrediction", "SD15", "SDXL", "make_family", "native_side"]


class Family(Protocol):
    """What the training loop needs of a model family."""

    name: str
    denoiser: torch.nn.Module
    """The network LoRA goes on (the UNet); the loop may swap in accelerate's wrapper of it."""
    text_encoders: list[torch.nn.Module]
    """The text encoders, in the pipeline's order; the loop may swap in wrappers of trained ones."""

    def loss(self, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        """Each item's loss, shape (B,), for a batch; all randomness from `generator`."""
        ...


class NoisePrediction:
    """A UNet that predicts the noise (or v) added to VAE latents at a random DDPM timestep."""

    name = ""

    def __init__(
        self, pipeline: Any, *, train_text_encoder: bool, snr_gamma: float | None, noise_offset: float
    ) -> None:
        from diffusers import DDPMScheduler

        self.pipeline = pipeline
        self.vae = pipeline.vae
        self.denoiser = pipeline.unet
        self.text_encoders = [
            e for e in (pipeline.text_encoder, getattr(pipeline, "text_encoder_2", None)) if e
        ]
        self.tokenizers = [t for t in (pipeline.tokenizer, getattr(pipeline, "tokenizer_2", None)) if t]
        # Training always adds noise with the DDPM schedule the inference scheduler shares its betas with
        # (diffusers' trainers do the same for PNDM / Euler / DPM pipelines).
        self.scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
        self.prediction_type = self.scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"the base predicts {self.prediction_type!r}; only epsilon and v_prediction train"
            )
        self.train_text_encoder = train_text_encoder
        self.snr_gamma = snr_gamma
        self.noise_offset = noise_offset

    # --- the family-specific parts

    def encode_text(self, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def predict(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        conditioning: dict[str, torch.Tensor],
        batch: Batch,
    ) -> torch.Tensor:
        raise NotImplementedError

    # --- shared

    def token_ids(self, tokenizer: Any, captions: list[str], device: torch.device) -> torch.Tensor:
        ids = tokenizer(
            captions,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return ids.to(device)

    def latents(self, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        """The batch's images in the VAE's latent space, scaled as the UNet was trained on them."""
        pixels = batch.pixel_values.to(generator.device, dtype=self.vae.dtype)
        with torch.no_grad():
            latents = self.vae.encode(pixels).latent_dist.sample(generator=generator)
        return latents.float() * self.vae.config.scaling_factor

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
        with torch.set_grad_enabled(self.train_text_encoder):
            conditioning = self.encode_text(batch.captions, device)
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
        target = batch.target_size
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


FAMILIES: dict[str, type[NoisePrediction]] = {"sd15": SD15, "sdxl": SDXL}


def native_side(folder: Path) -> int:
    """The image side a UNet pipeline was trained at, from its configs alone (before loading): the UNet's
    latent sample size times the VAE's downscaling, 2 per block after the first (SD 1.5: 64 x 8 = 512,
    SD 2.x-768: 96 x 8, SDXL: 128 x 8 = 1024)."""
    unet = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
    vae = json.loads((folder / "vae" / "config.json").read_text(encoding="utf-8"))
    sample = unet.get("sample_size", 64)
    sample = sample[0] if isinstance(sample, list) else sample
    return int(sample) * 2 ** (len(vae.get("block_out_channels", (0, 0, 0, 0))) - 1)


def make_family(
    name: str, pipeline: Any, *, train_text_encoder: bool, snr_gamma: float | None, noise_offset: float
) -> Family:
    """The `Family` for a loaded base pipeline of family `name` ("sd15", "sdxl")."""
    if name not in FAMILIES:
        raise ValueError(
            f"DreamBooth training supports {' and '.join(FAMILIES)} bases; this one is {name} (coming next)"
        )
    return FAMILIES[name](
        pipeline, train_text_encoder=train_text_encoder, snr_gamma=snr_gamma, noise_offset=noise_offset
    )
