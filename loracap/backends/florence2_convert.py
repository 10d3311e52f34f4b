"""Convert Florence-2 checkpoints from the original remote-code layout to transformers' native one.

microsoft/Florence-2-* and the MiaoshouAI PromptGen fine-tunes are published for the hub's remote
code, which no longer runs on current transformers. Their weights are the same network under other
names, so we rename the state dict (after transformers' own conversion script), rebuild the config
and the processor, and cache the result: the conversion runs once per checkpoint.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from loracap.hub import folder_fingerprint, loracap_cache_dir

log = logging.getLogger(__name__)

# Tokens the original processor code adds to the BART tokenizer at load time, in this order; the
# checkpoints' embedding rows follow it (50265 BART tokens + these 1024 = vocab_size 51289).
FLORENCE_ADDED_TOKENS = (
    ["<od>", "</od>", "<ocr>", "</ocr>"]
    + [f"<loc_{i}>" for i in range(1000)]
    + [
        "<cap>",
        "</cap>",
        "<ncap>",
        "</ncap>",
        "<dcap>",
        "</dcap>",
        "<grounding>",
        "</grounding>",
        "<seg>",
        "</seg>",
        "<sep>",
        "<region_cap>",
        "</region_cap>",
        "<region_to_desciption>",
        "</region_to_desciption>",
        "<proposal>",
        "</proposal>",
        "<poly>",
        "</poly>",
        "<and>",
    ]
)
IMAGE_TOKEN = "<image>"
TASKS_FILE = "loracap_florence2_tasks.json"

# Original name -> native name. Order matters only where patterns overlap (none do).
_KEY_RULES = [
    (r"^vision_tower\.convs\.(\d+)\.proj\.", r"model.vision_tower.convs.\1.conv."),
    (r"^vision_tower\.convs\.(\d+)\.norm\.", r"model.vision_tower.convs.\1.norm."),
    (
        r"^(vision_tower\.blocks\.\d+\.\d+\.(?:spatial|channel)_block)\.conv([12])\.fn\.dw\.",
        r"model.\1.conv\2.",
    ),
    (r"^(vision_tower\.blocks\.\d+\.\d+\.spatial_block)\.window_attn\.norm\.", r"model.\1.norm1."),
    (r"^(vision_tower\.blocks\.\d+\.\d+\.spatial_block)\.window_attn\.fn\.", r"model.\1.window_attn."),
    (r"^(vision_tower\.blocks\.\d+\.\d+\.channel_block)\.channel_attn\.norm\.", r"model.\1.norm1."),
    (r"^(vision_tower\.blocks\.\d+\.\d+\.channel_block)\.channel_attn\.fn\.", r"model.\1.channel_attn."),
    (r"^(vision_tower\.blocks\.\d+\.\d+\.(?:spatial|channel)_block)\.ffn\.norm\.", r"model.\1.norm2."),
    (r"^(vision_tower\.blocks\.\d+\.\d+\.(?:spatial|channel)_block)\.ffn\.fn\.net\.", r"model.\1.ffn."),
    (r"^image_projection$", "model.multi_modal_projector.image_projection.weight"),
    (r"^image_proj_norm\.", "model.multi_modal_projector.image_proj_norm."),
    (r"^image_pos_embed\.", "model.multi_modal_projector.image_position_embed."),
    (r"^visual_temporal_embed\.", "model.multi_modal_projector.visual_temporal_embed."),
    (r"^language_model\.model\.", "model.language_model."),
    (r"^language_model\.lm_head\.", "lm_head."),
]
# Present in the original checkpoints but unused by the forward pass the native model implements.
_UNUSED_KEYS = re.compile(r"^(vision_tower\.norms\.|vision_tower\.head\.|language_model\.final_logits_bias$)")
_GENERATION_KEYS = (
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "decoder_start_token_id",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "no_repeat_ngram_size",
)
_TASK_TOKEN = re.compile(r"<[A-Z][A-Z0-9_]*[A-Z0-9]>")

# Only pure-text parsing is used for captions; the other parsers need their config keys to exist.
_POST_PROCESSOR_CONFIG = {
    "pure_text": {},
    "ocr": {"PATTERN": r"(.+?)" + r"<loc_(\d+)>" * 8, "AREA_THRESHOLD": 0.0},
    "phrase_grounding": {"banned_grounding_tokens": []},
    "description_with_bboxes": {},
    "description_with_polygons": {},
    "polygons": {},
    "bboxes": {},
    "description_with_bboxes_or_polygons": {},
}


class ConversionError(Exception):
    """The folder looks like an original Florence-2 checkpoint but does not convert cleanly."""


def is_original_layout(folder: Path) -> bool:
    config = json.loads((folder / "config.json").read_text())
    vision_type = (config.get("vision_config") or {}).get("model_type")
    return config.get("model_type") == "florence2" and ("auto_map" in config or vision_type == "davit")


def converted_cache_root() -> Path:
    return loracap_cache_dir() / "converted"


def native_folder(folder: Path) -> Path:
    """The folder to load natively: the checkpoint itself, or its cached conversion."""
    if not is_original_layout(folder):
        return folder
    name = re.sub(r"[^\w.-]+", "-", folder.name if folder.name != "snapshots" else folder.parent.name)
    if folder.parent.name == "snapshots":  # HF cache: models--org--name/snapshots/<commit>
        name = folder.parent.parent.name.removeprefix("models--")
    target = converted_cache_root() / f"{name}-{folder_fingerprint(folder)}"
    if not (target / "config.json").is_file():
        log.info("converting %s to the native Florence-2 layout (once) -> %s", folder, target)
        convert_florence2(folder, target)
    return target


def rename_state_dict(original: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map original parameter names to native ones; unknown names are an error, not a silent drop."""
    native: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in original.items():
        if _UNUSED_KEYS.match(key):
            continue
        for pattern, replacement in _KEY_RULES:
            new_key, hits = re.subn(pattern, replacement, key)
            if hits:
                # The original projection is a bare (in, out) matrix used as x @ W; Linear wants (out, in).
                native[new_key] = tensor.t().contiguous() if key == "image_projection" else tensor
                break
        else:
            unknown.append(key)
    if unknown:
        raise ConversionError(f"unexpected weights {unknown[:5]} (+{max(0, len(unknown) - 5)} more)")
    return native


def _vision_config(original: dict) -> dict:
    names = (
        "depths",
        "num_heads",
        "num_groups",
        "window_size",
        "projection_dim",
        "patch_size",
        "patch_stride",
        "patch_padding",
        "patch_prenorm",
        "drop_path_rate",
    )
    config = {name: original[name] for name in names if name in original}
    config["embed_dim"] = original["dim_embed"]
    config["max_temporal_embeddings"] = original["visual_temporal_embedding"]["max_temporal_embeddings"]
    config["max_position_embeddings"] = original["image_pos_embed"]["max_pos_embeddings"]
    return config


def _text_config(original: dict) -> dict:
    from transformers import BartConfig

    known = set(BartConfig().to_dict())
    config = {k: v for k, v in original.items() if k in known and k not in ("architectures", "auto_map")}
    config["model_type"] = "bart"
    return config


def _load_weights(folder: Path) -> dict[str, torch.Tensor]:
    shards = sorted(folder.glob("*.safetensors"))
    if shards:
        from safetensors.torch import load_file

        weights: dict[str, torch.Tensor] = {}
        for shard in shards:
            weights.update(load_file(shard))
        return weights
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if not bins:
        raise ConversionError(f"{folder} has no model.safetensors or pytorch_model.bin")
    weights = {}
    for shard in bins:
        weights.update(torch.load(shard, map_location="cpu", weights_only=True))
    return weights


def read_task_prompts(folder: Path) -> dict[str, str]:
    """Task tokens a checkpoint declares, mapped to the text the model was trained on.

    Sources, all from the checkpoint: the dict literals in its remote processor code (never executed,
    parsed with `ast`), and task tokens its model card mentions (PromptGen documents `<GENERATE_TAGS>`,
    `<MIXED_CAPTION>` or `<MIX_CAPTION>` there; those are fed to the model as written).
    """
    tasks: dict[str, str] = {}
    code = folder / "processing_florence2.py"
    if code.is_file():
        for node in ast.walk(ast.parse(code.read_text(encoding="utf-8", errors="replace"))):
            if not (isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)):
                continue
            target = node.targets[0]
            name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
            if name == "task_prompts_without_inputs":
                try:
                    tasks.update(ast.literal_eval(node.value))
                except ValueError:
                    continue
    card = folder / "README.md"
    if card.is_file():
        for token in _TASK_TOKEN.findall(card.read_text(encoding="utf-8", errors="replace")):
            tasks.setdefault(token, token)
    return tasks


def convert_florence2(source: Path, target: Path) -> Path:
    """Write a native-layout copy of an original-layout Florence-2 checkpoint to `target`."""
    original = json.loads((source / "config.json").read_text())
    weights = rename_state_dict(_load_weights(source))
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".loracap-convert-", dir=target.parent))
    try:
        processor = _native_processor(source, original, staging)
        model = _native_model(original, weights, processor.tokenizer)
        model.generation_config = _generation_config(source, original)
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        (staging / TASKS_FILE).write_text(json.dumps(read_task_prompts(source), indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)  # readers never see a half-written conversion
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _native_processor(source: Path, original: dict, scratch: Path):
    """The original tokenizer plus the tokens its remote code added at load time, and `<image>`."""
    from transformers import AddedToken, AutoTokenizer, CLIPImageProcessorPil, Florence2Processor

    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.add_tokens(
        [AddedToken(t, special=True, normalized=False) for t in FLORENCE_ADDED_TOKENS], special_tokens=True
    )
    vocab_size = original.get("vocab_size") or original["text_config"]["vocab_size"]
    if len(tokenizer) != vocab_size:
        raise ConversionError(
            f"tokenizer has {len(tokenizer)} tokens with Florence-2's added ones, the model {vocab_size}"
        )
    # Naming the image token at load time gives it the next free id, after all of the above.
    tokenizer.save_pretrained(scratch)
    tokenizer = AutoTokenizer.from_pretrained(scratch, extra_special_tokens={"image_token": IMAGE_TOKEN})

    preprocessor = json.loads((source / "preprocessor_config.json").read_text())
    preprocessor = {k: v for k, v in preprocessor.items() if k not in ("auto_map", "processor_class")}
    image_processor = CLIPImageProcessorPil(**preprocessor)
    image_processor.image_seq_length = preprocessor["image_seq_length"]
    return Florence2Processor(
        image_processor=image_processor, tokenizer=tokenizer, post_processor_config=_POST_PROCESSOR_CONFIG
    )


def _native_model(original: dict, weights: dict[str, torch.Tensor], tokenizer):
    from transformers import Florence2Config, Florence2ForConditionalGeneration
    from transformers.initialization import no_init_weights

    config = Florence2Config(
        vision_config=_vision_config(original["vision_config"]),
        text_config=_text_config(original["text_config"]),
        image_token_id=tokenizer.image_token_id,
    )
    with no_init_weights():  # random init of 0.8B parameters would only be overwritten
        model = Florence2ForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # lm_head and the encoder/decoder embeddings are tied to `shared` and may be absent from the file.
    missing = [k for k in missing if not k.endswith(("embed_tokens.weight", "lm_head.weight"))]
    if missing or unexpected:
        raise ConversionError(
            f"weights do not fit the native model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.tie_weights()
    # One more row for <image>, padded to a multiple of 64 as transformers' conversion does.
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    return model


def _generation_config(source: Path, original: dict):
    """Decoding defaults the checkpoint was published with (forced BOS, no_repeat_ngram_size, ...)."""
    from transformers import GenerationConfig

    text = original["text_config"]
    settings = {k: text[k] for k in _GENERATION_KEYS if text.get(k) is not None}
    published = source / "generation_config.json"
    if published.is_file():
        settings.update(json.loads(published.read_text()))
    settings = {k: v for k, v in settings.items() if not k.startswith("_") and k != "transformers_version"}
    return GenerationConfig(**settings)
