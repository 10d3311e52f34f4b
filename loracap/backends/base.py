"""The backend protocol: load a model once, caption batches of decoded images.

A backend is split in two on purpose. `prepare` turns PIL images into model inputs on the CPU and
is safe to call from worker threads, so decoding and preprocessing run ahead of the model.
`generate` runs the model on the accelerator. `caption_images` glues them for callers that have
images in memory (the Python API, a server, a Ray Data actor).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from PIL import Image


class BackendError(Exception):
    """A model cannot do what was asked (unknown mode, unsupported checkpoint)."""


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings shared by all backends. None means the mode's (or the checkpoint's) default.

    Greedy unless asked otherwise: `num_beams` above 1 is beam search; `do_sample`, or any of
    `temperature`, `top_p`, `top_k`, samples. `captions_per_image` above 1 needs one of the two, since
    greedy decoding writes the same caption every time (ValueError says so)."""

    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    num_beams: int = 1
    length_penalty: float | None = None
    """Beam search: above 1 favours longer captions, below 1 shorter ones (transformers' default is 1)."""
    repetition_penalty: float | None = None
    do_sample: bool = False
    """Sample instead of decoding greedily; set by itself when `temperature`, `top_p` or `top_k` is given."""
    temperature: float | None = None
    """Sampling: above 0; lower is closer to greedy (default 1)."""
    top_p: float | None = None
    """Sampling: draw from the smallest set of tokens whose probabilities add up to this (default 1: all)."""
    top_k: int | None = None
    """Sampling: draw from the k most likely tokens only (default 0: no cut)."""
    seed: int | None = None
    """Sampling: makes the captions repeatable. Each image draws from its own generator, seeded from this
    and the image's content, so an image gets the same captions whatever batch it is in."""
    captions_per_image: int = 1
    """Captions to write for each image: sampled (different draws) or, with beam search, the best beams."""
    general_threshold: float = 0.35
    """Taggers (WD14 / WD v3): the lowest probability a general tag is kept at (sd-scripts' default)."""
    character_threshold: float = 0.85
    """Taggers: the same for character tags."""
    character_tags_first: bool = False
    """Taggers: character tags before the general ones."""
    rating_tags: bool = False
    """Taggers: put the most likely rating tag (general, sensitive, questionable, explicit) first."""

    def __post_init__(self) -> None:
        # Naming a sampling knob is asking for sampling, as OpenAI's API and most captioning tools take it.
        if (self.temperature, self.top_p, self.top_k) != (None, None, None):
            object.__setattr__(self, "do_sample", True)
        self._check()

    def _check(self) -> None:
        """ValueError, in the flags' words, for settings no decoder can follow."""
        if self.num_beams < 1 or self.captions_per_image < 1:
            raise ValueError("--num-beams and --captions-per-image must be at least 1")
        if self.temperature is not None and self.temperature <= 0:
            raise ValueError("--temperature must be above 0 (leave it out for greedy decoding)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be above 0 and at most 1, not {self.top_p}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"--top-k must be 0 (no cut) or more, not {self.top_k}")
        if self.do_sample and self.num_beams > 1:
            raise ValueError(
                "sampling (--temperature, --top-p, --top-k) and beam search (--num-beams) do not mix: "
                "choose one"
            )
        if self.length_penalty is not None and self.num_beams == 1:
            raise ValueError("--length-penalty applies to beam search only: add --num-beams 2 or more")
        n = self.captions_per_image
        if n > 1 and not self.do_sample and self.num_beams < n:
            raise ValueError(
                f"--captions-per-image {n} needs {n} different captions, and greedy decoding writes the same "
                f"one every time: sample them (e.g. --temperature 0.8, with --seed to repeat them) or keep "
                f"the best beams (--num-beams {n} or more)"
            )

    def generate_kwargs(
        self,
        default_max_new_tokens: int,
        *,
        interrupt: Callable[[], bool] | None = None,
        inputs: Any = None,
    ) -> dict[str, Any]:
        """transformers `generate` kwargs. `interrupt`: checked after every decoding step; once it returns
        True generation stops (a server whose clients have gone, or that is shutting down). `inputs`: the
        prepared batch, whose images seed each row's sampling when `seed` is set (see `.sampling`).

        With `captions_per_image` N, `generate` returns N rows per image, image by image. A backend that
        merges these kwargs with its own logits processors must keep the ones here after its own."""
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens or default_max_new_tokens,
            "num_beams": self.num_beams,
            "do_sample": self.do_sample,
        }
        if self.captions_per_image > 1:
            kwargs["num_return_sequences"] = self.captions_per_image
        if self.length_penalty is not None:
            kwargs["length_penalty"] = self.length_penalty
        if self.do_sample:
            kwargs.update(self._sampling_kwargs(inputs))
        if self.min_new_tokens:
            kwargs["min_new_tokens"] = self.min_new_tokens
        if self.repetition_penalty:
            kwargs["repetition_penalty"] = self.repetition_penalty
        if interrupt is not None:
            kwargs["stopping_criteria"] = [_Interrupt(interrupt)]
        return kwargs

    def _sampling_kwargs(self, inputs: Any) -> dict[str, Any]:
        # top_k 0 unless asked: sample from the whole distribution (OpenAI's temperature / top_p have no
        # top_k), whatever top_k the checkpoint's generation config suggests.
        temperature, top_p, top_k = self.temperature or 1.0, self.top_p or 1.0, self.top_k or 0
        if self.seed is None:
            return {"temperature": temperature, "top_p": top_p, "top_k": top_k}
        from .sampling import SeededSampling, row_seeds

        # transformers samples every row from one global generator, so a row's draws would depend on the
        # rows beside it: each row draws from its own generator instead, and generate's own sampling only
        # takes the one token left standing (its warpers stay off).
        seeds = row_seeds(inputs, self.seed, self.captions_per_image)
        sampler = SeededSampling(
            seeds, temperature=temperature, top_p=top_p, top_k=top_k, fallback_seed=self.seed
        )
        return {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "logits_processor": [sampler]}


def decoder_positions(model: Any) -> int | None:
    """How many positions the model's text decoder has (its context), or None when it is not known."""
    config = getattr(model, "config", None)
    if not hasattr(config, "get_text_config"):
        return None
    text = config.get_text_config(decoder=True)
    positions = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
    return positions if isinstance(positions, int) and positions > 0 else None


_TOLD_SHORT: set[str] = set()  # models whose short decoder was already reported in this process


def fit_decoder(kwargs: dict[str, Any], model: Any, used: int, name: str) -> dict[str, Any]:
    """Cut `max_new_tokens` (and `min_new_tokens`) to what fits the decoder after the `used` positions
    it starts from. Decoders with learned positions (BART in Florence-2, BLIP, GPT-2) fail past their
    last one with "index out of range" on every image; a shorter caption is what the model can write.
    Said once per model."""
    positions = decoder_positions(model)
    # The decoder reads the `used` tokens and every new one but the last: used + new - 1 positions.
    room = max(1, positions - used + 1) if positions is not None else None
    if room is None or kwargs["max_new_tokens"] <= room:
        return kwargs
    if name not in _TOLD_SHORT:
        _TOLD_SHORT.add(name)
        log.warning(
            "%s's decoder holds %d positions, so captions stop at %d new tokens (not %d)",
            name,
            positions,
            room,
            kwargs["max_new_tokens"],
        )
    fitted = {**kwargs, "max_new_tokens": room}
    if fitted.get("min_new_tokens", 0) > room:
        fitted["min_new_tokens"] = room
    return fitted


class SuppressTokens:
    """A transformers logits processor that gives fixed token ids a score of -inf: what
    `generate(suppress_tokens=ids)` does, with the mask built once instead of at every step.

    transformers' own processor rebuilds a vocabulary-wide mask with `arange` and `isin` at every
    decoding step: for Florence-2's ~1,000 non-caption ids over 51k words, about 10x the cost of applying
    a kept mask on a CPU. Here the boolean mask is built on first use for each (vocabulary size, device)
    and kept, and a step is one `masked_fill`. A backend holds one for its lifetime and passes it as
    `logits_processor=[...]`, which `generate` runs where its `suppress_tokens` processor would run
    (after the length and forced-token processors, before sampling's warpers): outputs are the same.
    """

    def __init__(self, token_ids: Iterable[int]) -> None:
        self.token_ids = sorted(set(token_ids))
        self._masks: dict[tuple[int, str], Any] = {}

    def mask(self, vocab_size: int, device: Any) -> Any:
        """The boolean mask over a `vocab_size` vocabulary on `device`, built on first use."""
        key = (vocab_size, str(device))
        mask = self._masks.get(key)
        if mask is None:
            mask = self._masks[key] = self._build(vocab_size, device)
        return mask

    def _build(self, vocab_size: int, device: Any) -> Any:
        import torch

        mask = torch.zeros(vocab_size, dtype=torch.bool)
        # Ids past the scores' width are ignored, as `isin` over the vocabulary ignores them.
        ids = [i for i in self.token_ids if 0 <= i < vocab_size]
        mask[torch.tensor(ids, dtype=torch.long)] = True
        return mask.to(device)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        # Not in place: `generate` may keep the unprocessed logits (output_logits).
        return scores.masked_fill(self.mask(scores.shape[-1], scores.device), float("-inf"))


class _Interrupt:
    """A transformers stopping criterion that ends every row once `interrupt()` is True."""

    def __init__(self, interrupt: Callable[[], bool]) -> None:
        self.interrupt = interrupt

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        return torch.full((input_ids.shape[0],), self.interrupt(), dtype=torch.bool, device=input_ids.device)


@dataclass(frozen=True)
class Generation:
    """One caption and what it took, for servers that report OpenAI's `usage` and `finish_reason`."""

    text: str
    prompt_tokens: int
    """Tokens the model read before writing: its text input, with the image's placeholder tokens where
    the model has them, or for a captioner without text input the tokens its decoder starts from."""
    completion_tokens: int
    """Tokens generated, up to and with the end-of-sequence token."""
    truncated: bool
    """The caption ran into max_new_tokens before the model ended it."""


def generations(
    texts: Sequence[str],
    prompt_tokens: Sequence[int],
    new_tokens: Any,
    generation_config: Any,
    max_new_tokens: int,
) -> list[Generation]:
    """Generations from `generate`'s output past the prompt (`new_tokens`, one row per caption; rows that
    ended early are padded): a row counts up to and with its first end-of-sequence token, and a row
    without one ran into the length limit. `prompt_tokens` may be one per image where `generate` wrote
    several captions per image (`captions_per_image`, image by image)."""
    if texts and len(prompt_tokens) != len(texts):
        copies = len(texts) // max(1, len(prompt_tokens))
        prompt_tokens = [count for count in prompt_tokens for _ in range(copies)]
    eos = generation_config.eos_token_id
    eos_ids = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
    # BART-style decoders (Florence-2) are made to write the end token at the limit: one there is no sign
    # that the model ended the caption itself.
    forced_end = generation_config.forced_eos_token_id is not None
    results = []
    for text, prompt, row in zip(texts, prompt_tokens, new_tokens.tolist(), strict=True):
        end = next((i for i, token in enumerate(row) if token in eos_ids), None)
        count = len(row) if end is None else end + 1
        truncated = end is None or (forced_end and count >= max_new_tokens)
        results.append(Generation(text, int(prompt), count, truncated))
    return results


class Backend(Protocol):
    """What the pipeline needs from a captioning model."""

    name: str
    """Model id or path, for messages and the summary."""
    modes: tuple[str, ...]
    """Caption modes this checkpoint can do, e.g. ("tags", "caption", "detailed")."""
    tag_modes: frozenset[str]
    """The modes whose output is a comma-separated tag list."""
    default_batch_size: int
    image_side: int
    """The side the processor resizes to; images are decoded no larger than needed for it."""
    instructions: bool
    """True for chat models that caption from a free-text instruction (any style)."""

    def prepare(self, images: list[Image.Image], mode: str, prompt: str | list[str] | None = None) -> Any:
        """CPU-side preprocessing of one batch. Thread-safe. Instruction-following backends
        (`instructions = True`) take one prompt for the batch or one per image."""

    def generate(self, inputs: Any, settings: GenerationSettings) -> list[str]:
        """Run the model on prepared inputs; one raw caption per image, or `settings.captions_per_image`
        per image, image by image. A backend that cannot write several raises BackendError for N > 1."""

    # Optional (the local transformers backends have it; `loracap serve` uses it when present):
    # def generate_detailed(self, inputs, settings, interrupt=None) -> list[Generation]:
    #     """As `generate`, with token counts; `interrupt` as in `GenerationSettings.generate_kwargs`."""


ANY_MODE = "*"  # in `Backend.modes`: an instruction-following model, any caption style


def accepts(backend: Backend, mode: str) -> bool:
    """Whether `backend` can caption in `mode`: one of its modes, or any for an instruction model."""
    return ANY_MODE in backend.modes or mode in backend.modes


def check_mode(backend: Backend, mode: str, *, name: str | None = None) -> None:
    """BackendError unless `backend` can caption in `mode`; `name` names the model (default: its own)."""
    if not accepts(backend, mode):
        raise BackendError(
            f"{name or backend.name} cannot caption in mode {mode!r}; it can do: {', '.join(backend.modes)}"
        )


def caption_images(
    backend: Backend,
    images: list[Image.Image],
    mode: str,
    settings: GenerationSettings | None = None,
    prompt: str | list[str] | None = None,
) -> list[str]:
    """Caption decoded RGB images with a loaded backend: a plain function of its inputs. One text per
    image; with `settings.captions_per_image` N above 1, its N captions a line each.

    `prompt`: one for every image, or (instruction-following backends) one per image."""
    if not images:
        return []
    check_mode(backend, mode)
    settings = settings or GenerationSettings()
    inputs = backend.prepare(images, mode, prompt)
    return [join_alternatives(group) for group in per_image(backend.generate(inputs, settings), len(images))]


def per_image(captions: Sequence[str], images: int) -> list[list[str]]:
    """`generate`'s captions grouped by image (it writes `captions_per_image` per image, image by image).
    ValueError when they do not divide evenly: the backend broke its contract."""
    if images == 0 or len(captions) % images:
        raise ValueError(f"the model returned {len(captions)} captions for {images} images")
    n = len(captions) // images
    return [list(captions[i * n : (i + 1) * n]) for i in range(images)]


def join_alternatives(captions: Sequence[str]) -> str:
    """Several captions of one image as one text, a caption a line: how every layout loracap writes
    holds alternatives (OneTrainer and sd-scripts with --enable_wildcard pick one line at random). A line
    break inside one of several captions becomes a space, so that each line stays one caption."""
    if len(captions) == 1:
        return captions[0]
    return "\n".join(" ".join(caption.splitlines()) for caption in captions)
