"""Models loracap knows by name, what they can do, and what they need. Data, not code."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MODEL = "MiaoshouAI/Florence-2-large-PromptGen-v1.5"
# --model openai:MODEL captions through an OpenAI-compatible server (vLLM, Ollama, `loracap serve`).
REMOTE_PREFIX = "openai:"

_PROMPTGEN_MODES = ("tags", "caption", "detailed", "more_detailed", "mixed")
_PROMPTGEN2_MODES = (*_PROMPTGEN_MODES, "mixed_plus", "analyze")
_FLORENCE_MODES = ("caption", "detailed", "more_detailed")
ANY_STYLE = ("any style",)  # instruction-following chat models caption in every prompt style


def _remote_code(successor: str) -> str:
    """Why a remote-code checkpoint is refused, and the native model to use instead."""
    return f"needs trust_remote_code, and loracap runs no model's remote code; use {successor}"


@dataclass(frozen=True)
class KnownModel:
    id: str
    family: str
    modes: tuple[str, ...]
    params_m: int
    """Parameters in millions; weights take about 2 bytes each in fp16/bf16, 1 at 8-bit, 0.5 at 4-bit."""
    note: str = ""
    unsupported: str = ""
    """Why loracap cannot run it, when it cannot."""

    def memory_gb(self, bytes_per_param: float) -> float:
        return self.params_m * 1e6 * bytes_per_param / 2**30


KNOWN_MODELS: tuple[KnownModel, ...] = (
    KnownModel(DEFAULT_MODEL, "florence2", _PROMPTGEN_MODES, 770, "default: tags and captions for SD/Flux"),
    KnownModel("MiaoshouAI/Florence-2-large-PromptGen-v2.0", "florence2", _PROMPTGEN2_MODES, 770),
    KnownModel(
        "MiaoshouAI/Florence-2-base-PromptGen-v1.5", "florence2", _PROMPTGEN_MODES, 230, "small, fast"
    ),
    KnownModel("MiaoshouAI/Florence-2-base-PromptGen-v2.0", "florence2", _PROMPTGEN2_MODES, 230),
    KnownModel("microsoft/Florence-2-large", "florence2", _FLORENCE_MODES, 770),
    KnownModel("microsoft/Florence-2-base", "florence2", _FLORENCE_MODES, 230),
    KnownModel("microsoft/Florence-2-large-ft", "florence2", _FLORENCE_MODES, 770),
    KnownModel("florence-community/Florence-2-large", "florence2", _FLORENCE_MODES, 770, "native layout"),
    KnownModel("florence-community/Florence-2-base", "florence2", _FLORENCE_MODES, 230, "native layout"),
    KnownModel(
        "fancyfeast/llama-joycaption-beta-one-hf-llava",
        "llava",
        ANY_STYLE,
        8480,
        "JoyCaption: the LoRA captioner of choice on 12 GB+",
    ),
    KnownModel("Qwen/Qwen2.5-VL-3B-Instruct", "qwen2_5_vl", ANY_STYLE, 3750),
    KnownModel("Qwen/Qwen2.5-VL-7B-Instruct", "qwen2_5_vl", ANY_STYLE, 8290),
    KnownModel("Qwen/Qwen2-VL-2B-Instruct", "qwen2_vl", ANY_STYLE, 2210),
    KnownModel("Qwen/Qwen2-VL-7B-Instruct", "qwen2_vl", ANY_STYLE, 8290),
    KnownModel("Qwen/Qwen3-VL-4B-Instruct", "qwen3_vl", ANY_STYLE, 4440),
    KnownModel("Qwen/Qwen3-VL-8B-Instruct", "qwen3_vl", ANY_STYLE, 8770),
    KnownModel("HuggingFaceTB/SmolVLM-Instruct", "idefics3", ANY_STYLE, 2250, "4-8 GB cards"),
    KnownModel("HuggingFaceTB/SmolVLM2-2.2B-Instruct", "smolvlm", ANY_STYLE, 2250),
    KnownModel("HuggingFaceTB/SmolVLM-500M-Instruct", "idefics3", ANY_STYLE, 510),
    KnownModel("google/paligemma-3b-mix-224", "paligemma", ("caption",), 2920, "gated: accept the licence"),
    KnownModel("google/paligemma2-3b-mix-224", "paligemma", ("caption",), 3030, "gated: accept the licence"),
    KnownModel("llava-hf/llava-1.5-7b-hf", "llava", ANY_STYLE, 7060),
    KnownModel("llava-hf/llava-v1.6-mistral-7b-hf", "llava_next", ANY_STYLE, 7570),
    KnownModel("Salesforce/blip-image-captioning-large", "blip", ("caption",), 470, "--prompt 'a photo of'"),
    KnownModel("Salesforce/blip-image-captioning-base", "blip", ("caption",), 250),
    KnownModel(
        "nlpconnect/vit-gpt2-image-captioning", "vision-encoder-decoder", ("caption",), 240, "short captions"
    ),
    # WD taggers: ONNX graphs on onnxruntime (the `tagger` extra); parameters are the backbone's plus the
    # ~10.9k-tag head, approximately.
    KnownModel("SmilingWolf/wd-vit-tagger-v3", "wd-tagger", ("tags",), 94, "booru tags, on onnxruntime"),
    KnownModel("SmilingWolf/wd-swinv2-tagger-v3", "wd-tagger", ("tags",), 96),
    KnownModel("SmilingWolf/wd-convnext-tagger-v3", "wd-tagger", ("tags",), 99),
    KnownModel(
        "SmilingWolf/wd-eva02-large-tagger-v3", "wd-tagger", ("tags",), 315, "the most accurate WD tagger"
    ),
    KnownModel("SmilingWolf/wd-v1-4-moat-tagger-v2", "wd-tagger", ("tags",), 80, "WD14 (v2 tags)"),
    # Parameters below: counted from each checkpoint's architecture (its config built on the meta device),
    # except MiniCPM-V 4.6, whose model card gives ~1.3B (SigLIP2-400M + Qwen3.5-0.8B).
    KnownModel(
        "meta-llama/Llama-3.2-11B-Vision-Instruct", "mllama", ANY_STYLE, 10640, "gated: accept the licence"
    ),
    KnownModel("google/gemma-3-4b-it", "gemma3", ANY_STYLE, 4320, "gated: accept the licence"),
    KnownModel("google/gemma-3-12b-it", "gemma3", ANY_STYLE, 12200, "gated: accept the licence"),
    KnownModel("OpenGVLab/InternVL3-1B-hf", "internvl", ANY_STYLE, 940, "small, fast"),
    KnownModel("OpenGVLab/InternVL3-2B-hf", "internvl", ANY_STYLE, 2090),
    KnownModel("OpenGVLab/InternVL3-8B-hf", "internvl", ANY_STYLE, 7940),
    KnownModel("openbmb/MiniCPM-V-4.6", "minicpmv4_6", ANY_STYLE, 1300),
    KnownModel("allenai/Molmo2-8B", "molmo2", ANY_STYLE, 8690, "needs torchvision"),
    KnownModel("Salesforce/blip2-opt-2.7b", "blip-2", ("caption",), 3740, "--prompt 'a photo of'"),
    KnownModel("Salesforce/instructblip-flan-t5-xl", "instructblip", ANY_STYLE, 3960),
    KnownModel("Salesforce/instructblip-vicuna-7b", "instructblip", ANY_STYLE, 7910),
    KnownModel("microsoft/git-large-textcaps", "git", ("caption",), 390, "sd-scripts' GIT captioner"),
    KnownModel("microsoft/git-large-coco", "git", ("caption",), 390),
    KnownModel(
        "vikhyatk/moondream2",
        "moondream",
        ANY_STYLE,
        1930,
        unsupported=_remote_code("OpenGVLab/InternVL3-2B-hf, as small and native"),
    ),
    KnownModel(
        "openbmb/MiniCPM-V-2_6",
        "minicpmv",
        ANY_STYLE,
        8100,
        unsupported=_remote_code("its native successor openbmb/MiniCPM-V-4.6"),
    ),
    KnownModel(
        "allenai/Molmo-7B-D-0924",
        "molmo",
        ANY_STYLE,
        8020,
        unsupported=_remote_code("its native successor allenai/Molmo2-8B"),
    ),
)
