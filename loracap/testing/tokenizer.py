"""Tokenizers trained locally, in milliseconds, for the test models.

No hub is reachable where loracap's tests run, so every tokenizer a test model needs is trained here with the
`tokenizers` library on a few hundred built-in caption-like lines. Each builder mirrors the pipeline of the
real tokenizer family (BART and GPT-2 byte-level BPE, BERT WordPiece for BLIP) and is wrapped in the same
transformers class the hub checkpoint names in its tokenizer_config.json, so the saved files reload through
`AutoTokenizer` / the model's processor and behave like the published ones: the same special tokens at the
same kind of ids, the same pre-tokenizer, post-processor and decoder.

Nothing here imports torch or transformers at module import time: `import loracap.testing` must stay light.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover - typing only
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerBase

# Florence-2's remote-code processor (processing_florence2.py in microsoft/Florence-2-*) adds exactly these
# 1024 tokens to the BART tokenizer at load time, in this order; the misspelling "desciption" is the real one.
# They are written out here in full, not derived from the native layout, because the original-layout builder
# is the independent reference that loracap's layout converter is tested against.
FLORENCE2_TASK_TOKENS_HEAD: tuple[str, ...] = ("<od>", "</od>", "<ocr>", "</ocr>")
FLORENCE2_LOC_TOKENS: tuple[str, ...] = tuple(f"<loc_{i}>" for i in range(1000))
FLORENCE2_TASK_TOKENS_TAIL: tuple[str, ...] = (
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
)
FLORENCE2_ADDED_TOKENS: tuple[str, ...] = (
    FLORENCE2_TASK_TOKENS_HEAD + FLORENCE2_LOC_TOKENS + FLORENCE2_TASK_TOKENS_TAIL
)
FLORENCE2_IMAGE_TOKEN = "<image>"

# BART's four specials come first with BART's ids (<s>=0, <pad>=1, </s>=2, <unk>=3). `<mask>` is appended
# after the merges, where BART has it (50264 in the real vocab): `BartTokenizer` (an alias of
# `RobertaTokenizer` in transformers 5) adds a `<mask>` token on load when the vocab lacks one, which would
# silently grow `len(tokenizer)` and shift every id added after it.
BART_SPECIALS: tuple[str, ...] = ("<s>", "<pad>", "</s>", "<unk>")
BART_MASK = "<mask>"
# BERT's specials (BLIP's text side is bert-base-uncased). BLIP appends `[DEC]` after the vocab as its bos
# token.
BLIP_SPECIALS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
BLIP_DEC = "[DEC]"
GPT2_EOT = "<|endoftext|>"

_STYLES = (
    "a photo of",
    "a close-up photograph of",
    "a digital painting of",
    "an anime illustration of",
    "a watercolor sketch of",
    "a 3d render of",
)
_SUBJECTS = (
    "a woman",
    "a man",
    "a girl",
    "a boy",
    "an old man",
    "a young woman",
    "a dog",
    "a cat",
    "a red car",
    "a bicycle",
    "a wooden house",
    "a mountain lake",
    "a bowl of fruit",
    "a knight in armor",
    "a robot",
    "two children",
)
_ATTRIBUTES = (
    "with long black hair",
    "wearing a blue dress",
    "in a leather jacket",
    "with a red umbrella",
    "holding a cup of coffee",
    "smiling at the camera",
    "with green eyes",
    "covered in snow",
)
_SETTINGS = (
    "standing in a field of flowers",
    "sitting on a bench in the park",
    "on a busy city street at night",
    "in front of a white wall",
    "on the beach at sunset",
    "inside a dimly lit room",
    "next to a window",
    "under a cloudy sky",
)
_TAGS = (
    "1girl, solo, long hair, looking at viewer, smile, outdoors",
    "1boy, solo, short hair, jacket, city, night, neon lights",
    "no humans, scenery, mountain, lake, sky, cloud, tree",
    "cat, animal focus, sitting, indoors, window, sunlight",
    "masterpiece, best quality, detailed background, soft lighting",
    "dog, grass, running, blurry background, depth of field",
)
_PROMPTS = (
    "What does the image describe?",
    "Describe in detail what is shown in the image.",
    "Describe with a paragraph what is shown in the image.",
    "What is the text in the image?",
    "Locate the objects with category name in the image.",
    "The image shows",
    "The photo is taken from a low angle and the lighting is warm.",
)


def caption_corpus() -> list[str]:
    """A deterministic list of a few hundred caption-, tag- and prompt-like lines.

    Built from a fixed grammar rather than shipped as a data file so the package stays small and the tokenizer
    (and therefore every test model) is byte-identical on every machine.
    """
    lines: list[str] = []
    combos = itertools.product(_STYLES, _SUBJECTS, _ATTRIBUTES, _SETTINGS)
    # Every 16th of the 6144 combinations: ~380 varied lines, enough for stable merges, ~10 ms to train.
    for k, (style, subject, attribute, setting) in enumerate(combos):
        if k % 16 == 0:
            lines.append(f"{style} {subject} {attribute} {setting}.")
    lines.extend(_TAGS)
    lines.extend(_PROMPTS)
    lines.extend(s.capitalize() + "." for s in _SUBJECTS)
    return lines


def train_byte_level_bpe(special_tokens: Sequence[str], *, vocab_size: int = 600) -> Tokenizer:
    """Train a byte-level BPE (the BART / GPT-2 / RoBERTa family) on the built-in corpus.

    `special_tokens` go to the trainer first so they get ids 0..n-1. The full 256-byte alphabet is seeded so
    any input text encodes without `<unk>`, as with the real byte-level vocabularies. The pre-tokenizer and
    decoder are the ones `RobertaTokenizer` / `GPT2Tokenizer` rebuild on reload
    (`ByteLevel(add_prefix_space=False)`), so the saved tokenizer.json and the reloaded tokenizer agree.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(caption_corpus(), trainer=trainer)
    return tok


def build_bart_tokenizer(
    added_tokens: Sequence[str] = (), *, image_token: bool = False
) -> PreTrainedTokenizerBase:
    """A BART tokenizer: `<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3, BPE merges, `<mask>`, then `added_tokens`.

    For the native Florence-2 layout `added_tokens` is `FLORENCE2_ADDED_TOKENS` and `image_token=True` appends
    `<image>` last, registered as the `image_token` extra special token that `Florence2Processor` reads
    (`tokenizer.image_token` / `tokenizer.image_token_id`). The original remote-code layout ships the bare
    BART tokenizer: its processor adds the 1024 task/location tokens at load time and has no `<image>` token.

    The added tokens are special (never split by BPE, dropped by `decode(skip_special_tokens=True)`), like the
    remote processor's `additional_special_tokens`. The result is a `BartTokenizer`, so AutoTokenizer reloads
    it without remote code.
    """
    from tokenizers import processors
    from transformers import BartTokenizer

    tok = train_byte_level_bpe(BART_SPECIALS)
    tok.add_special_tokens([BART_MASK, *added_tokens, *([FLORENCE2_IMAGE_TOKEN] if image_token else [])])
    tok.post_processor = processors.RobertaProcessing(
        (BART_SPECIALS[2], tok.token_to_id(BART_SPECIALS[2])),
        (BART_SPECIALS[0], tok.token_to_id(BART_SPECIALS[0])),
        trim_offsets=True,
        add_prefix_space=False,
    )
    kwargs: dict = {}
    if image_token:
        # `<image>` is already in `tok` (so it keeps the last id); naming it here only registers the
        # attribute.
        kwargs["extra_special_tokens"] = {"image_token": FLORENCE2_IMAGE_TOKEN}
    fast = BartTokenizer(
        tokenizer_object=tok,
        bos_token="<s>",
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        sep_token="</s>",
        cls_token="<s>",
        mask_token=BART_MASK,
        model_max_length=1024,
        **kwargs,
    )
    if added_tokens:
        # Already in the vocab with their final ids; this lists them in `extra_special_tokens` as the remote
        # processor's `additional_special_tokens` did.
        fast.add_special_tokens(
            {"extra_special_tokens": list(added_tokens)}, replace_extra_special_tokens=False
        )
    return fast


def build_blip_tokenizer(*, vocab_size: int = 600) -> PreTrainedTokenizerBase:
    """A BERT-uncased WordPiece tokenizer with BLIP's `[DEC]` bos token appended after the vocab.

    BLIP's text side is bert-base-uncased, so this is WordPiece rather than byte-level BPE: a backend that
    post-processes BLIP output (lower-casing, `##` joins, spaces around punctuation) sees what the real model
    produces. `[PAD]`=0, `[UNK]`=1, `[CLS]`=2, `[SEP]`=3, `[MASK]`=4, `[DEC]` last, as the real BLIP vocab
    appends it (id 30522). The processor tokenizes a prompt as `[CLS] ... [SEP]`; BLIP's `generate` swaps
    `[CLS]` for `[DEC]` and drops the trailing `[SEP]`, which is why `[SEP]` doubles as the eos token.

    The vocab is counted here rather than by `tokenizers.trainers.WordPieceTrainer`, whose result differs
    from process to process (it breaks frequency ties in hash-map order), which would make "same seed, same
    model" false across runs. It holds the printable ASCII characters, each also as a `##` continuation
    piece (so any ASCII word encodes without `[UNK]`), then the corpus words, most frequent first, counted
    with BERT's own normalizer and pre-tokenizer.
    """
    import string
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import BertTokenizer

    normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for line in caption_corpus():
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line)))
    alphabet = sorted(set(string.printable.lower()) - set(string.whitespace))
    vocab_list = [*BLIP_SPECIALS, *alphabet, *(f"##{c}" for c in alphabet)]
    seen = set(vocab_list)
    for word, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(vocab_list) >= vocab_size:
            break
        if word not in seen:
            vocab_list.append(word)
            seen.add(word)

    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab_list)}, unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens([*BLIP_SPECIALS, BLIP_DEC])
    return BertTokenizer(
        tokenizer_object=tok,
        do_lower_case=True,
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
        bos_token=BLIP_DEC,
        model_max_length=512,
    )


def build_gpt2_tokenizer() -> PreTrainedTokenizerBase:
    """A GPT-2 byte-level BPE with `<|endoftext|>` (id 0) as its bos, eos, unk and pad token.

    ViT-GPT2 captioners (nlpconnect/vit-gpt2-image-captioning) start decoding from `<|endoftext|>`, stop on it
    and pad with it, so one token serves all four roles, as in the real GPT-2 vocab.
    """
    from transformers import GPT2Tokenizer

    tok = train_byte_level_bpe((GPT2_EOT,))
    return GPT2Tokenizer(
        tokenizer_object=tok,
        unk_token=GPT2_EOT,
        bos_token=GPT2_EOT,
        eos_token=GPT2_EOT,
        pad_token=GPT2_EOT,
        model_max_length=1024,
    )
