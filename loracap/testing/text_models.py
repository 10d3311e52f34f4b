"""Tiny random-weight decoder-only LMs (the prefix captioner's text side), saved as hub checkpoints are.

`make_tiny_model("llama", out)` writes a checkpoint shaped like HuggingFaceTB/SmolLM2-135M, loracap's default
`--lm`: `LlamaForCausalLM` with tied input/output embeddings, grouped-query attention, rope theta 1e5, RMS
norm eps 1e-5, and a `GPT2Tokenizer` (byte-level BPE, no BOS prepended) trained here on the caption corpus.
SmolLM2's 17 special tokens keep their hub ids: `<|endoftext|>`=0, `<|im_start|>`=1, `<|im_end|>`=2, then
`<repo_name>` ... `<empty_output>` (3-16).

Special-token roles follow the base SmolLM2-135M: `<|endoftext|>` (id 0) is its bos, eos and unk token. The
hub base tokenizer has no pad token; this one pads with `<|endoftext|>` too (pad == eos == 0), what users set
for SmolLM2 (`tok.pad_token = tok.eos_token`) and what SmolLM2-Instruct ships (pad = its eos), so batching
with `padding=True` works and code that must not mask the real eos when it masks padding is exercised. The
model config keeps `pad_token_id` unset, as on the hub: Llama would make the pad id its embedding's
`padding_idx`, whose row gets no gradient from the input side, and here that row is also the eos row the
captioner must learn to produce. `generation_config` names eos and pad (both 0), so `generate` stops at
eos and fills finished rows with it.

torch and transformers are imported inside the functions so `import loracap.testing` stays light.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from loracap.testing.seeding import seeded_model, set_generation_ids
from loracap.testing.tokenizer import train_byte_level_bpe

if TYPE_CHECKING:  # pragma: no cover - typing only
    from transformers import PreTrainedTokenizerBase

TEXT_ARCHS: tuple[str, ...] = ("llama",)

SMOLLM2_EOS = "<|endoftext|>"
# SmolLM2's tokenizer (inherited from StarCoder2 / SmolLM) lists these first, with ids 0-16.
SMOLLM2_SPECIALS: tuple[str, ...] = (
    SMOLLM2_EOS,
    "<|im_start|>",
    "<|im_end|>",
    "<repo_name>",
    "<reponame>",
    "<file_sep>",
    "<filename>",
    "<gh_stars>",
    "<issue_start>",
    "<issue_comment>",
    "<issue_closed>",
    "<jupyter_start>",
    "<jupyter_text>",
    "<jupyter_code>",
    "<jupyter_output>",
    "<jupyter_script>",
    "<empty_output>",
)
# SmolLM2-135M: 576 wide, 30 layers, 9 heads / 3 kv heads (head_dim 64), 8192 positions. Tiny: 32 wide,
# 2 layers (so "the last layer" and "the others" differ), 4 heads / 2 kv heads (still grouped-query, head
# dim 8).
_WIDTH = 32
_FFN = 64
_LAYERS = 2
_HEADS = 4
_KV_HEADS = 2
_MAX_POSITIONS = 512
_ROPE_THETA = 100000.0


def build_text_model(arch: str, out: Path, *, seed: int = 0) -> None:
    """Build the tiny `arch` causal LM with its tokenizer and save it into `out` (an existing folder)."""
    builders = {"llama": _build_llama}
    builders[arch](out, seed)


def build_smollm2_tokenizer() -> PreTrainedTokenizerBase:
    """A SmolLM2-style byte-level BPE: the 17 specials at ids 0-16, `<|endoftext|>` as bos/eos/unk/pad.

    Wrapped in `GPT2Tokenizer` (transformers 5's fast GPT-2 tokenizer), the class SmolLM2's
    tokenizer_config.json names, whose pre-tokenizer and decoder are the plain byte-level ones
    `train_byte_level_bpe` trains with, so the saved tokenizer.json and the reloaded tokenizer agree.
    Nothing is prepended or appended: like SmolLM2 (and GPT-2), text encodes without bos or eos.
    """
    from transformers import GPT2Tokenizer

    tok = train_byte_level_bpe(SMOLLM2_SPECIALS)
    fast = GPT2Tokenizer(
        tokenizer_object=tok,
        unk_token=SMOLLM2_EOS,
        bos_token=SMOLLM2_EOS,
        eos_token=SMOLLM2_EOS,
        pad_token=SMOLLM2_EOS,
        model_max_length=_MAX_POSITIONS,
    )
    # Already in the vocab at ids 1-16; listing them makes them `additional_special_tokens` as on the hub.
    fast.add_special_tokens(
        {"extra_special_tokens": list(SMOLLM2_SPECIALS[1:])}, replace_extra_special_tokens=False
    )
    return fast


def _build_llama(out: Path, seed: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_smollm2_tokenizer()
    eos = tokenizer.eos_token_id
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=_WIDTH,
        intermediate_size=_FFN,
        num_hidden_layers=_LAYERS,
        num_attention_heads=_HEADS,
        num_key_value_heads=_KV_HEADS,
        hidden_act="silu",
        max_position_embeddings=_MAX_POSITIONS,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": _ROPE_THETA},
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos,
        pad_token_id=None,  # see the module docstring: the pad id would become the embedding's padding_idx
    )
    model = seeded_model(seed, lambda: LlamaForCausalLM(config))
    # The pad id is named (not left for generate to borrow from eos with a warning): finished rows are
    # filled with it.
    set_generation_ids(model, tokenizer)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
