"""The registry of the test kit: every buildable arch, the sizes and weight formats, and `make_tiny_model`.

Every builder constructs the published architecture from a config (tiny or full size), a tokenizer trained
locally (see `loracap.testing.tokenizer`) and the real processor, seeds torch, and writes the result with
`save_pretrained`, so a test or benchmark loads it through the same Auto classes and code paths as a hub
checkpoint, with no network. Weights are random: a model's text is junk, only its behaviour can be asserted.

The builders live with their family: `florence2` (native Florence-2), `florence2_original` (the original
remote-code layout of microsoft/Florence-2-* and MiaoshouAI/Florence-2-*-PromptGen-*, the independent
reference for loracap's converter), `caption_models` (BLIP, ViT-GPT2, and `blip-itm`, BLIP's image-text
matching model), `chat_models` (chat VLMs), `chat_families` (more of them: Llama-3.2-Vision, Gemma 3,
InternVL, MiniCPM-V, Molmo2, and BLIP-2 / InstructBLIP / GIT, which have no chat template), `clip_models`
(CLIP, SigLIP, and `siglip`, the vision tower `loracap train` assembles) and `text_models` (`llama`, a
SmolLM2-shaped causal LM), and `diffusion_models` (`sd15`, `sdxl`, `flux`: diffusers pipeline folders for
DreamBooth-LoRA training and generation), and `tagger_models` (`wd-tagger`, a WD14-style ONNX tagger). Only
the first three also build the published size.

torch, transformers and diffusers are imported inside the builders so `import loracap.testing` stays light.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from loracap.testing.caption_models import write_blip, write_blip_itm, write_vit_gpt2
from loracap.testing.chat_families import FAMILY_ARCHS, build_family_model
from loracap.testing.chat_models import CHAT_ARCHS, build_chat_model
from loracap.testing.clip_models import CLIP_ARCHS, VISION_ARCHS, build_clip_model
from loracap.testing.diffusion_models import DIFFUSION_ARCHS, build_diffusion_model
from loracap.testing.florence2 import write_florence2
from loracap.testing.florence2_original import write_florence2_original
from loracap.testing.tagger_models import TAGGER_ARCHS, build_tagger
from loracap.testing.text_models import TEXT_ARCHS, build_text_model

# The archs that also come in the published size: arch -> write(out, size=, seed=) (florence2-original also
# takes weights_format=).
_SIZED_BUILDERS: dict[str, Callable[..., None]] = {
    "florence2": write_florence2,
    "florence2-original": write_florence2_original,
    "blip": write_blip,
    "vit-gpt2": write_vit_gpt2,
    "blip-itm": write_blip_itm,
}
# The families built tiny only: build(arch, out, seed=...).
_TINY_FAMILIES: tuple[tuple[tuple[str, ...], Callable[..., None]], ...] = (
    (CHAT_ARCHS, build_chat_model),
    (FAMILY_ARCHS, build_family_model),
    ((*CLIP_ARCHS, *VISION_ARCHS), build_clip_model),
    (TEXT_ARCHS, build_text_model),
    (TAGGER_ARCHS, build_tagger),
    (DIFFUSION_ARCHS, build_diffusion_model),
)

ARCHS: tuple[str, ...] = (
    *_SIZED_BUILDERS,
    *CHAT_ARCHS,
    *FAMILY_ARCHS,
    *CLIP_ARCHS,
    *VISION_ARCHS,
    *TEXT_ARCHS,
    *TAGGER_ARCHS,
    *DIFFUSION_ARCHS,
)
SIZES: tuple[str, ...] = ("tiny", "full")
WEIGHTS_FORMATS: tuple[str, ...] = ("safetensors", "bin")


def make_tiny_model(
    arch: str,
    out_dir: str | Path,
    *,
    size: str = "tiny",
    seed: int = 0,
    weights_format: str = "safetensors",
) -> Path:
    """Build a random-weight `arch` model with its tokenizer and processor and save it into `out_dir`.

    `size="tiny"` (the default) builds in well under a second and takes a few MB, for tests; `size="full"`
    builds the published architecture (Florence-2-large, BLIP-large, ViT-GPT2, BLIP-ITM-base) for benchmarks.
    The same `seed` gives byte-identical weights; the global torch RNG state is left as it was.
    `weights_format="bin"` writes `pytorch_model.bin` instead of `model.safetensors`; only
    `florence2-original` offers it, because only the original Florence-2 checkpoints (microsoft/*) are
    published that way. Returns `out_dir` as a `Path`.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(ARCHS)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; valid: {', '.join(SIZES)}")
    if weights_format not in WEIGHTS_FORMATS:
        raise ValueError(f"unknown weights_format {weights_format!r}; valid: {', '.join(WEIGHTS_FORMATS)}")
    if weights_format != "safetensors" and arch != "florence2-original":
        raise ValueError(
            "weights_format='bin' is only offered for 'florence2-original' (microsoft/* ship .bin)"
        )
    if size != "tiny" and arch not in _SIZED_BUILDERS:
        raise ValueError(f"only size='tiny' is offered for {arch!r}")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if arch == "florence2-original":
        write_florence2_original(out, size=size, seed=seed, weights_format=weights_format)
    elif arch in _SIZED_BUILDERS:
        _SIZED_BUILDERS[arch](out, size=size, seed=seed)
    else:
        family = next(build for archs, build in _TINY_FAMILIES if arch in archs)
        family(arch, out, seed=seed)
    return out
