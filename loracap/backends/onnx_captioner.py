"""A ViT-GPT2-style captioner exported by `loracap export-onnx`, on onnxruntime (no PyTorch at run time).

The folder holds config.json, the image processor and tokenizer files, and onnx/encoder_model.onnx,
decoder_model.onnx and decoder_with_past_model.onnx (`_quantized` variants with `--quant int8`). A batch
is encoded once; the first decoder step reads the start token and computes every layer's cross-attention
cache; each later step feeds one token per row and the caches back (greedy, as loracap's PyTorch backend
decodes by default), until every row has written its end token or `max_new_tokens` are spent. Rows that
ended keep getting the end token, as transformers pads them. Sampling and beam search are refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .base import BackendError, Generation, GenerationSettings, check_mode
from .onnxrt import onnx_session

DEFAULT_MAX_NEW_TOKENS = 32
GRAPHS = ("encoder_model", "decoder_model", "decoder_with_past_model")


def is_onnx_captioner(folder: Path) -> bool:
    return all((Path(folder) / "onnx" / f"{name}.onnx").is_file() for name in GRAPHS)


class OnnxCaptionerBackend:
    modes = ("caption",)
    tag_modes: frozenset[str] = frozenset()
    instructions = False

    def __init__(
        self, folder: Path, name: str, *, quantized: bool = False, device: str | None = None
    ) -> None:
        from transformers import AutoImageProcessor, AutoTokenizer

        from .device import image_side

        self.name = name
        folder = Path(folder)
        config = json.loads((folder / "config.json").read_text())
        self.start = config.get("decoder_start_token_id") or 0
        self.eos = config.get("eos_token_id", config.get("decoder", {}).get("eos_token_id"))
        self.image_processor = AutoImageProcessor.from_pretrained(folder)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.image_side = image_side(self.image_processor)
        suffix = "_quantized" if quantized else ""
        missing = [n for n in GRAPHS if not (folder / "onnx" / f"{n}{suffix}.onnx").is_file()]
        if missing:
            raise BackendError(f"{name} has no {', '.join(f'onnx/{n}{suffix}.onnx' for n in missing)}")
        self.sessions = {
            n: onnx_session(
                folder / "onnx" / f"{n}{suffix}.onnx", device, what="an ONNX captioner", extra="onnx"
            )
            for n in GRAPHS
        }
        self.cache_inputs = [i.name for i in self.sessions["decoder_with_past_model"].get_inputs()][2:]
        self.default_batch_size = 16

    def prepare(self, images: list, mode: str, prompt: str | None = None) -> np.ndarray:
        check_mode(self, mode)
        if prompt:
            raise BackendError(f"{self.name} takes no prompt: it only captions from the image")
        return self.image_processor(images=images, return_tensors="np")["pixel_values"].astype(np.float32)

    def first_logits(self, pixels: np.ndarray) -> np.ndarray:
        """The first decoding step's logits (what the parity check compares first)."""
        states = self.sessions["encoder_model"].run(None, {"pixel_values": pixels})[0]
        ids = np.full((len(pixels), 1), self.start, dtype=np.int64)
        return self.sessions["decoder_model"].run(None, {"input_ids": ids, "encoder_hidden_states": states})[
            0
        ][:, -1]

    def token_ids(self, pixels: np.ndarray, settings: GenerationSettings) -> list[list[int]]:
        """Greedy token ids per image, up to and with the end token."""
        if settings.num_beams != 1 or settings.do_sample:
            raise BackendError(
                f"{self.name} (onnxruntime) decodes greedily: leave out --num-beams and sampling"
            )
        limit = settings.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
        least = settings.min_new_tokens or 0
        states = self.sessions["encoder_model"].run(None, {"pixel_values": pixels})[0]
        batch = len(pixels)
        ids = np.full((batch, 1), self.start, dtype=np.int64)
        outputs = self.sessions["decoder_model"].run(
            None, {"input_ids": ids, "encoder_hidden_states": states}
        )
        rows: list[list[int]] = [[] for _ in range(batch)]
        done = np.zeros(batch, dtype=bool)
        for step in range(limit):
            logits = outputs[0][:, -1].copy()
            if step < least and self.eos is not None:
                logits[:, self.eos] = -np.inf
            chosen = logits.argmax(axis=-1)
            if self.eos is not None:
                chosen = np.where(done, self.eos, chosen)
            for i, token in enumerate(chosen):
                if not done[i]:
                    rows[i].append(int(token))
            if self.eos is not None:
                done |= chosen == self.eos
            if done.all() or step == limit - 1:
                break
            feed = {"input_ids": chosen[:, None].astype(np.int64), "encoder_hidden_states": states}
            feed.update(zip(self.cache_inputs, outputs[1:], strict=True))
            outputs = self.sessions["decoder_with_past_model"].run(None, feed)
        return rows

    def generate(self, inputs: np.ndarray, settings: GenerationSettings) -> list[str]:
        return [g.text for g in self.generate_detailed(inputs, settings)]

    def generate_detailed(
        self, inputs: np.ndarray, settings: GenerationSettings, interrupt: Any = None
    ) -> list[Generation]:
        rows = self.token_ids(inputs, settings)
        limit = settings.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
        texts = self.tokenizer.batch_decode(rows, skip_special_tokens=True)
        return [
            Generation(text.strip(), 1, len(row), bool(row) and row[-1] != self.eos and len(row) >= limit)
            for text, row in zip(texts, rows, strict=True)
        ]
