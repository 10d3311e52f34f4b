"""Captioners exported by `loracap export-onnx`, on onnxruntime (no PyTorch at run time).

Two layouts, both as transformers.js reads them (see loracap/onnx_export):
- ViT-GPT2 (`encoder_model` + `decoder_model_merged`): the batch is encoded once; the first decoder step
  reads the start token with empty caches and computes every layer's cross-attention cache; each later
  step feeds one token per row and the caches back.
- loracap's own captioners (`vision_encoder` + `embed_tokens` + `decoder_model_merged`): the first step
  reads [prefix][prompt] as embeddings with empty caches; each later step one token's embedding.

Decoding is greedy, as loracap's PyTorch backends decode by default, until every row has written its end
token or `max_new_tokens` are spent; rows that ended keep getting the end token, as transformers pads
them. Sampling and beam search are refused.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .base import BackendError, Generation, GenerationSettings, check_mode
from .onnxrt import onnx_session

DEFAULT_MAX_NEW_TOKENS = 32
# Checked in this order: Florence-2's graphs include the prefix captioner's.
LAYOUTS = {
    "florence2": ("vision_encoder", "embed_tokens", "encoder_model", "decoder_model_merged"),
    "vision-encoder-decoder": ("encoder_model", "decoder_model_merged"),
    "prefix": ("vision_encoder", "embed_tokens", "decoder_model_merged"),
}
SUFFIXES = {None: "", "int8": "_quantized", "fp16": "_fp16"}


def onnx_layout(folder: Path) -> str | None:
    """Which exported layout `folder` holds, or None when it is not an exported captioner."""
    for layout, graphs in LAYOUTS.items():
        if all((Path(folder) / "onnx" / f"{name}.onnx").is_file() for name in graphs):
            return layout
    return None


def is_onnx_captioner(folder: Path) -> bool:
    return onnx_layout(folder) is not None


def load_onnx_captioner(
    folder: Path, name: str, *, quant: str | None = None, device: str | None = None
) -> Any:
    if quant not in SUFFIXES:
        raise ValueError(f"an ONNX captioner takes --quant {' or '.join(filter(None, SUFFIXES))} or none")
    backends = {"florence2": Florence2OnnxBackend, "prefix": PrefixOnnxBackend}
    backend = backends.get(onnx_layout(folder) or "", EncoderDecoderOnnxBackend)
    return backend(Path(folder), name, quant=quant, device=device)


Step = Callable[[np.ndarray, list[np.ndarray], int], list[np.ndarray]]


@dataclass(frozen=True)
class Rules:
    """What transformers' `generate` does to each greedy step's scores, from the checkpoint's generation
    config and the backend, so that the same graphs pick the same tokens."""

    limit: int
    least: int = 0
    """min_new_tokens: the end token is barred before."""
    eos: int | None = None
    prefix: tuple[int, ...] = ()
    """The decoder's input before the first new token: no_repeat_ngram_size counts it too."""
    no_repeat_ngram_size: int = 0
    forced_bos: int | None = None
    """The first new token (forced_bos_token_id), when the prefix does not already hold it."""
    forced_eos: int | None = None
    """The end token, forced at the last position (forced_eos_token_id)."""
    suppress: tuple[int, ...] = ()

    def apply(self, logits: np.ndarray, history: list[list[int]], position: int) -> np.ndarray:
        if position < self.least and self.eos is not None:
            logits[:, self.eos] = -np.inf
        if self.no_repeat_ngram_size:
            for row, tokens in enumerate(history):
                logits[row, banned_ngram_tokens(tokens, self.no_repeat_ngram_size)] = -np.inf
        for forced, at in ((self.forced_bos, 0), (self.forced_eos, self.limit - 1)):
            if forced is not None and position == at:
                logits[:] = -np.inf
                logits[:, forced] = 0
        if self.suppress:
            logits[:, list(self.suppress)] = -np.inf
        return logits


def banned_ngram_tokens(tokens: list[int], n: int) -> list[int]:
    """The tokens that would repeat an n-gram of `tokens` (transformers' no_repeat_ngram_size)."""
    if len(tokens) + 1 < n:
        return []
    tail = tuple(tokens[len(tokens) - n + 1 :])
    return [tokens[i + n - 1] for i in range(len(tokens) - n + 1) if tuple(tokens[i : i + n - 1]) == tail]


def greedy(first: list[np.ndarray], step: Step, rules: Rules) -> list[list[int]]:
    """Greedy token ids per row, up to and with the end token. `first` is the first step's outputs
    (logits, then the caches); `step(chosen, outputs, position)` runs the next step on the tokens chosen
    last (B,) and the last step's outputs."""
    outputs, eos = first, rules.eos
    batch = len(outputs[0])
    rows: list[list[int]] = [[] for _ in range(batch)]
    done = np.zeros(batch, dtype=bool)
    for position in range(rules.limit):
        history = [[*rules.prefix, *row] for row in rows]
        chosen = rules.apply(outputs[0][:, -1].astype(np.float32), history, position).argmax(axis=-1)
        if eos is not None:
            chosen = np.where(done, eos, chosen)
        for i, token in enumerate(chosen):
            if not done[i]:
                rows[i].append(int(token))
        if eos is not None:
            done |= chosen == eos
        if done.all() or position == rules.limit - 1:
            break
        outputs = step(chosen.astype(np.int64), outputs, position)
    return rows


def generation_rules(folder: Path) -> dict[str, Any]:
    """The decoding rules a checkpoint's generation_config.json sets (none when it has no such file)."""
    path = folder / "generation_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    return {
        "no_repeat_ngram_size": config.get("no_repeat_ngram_size") or 0,
        "forced_bos": config.get("forced_bos_token_id"),
        "forced_eos": config.get("forced_eos_token_id"),
    }


class _OnnxBackend:
    modes = ("caption",)
    tag_modes: frozenset[str] = frozenset()
    instructions = False
    graphs: tuple[str, ...] = ()

    def __init__(self, folder: Path, name: str, *, quant: str | None = None, device: str | None = None):
        from transformers import AutoImageProcessor, AutoTokenizer

        from .device import image_side

        self.name = name
        self.config = json.loads((folder / "config.json").read_text())
        self.image_processor = AutoImageProcessor.from_pretrained(folder)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.image_side = image_side(self.image_processor)
        suffix = SUFFIXES[quant]
        missing = [n for n in self.graphs if not (folder / "onnx" / f"{n}{suffix}.onnx").is_file()]
        if missing:
            raise BackendError(f"{name} has no {', '.join(f'onnx/{n}{suffix}.onnx' for n in missing)}")
        self.sessions = {
            n: onnx_session(
                folder / "onnx" / f"{n}{suffix}.onnx", device, what="an ONNX captioner", extra="onnx"
            )
            for n in self.graphs
        }
        self.default_batch_size = 16
        self.max_new_tokens = DEFAULT_MAX_NEW_TOKENS
        self.generation = generation_rules(folder)
        self.prefix: tuple[int, ...] = ()
        # Every layout ends in one merged decoder; its cache inputs are fed back from its outputs each step.
        self.decoder = self.sessions["decoder_model_merged"]
        caches = [i for i in self.decoder.get_inputs() if i.name.startswith("past_key_values")]
        self.cache_inputs = [i.name for i in caches]
        self.cache_shapes = {i.name: (i.shape[1], i.shape[3]) for i in caches}  # (heads, width)

    def empty_caches(self, batch: int) -> dict[str, np.ndarray]:
        """Length-0 caches for every cache input: what the first decoding step reads."""
        return {
            name: np.zeros((batch, heads, 0, width), dtype=np.float32)
            for name, (heads, width) in self.cache_shapes.items()
        }

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """Token ids -> the decoder's input embeddings (layouts with an `embed_tokens` graph)."""
        return self.sessions["embed_tokens"].run(None, {"input_ids": ids})[0]

    def prepare(self, images: list, mode: str, prompt: str | None = None) -> np.ndarray:
        check_mode(self, mode)
        if prompt:
            raise BackendError(f"{self.name} takes no prompt: it only captions from the image")
        return self.image_processor(images=images, return_tensors="np")["pixel_values"].astype(np.float32)

    def start(self, pixels: np.ndarray) -> tuple[list[np.ndarray], Step]:
        """The first decoding step's outputs (logits, then the caches) and the function that runs each
        next one for this batch."""
        raise NotImplementedError

    def first_logits(self, pixels: np.ndarray) -> np.ndarray:
        """The first decoding step's logits (what the parity check compares first)."""
        return self.start(pixels)[0][0][:, -1]

    def token_ids(self, pixels: np.ndarray, settings: GenerationSettings) -> list[list[int]]:
        """Greedy token ids per image, up to and with the end token."""
        if settings.num_beams != 1 or settings.do_sample:
            raise BackendError(
                f"{self.name} (onnxruntime) decodes greedily: leave out --num-beams and sampling"
            )
        first, step = self.start(pixels)
        return greedy(first, step, self.rules(pixels, settings))

    def rules(self, inputs: Any, settings: GenerationSettings) -> Rules:
        return Rules(
            limit=settings.max_new_tokens or self.max_new_tokens, least=settings.min_new_tokens or 0,
            eos=self.eos, prefix=self.prefix, **self.generation,
        )  # fmt: skip

    def generate(self, inputs: np.ndarray, settings: GenerationSettings) -> list[str]:
        return [g.text for g in self.generate_detailed(inputs, settings)]

    def generate_detailed(
        self, inputs: np.ndarray, settings: GenerationSettings, interrupt: Any = None
    ) -> list[Generation]:
        rows = self.token_ids(inputs, settings)
        limit = self.rules(inputs, settings).limit
        texts = self.tokenizer.batch_decode(rows, skip_special_tokens=True)
        return [
            Generation(text.strip(), 1, len(row), bool(row) and row[-1] != self.eos and len(row) >= limit)
            for text, row in zip(texts, rows, strict=True)
        ]


class EncoderDecoderOnnxBackend(_OnnxBackend):
    graphs = LAYOUTS["vision-encoder-decoder"]

    def __init__(self, folder: Path, name: str, *, quant: str | None = None, device: str | None = None):
        super().__init__(folder, name, quant=quant, device=device)
        config = self.config
        self.start_id = config.get("decoder_start_token_id") or 0
        self.prefix = (self.start_id,)
        self.eos = config.get("eos_token_id", config.get("decoder", {}).get("eos_token_id"))

    def start(self, pixels: np.ndarray) -> tuple[list[np.ndarray], Step]:
        states = self.sessions["encoder_model"].run(None, {"pixel_values": pixels})[0]
        feed = {
            "input_ids": np.full((len(pixels), 1), self.start_id, dtype=np.int64),
            "encoder_hidden_states": states,
            "use_cache_branch": np.array([False]),
            **self.empty_caches(len(pixels)),
        }

        def step(chosen: np.ndarray, outputs: list[np.ndarray], position: int) -> list[np.ndarray]:
            feed = {"input_ids": chosen[:, None], "encoder_hidden_states": states,
                    "use_cache_branch": np.array([True])}  # fmt: skip
            feed.update(zip(self.cache_inputs, outputs[1:], strict=True))
            return self.decoder.run(None, feed)

        return self.decoder.run(None, feed), step


class PrefixOnnxBackend(_OnnxBackend):
    graphs = LAYOUTS["prefix"]

    def __init__(self, folder: Path, name: str, *, quant: str | None = None, device: str | None = None):
        super().__init__(folder, name, quant=quant, device=device)
        prompt = self.config.get("prompt") or ""
        # As loracap.prefix.batching.prompt_ids, which imports torch: this backend runs without it.
        self.prompt_ids = (
            list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"]) if prompt else []
        )
        self.eos = self.tokenizer.eos_token_id
        self.max_new_tokens = self.config.get("max_caption_tokens") or DEFAULT_MAX_NEW_TOKENS
        if self.config.get("caption_format") == "tags":
            self.tag_modes = frozenset({"caption"})

    def start(self, pixels: np.ndarray) -> tuple[list[np.ndarray], Step]:
        embeds = self.sessions["vision_encoder"].run(None, {"pixel_values": pixels})[0]
        if self.prompt_ids:
            prompt = self.embed(np.array([self.prompt_ids] * len(pixels), dtype=np.int64))
            embeds = np.concatenate([embeds, prompt], axis=1)
        batch, length = embeds.shape[:2]
        feed = {
            "inputs_embeds": embeds,
            "attention_mask": np.ones((batch, length), dtype=np.int64),
            "position_ids": np.tile(np.arange(length, dtype=np.int64), (batch, 1)),
            **self.empty_caches(batch),
        }

        def step(chosen: np.ndarray, outputs: list[np.ndarray], position: int) -> list[np.ndarray]:
            at = length + position  # the chosen token's position: after the prefix, prompt and earlier ones
            feed = {
                "inputs_embeds": self.embed(chosen[:, None]),
                "attention_mask": np.ones((batch, at + 1), dtype=np.int64),
                "position_ids": np.full((batch, 1), at, dtype=np.int64),
            }
            feed.update(zip(self.cache_inputs, outputs[1:], strict=True))
            return self.decoder.run(None, feed)

        return self.decoder.run(None, feed), step


class Florence2OnnxBackend(_OnnxBackend):
    """Florence-2: the image's features take the place of its `<image>` tokens in the task prompt's
    embeddings, the encoder reads them, and the decoder starts from the checkpoint's prefix ("</s><s>" for a
    caption mode) with the ids that are no caption words suppressed, as loracap's PyTorch backend does."""

    graphs = LAYOUTS["florence2"]
    tag_modes = frozenset({"tags"})

    def __init__(self, folder: Path, name: str, *, quant: str | None = None, device: str | None = None):
        from transformers import AutoProcessor

        from .florence2_tasks import DEFAULT_MAX_NEW_TOKENS as MODE_TOKENS

        super().__init__(folder, name, quant=quant, device=device)
        self.processor = AutoProcessor.from_pretrained(folder)
        settings = json.loads((folder / "onnx" / "florence2.json").read_text())
        self.tasks, self.mode_tokens = settings["tasks"], settings["modes"]
        self.modes = tuple(self.mode_tokens)
        self.suppress = tuple(settings["suppress_ids"])
        self.decoder_prefix = tuple(settings["decoder_prefix"])
        self.image_token_id = settings["image_token_id"]
        self.eos = json.loads((folder / "generation_config.json").read_text()).get("eos_token_id")
        self.mode_max_tokens = MODE_TOKENS
        self.default_batch_size = 8

    def prepare(self, images: list, mode: str, prompt: str | None = None) -> dict[str, Any]:
        from .florence2_tasks import task_text

        if not prompt:
            check_mode(self, mode)
        text = task_text(self.tasks, self.mode_tokens, mode, prompt)
        batch = self.processor(text=[text] * len(images), images=images, return_tensors="np")
        return {
            "input_ids": batch["input_ids"].astype(np.int64),
            "pixel_values": batch["pixel_values"].astype(np.float32),
            "mode": mode,
            "caption_only": prompt is None,
        }

    def rules(self, inputs: Any, settings: GenerationSettings) -> Rules:
        caption = inputs["caption_only"]
        generation = dict(self.generation)
        if caption:  # the prefix already ends with the forced <s>
            generation["forced_bos"] = None
        return Rules(
            limit=settings.max_new_tokens or self.mode_max_tokens.get(inputs["mode"], 256),
            least=settings.min_new_tokens or 0, eos=self.eos,
            prefix=self.decoder_prefix if caption else self.decoder_prefix[:1],
            suppress=self.suppress if caption else (), **generation,
        )  # fmt: skip

    def start(self, inputs: dict[str, Any]) -> tuple[list[np.ndarray], Step]:
        ids = inputs["input_ids"]
        features = self.sessions["vision_encoder"].run(None, {"pixel_values": inputs["pixel_values"]})[0]
        embeds = self.embed(ids)
        embeds[ids == self.image_token_id] = features.reshape(-1, features.shape[-1])  # row by row, in order
        mask = np.ones(ids.shape, dtype=np.int64)
        encoder = self.sessions["encoder_model"]
        states = encoder.run(None, {"inputs_embeds": embeds, "attention_mask": mask})[0]
        prefix = self.decoder_prefix if inputs["caption_only"] else self.decoder_prefix[:1]
        common = {"encoder_hidden_states": states, "encoder_attention_mask": mask}
        feed = {
            "inputs_embeds": self.embed(np.array([prefix] * len(ids), dtype=np.int64)),
            "use_cache_branch": np.array([False]),
            **common,
            **self.empty_caches(len(ids)),
        }

        def step(chosen: np.ndarray, outputs: list[np.ndarray], position: int) -> list[np.ndarray]:
            feed = {
                "inputs_embeds": self.embed(chosen[:, None]),
                "use_cache_branch": np.array([True]),
                **common,
            }
            feed.update(zip(self.cache_inputs, outputs[1:], strict=True))
            return self.decoder.run(None, feed)

        return self.decoder.run(None, feed), step
