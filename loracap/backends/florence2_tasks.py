"""Florence-2's modes and task tokens, without torch: the PyTorch backend and the exported (ONNX) one share
them."""

from __future__ import annotations

# A mode is the caption kind users ask for; each checkpoint spells its task tokens its own way, so a
# mode lists the spellings seen in the wild and the checkpoint decides which one it understands.
MODE_TASK_TOKENS: dict[str, tuple[str, ...]] = {
    "tags": ("<GENERATE_TAGS>",),
    "caption": ("<CAPTION>",),
    "detailed": ("<DETAILED_CAPTION>",),
    "more_detailed": ("<MORE_DETAILED_CAPTION>",),
    "mixed": ("<MIXED_CAPTION>", "<MIX_CAPTION>"),
    "mixed_plus": ("<MIXED_CAPTION_PLUS>", "<MIX_CAPTION_PLUS>"),
    "analyze": ("<ANALYZE>",),
}
# Rough output lengths, so one-line captions do not reserve a paragraph's worth of decoding.
DEFAULT_MAX_NEW_TOKENS = {
    "tags": 256,
    "caption": 64,
    "detailed": 256,
    "more_detailed": 512,
    "mixed": 512,
    "mixed_plus": 768,
    "analyze": 512,
}


def resolve_modes(tasks: dict[str, str]) -> dict[str, str]:
    """mode -> the task token this checkpoint knows for it (first spelling it declares)."""
    modes = {}
    for mode, spellings in MODE_TASK_TOKENS.items():
        for token in spellings:
            if token in tasks:
                modes[mode] = token
                break
    return modes


def task_text(tasks: dict[str, str], mode_tokens: dict[str, str], mode: str, prompt: str | None) -> str:
    """The text fed to the model: the task's trained prompt, or the user's own task token / prompt (the
    caller has checked that `mode` is one of the checkpoint's)."""
    if prompt:
        return tasks.get(prompt, prompt)
    token = mode_tokens[mode]
    return tasks.get(token, token)
