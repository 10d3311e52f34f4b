"""Tiny random-weight Stable Diffusion 1.5, SDXL and Flux pipelines, saved as hub pipeline folders.

`make_tiny_model("sd15" | "sdxl" | "flux", out)` writes a complete diffusers pipeline folder with the
pipeline's own `save_pretrained`: model_index.json, unet/ (transformer/ for Flux), vae/, text_encoder/,
tokenizer/, scheduler/, and for SDXL and Flux text_encoder_2/ and tokenizer_2/. It loads with
`DiffusionPipeline.from_pretrained(out)` or the specific pipeline class, and its parts with
`UNet2DConditionModel.from_pretrained(out, subfolder="unet")` etc., as a hub checkpoint does. The layouts
are the published ones shrunk to the configs measured in the project's notes (diffusion-tiny-models.md):

- "sd15" (runwayml/stable-diffusion-v1-5): `UNet2DConditionModel` with one plain and one cross-attention
  block, a 2-block `AutoencoderKL` (scaling factor 0.18215), one `CLIPTextModel`, the v1.5
  `PNDMScheduler` config, no safety checker.
- "sdxl" (stabilityai/stable-diffusion-xl-base-1.0): the "text_time" UNet conditioned on both encoders'
  hidden states (32 + 32 = 64 wide) and the second one's pooled projection plus 6 size/crop ids, a
  `CLIPTextModel` and a `CLIPTextModelWithProjection`, VAE scaling factor 0.13025, the base model's
  `EulerDiscreteScheduler` config, `force_zeros_for_empty_prompt=True` in model_index.json; tokenizer_2
  pads with "!" (id 0), as CLIP-G's does.
- "flux" (black-forest-labs/FLUX.1-schnell): `FluxTransformer2DModel` without a guidance embedding, CLIP
  (pooled prompt) + T5 encoder (token prompt), a one-block VAE with 1 latent channel and no quant convs
  (Flux's scaling 0.3611 and shift 0.1159), the schnell `FlowMatchEulerDiscreteScheduler` config (shift
  1.0, no dynamic shifting).
- "flux-dev" (black-forest-labs/FLUX.1-dev): the same with the guidance embedding (the transformer takes
  a guidance scale) and dev's scheduler config (shift 3.0, dynamic shifting 0.5-1.15).

The CLIP tokenizers are `clip_models.build_clip_tokenizer` (CLIP's BPE, trained on the caption corpus); the
T5 one is a Unigram counted here with T5's layout (`<pad>`=0, `</s>`=1, `<unk>`=2, "▁" word boundaries,
`</s>` appended). The SD 1.5 / SDXL VAEs halve the image once, so those pipelines generate 64 px by
default (UNet `sample_size` 32 x VAE factor 2). Flux's VAE keeps the size (factor 1) and its pipeline
fixes 128 latent pixels, so Flux defaults to 128 px; 64 px (32 x 32 packed tokens) works as well and is
what tests should ask for. Each part (text encoders, UNet or transformer, VAE) is built from its own seed
derived from `seed`, with the model's own initialisation, so the same seed writes byte-identical files.

torch, transformers and diffusers are imported inside the builders so `import loracap.testing` stays light.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loracap.testing.clip_models import CLIP_MAX_LENGTH, build_clip_tokenizer
from loracap.testing.seeding import seeded_model
from loracap.testing.tokenizer import caption_corpus

if TYPE_CHECKING:  # pragma: no cover - typing only
    from transformers import PreTrainedTokenizerBase

DIFFUSION_ARCHS: tuple[str, ...] = ("sd15", "sdxl", "flux", "flux-dev")

NATIVE_SIZE = 64
"""The image side, in pixels, the SD 1.5 / SDXL pipelines generate by default (and tests use for Flux)."""

T5_SPECIALS: tuple[str, ...] = ("<pad>", "</s>", "<unk>")
T5_MAX_LENGTH = 512  # google/t5-v1_1-xxl's window; FluxPipeline's max_sequence_length caps it (256 schnell)

_TEXT_WIDTH = 32  # CLIP hidden size (and projection), T5 d_model
_UNET_SAMPLE = NATIVE_SIZE // 2  # latent side: the VAEs below downsample once
_SD_SCHEDULER = {  # runwayml/stable-diffusion-v1-5 and SDXL base 1.0 share this noise schedule
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
}
_PARTS = ("text_encoder", "text_encoder_2", "denoiser", "vae")  # index -> per-part seed offset


def build_diffusion_model(arch: str, out: Path, *, seed: int = 0) -> None:
    """Build the tiny `arch` pipeline and save it into `out` (an existing folder)."""
    builders: dict[str, Callable[[int], Any]] = {
        "sd15": _sd15,
        "sdxl": _sdxl,
        "flux": _flux,
        "flux-dev": lambda seed: _flux(seed, dev=True),
    }
    builders[arch](seed).save_pretrained(out)


def _part(seed: int, name: str, build: Callable[[], Any]) -> Any:
    """`build()` seeded with one seed per (seed, part), so two text encoders of one config differ."""
    return seeded_model(seed * len(_PARTS) + _PARTS.index(name), build, spread=None)


# ------------------------------------------------------------------------------------------- text encoders


def _clip_text_config(tokenizer: PreTrainedTokenizerBase, **extra: Any) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        hidden_size=_TEXT_WIDTH,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=5,  # SDXL reads hidden_states[-2]: a real layer's output
        vocab_size=len(tokenizer),
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=_TEXT_WIDTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def build_t5_tokenizer(*, vocab_size: int = 400) -> PreTrainedTokenizerBase:
    """A `T5Tokenizer` (Flux's tokenizer_2): a Unigram vocab counted on the caption corpus.

    Like google/t5-v1_1-*: `<pad>`=0 (also the decoder start), `</s>`=1 appended to every text, `<unk>`=2,
    "▁" marking word starts, case kept; unlike it, no `<extra_id_*>` sentinels (Flux never uses them).
    The pieces are "▁", the printable ASCII characters (any such text encodes without `<unk>`), then the
    corpus words ("▁photo", trailing punctuation split off) seen twice or more, most frequent first, each
    scored by its log frequency, as a trained Unigram scores its pieces. The vocab is counted rather than
    trained with `tokenizers.trainers.UnigramTrainer`, whose scores differ in the last digits from process
    to process (float sums in hash-map order), which would break "same seed, same files".
    """
    import math
    import re
    import string
    from collections import Counter

    from transformers import T5Tokenizer

    words: Counter[str] = Counter()
    chars: Counter[str] = Counter(sorted(set(string.printable) - set(string.whitespace)))  # +1 smoothing
    for line in caption_corpus():
        for chunk in line.split():  # "camera." -> "▁camera" and ".", as sentencepiece splits it
            word = re.match(r"\w*", chunk).group()
            words["▁" + word] += bool(word)
            chars.update(chunk)
    chars["▁"] = sum(words.values())
    frequent = sorted((w for w, n in words.items() if n >= 2), key=lambda w: (-words[w], w))
    frequent = frequent[: vocab_size - len(T5_SPECIALS) - len(chars)]
    total = sum(chars.values()) + sum(words[w] for w in frequent)
    pieces = [*sorted(chars, key=lambda c: (-chars[c], c)), *frequent]
    counts = {**chars, **{w: words[w] for w in frequent}}
    vocab = [(t, 0.0) for t in T5_SPECIALS] + [(p, round(math.log(counts[p] / total), 4)) for p in pieces]
    pad, eos, unk = T5_SPECIALS
    return T5Tokenizer(
        vocab=vocab, pad_token=pad, eos_token=eos, unk_token=unk, extra_ids=0, model_max_length=T5_MAX_LENGTH
    )


# ---------------------------------------------------------------------------------------------- pipelines


def _vae(*, blocks: tuple[int, ...] = (4, 8), latent_channels: int = 4, groups: int = 2, **extra: Any) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=blocks,  # the image shrinks 2x per block after the first
        down_block_types=("DownEncoderBlock2D",) * len(blocks),
        up_block_types=("UpDecoderBlock2D",) * len(blocks),
        latent_channels=latent_channels,
        norm_num_groups=groups,
        sample_size=NATIVE_SIZE,
        **extra,
    )


def _sd15(seed: int) -> Any:
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = build_clip_tokenizer()
    config = _clip_text_config(tokenizer, hidden_act="quick_gelu")  # openai/clip-vit-large-patch14
    unet = _part(
        seed,
        "denoiser",
        lambda: UNet2DConditionModel(
            block_out_channels=(4, 8),
            layers_per_block=1,
            sample_size=_UNET_SAMPLE,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=_TEXT_WIDTH,
            norm_num_groups=2,
        ),
    )
    return StableDiffusionPipeline(
        vae=_part(seed, "vae", lambda: _vae(scaling_factor=0.18215)),
        text_encoder=_part(seed, "text_encoder", lambda: CLIPTextModel(config)),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler(
            **_SD_SCHEDULER, skip_prk_steps=True, set_alpha_to_one=False, prediction_type="epsilon"
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _sdxl(seed: int) -> Any:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = build_clip_tokenizer()
    tokenizer_2 = build_clip_tokenizer()
    tokenizer_2.pad_token = "!"  # CLIP-G (laion/CLIP-ViT-bigG-14) pads with "!", id 0 in both vocabs
    config = _clip_text_config(tokenizer, hidden_act="quick_gelu")  # CLIP-L
    config_2 = _clip_text_config(tokenizer_2, hidden_act="gelu")  # CLIP-G
    time_ids, time_dim = 6, 8  # original size, crop top-left, target size; each embedded 8 wide
    unet = _part(
        seed,
        "denoiser",
        lambda: UNet2DConditionModel(
            block_out_channels=(2, 4),
            layers_per_block=2,
            sample_size=_UNET_SAMPLE,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=_TEXT_WIDTH + time_ids * time_dim,
            cross_attention_dim=2 * _TEXT_WIDTH,
            norm_num_groups=1,
        ),
    )
    return StableDiffusionXLPipeline(
        vae=_part(seed, "vae", lambda: _vae(scaling_factor=0.13025)),
        text_encoder=_part(seed, "text_encoder", lambda: CLIPTextModel(config)),
        text_encoder_2=_part(seed, "text_encoder_2", lambda: CLIPTextModelWithProjection(config_2)),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler(
            **_SD_SCHEDULER,
            prediction_type="epsilon",
            timestep_spacing="leading",
            interpolation_type="linear",
            use_karras_sigmas=False,
        ),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def _flux(seed: int, *, dev: bool = False) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    tokenizer = build_clip_tokenizer()
    tokenizer_2 = build_t5_tokenizer()
    config = _clip_text_config(tokenizer, hidden_act="quick_gelu")
    config_2 = T5Config(
        vocab_size=len(tokenizer_2),
        d_model=_TEXT_WIDTH,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",  # t5-v1_1
        tie_word_embeddings=False,
        pad_token_id=tokenizer_2.pad_token_id,
        eos_token_id=tokenizer_2.eos_token_id,
        decoder_start_token_id=tokenizer_2.pad_token_id,
    )
    latent_channels = 1
    transformer = _part(
        seed,
        "denoiser",
        lambda: FluxTransformer2DModel(
            patch_size=1,
            in_channels=4 * latent_channels,  # the pipeline packs 2x2 latent pixels into one token
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=_TEXT_WIDTH,
            pooled_projection_dim=_TEXT_WIDTH,
            guidance_embeds=dev,
            axes_dims_rope=(4, 4, 8),
        ),
    )
    vae = _part(
        seed,
        "vae",
        lambda: _vae(
            blocks=(4,),
            latent_channels=latent_channels,
            groups=1,
            use_quant_conv=False,
            use_post_quant_conv=False,
            scaling_factor=0.3611,
            shift_factor=0.1159,
        ),
    )
    # schnell: no shift; dev: shift 3 with the resolution-dependent ("dynamic") shift of FLUX.1-dev's config.
    scheduler = (
        FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
        if dev
        else FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=_part(seed, "text_encoder", lambda: CLIPTextModel(config)),
        tokenizer=tokenizer,
        text_encoder_2=_part(seed, "text_encoder_2", lambda: T5EncoderModel(config_2)),
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
