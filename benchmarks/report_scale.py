"""`loracap report --no-clip` at 1k / 10k / 100k images: time per stage and peak memory.

Each dataset is N small generated images (64 px PNGs of smooth random colour fields, a few aspect ratios)
with sidecar captions that look like real LoRA captions: booru-style tag lists (a trigger, a subject tag,
5-25 tags drawn from a Zipf-distributed vocabulary of ~4,600 tags) or prose (2-4 sentences from a
vocabulary of ~6,000 words, also Zipf: a few hundred real words, then a long tail of made-up ones).
Duplicates are planted at known rates: 1% exact caption copies, 1% near copies (a tag or word dropped,
added or swapped, the order or letter case changed), 0.5% byte copies of an image and 0.5% re-encoded
(JPEG) copies. Datasets are built once and kept in the cache
folder, so 100k is written once.

The report runs as a separate process exactly as a user runs it (`python -m loracap report DIR --no-clip
--tokenizer TINY -v`) with the test kit's tiny CLIP tokenizer (a real CLIPTokenizerFast, smaller
vocabulary). Stage times come from report.json's "timing" and the write times from the -v log; peak
memory is the child's own ru_maxrss (os.wait4), not the maximum over every child so far.

    python benchmarks/report_scale.py --sizes 1000 10000 100000 [--style tags|prose] [--cache DIR]

prints a Markdown table (one row per size) to paste into RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

DEFAULT_CACHE = Path(os.environ.get("LORACAP_BENCH_CACHE", "/tmp/loracap-report-scale"))
TRIGGER = "ohwx"

# --- captions -----------------------------------------------------------------------------------------


def _split(words: str) -> list[str]:
    return words.split()


_ADJECTIVES = _split(
    "red blue green black white yellow purple pink orange brown grey silver golden dark light long short "
    "open closed striped plaid checkered floral wet torn frilled sleeveless wide narrow round tiny huge "
    "shiny matte wooden metal glass leather denim lace velvet fur cotton knitted hooded pleated high-waist"
)
_NOUNS = _split(
    "hair eyes dress shirt skirt jacket coat hat cap boots shoes gloves scarf necklace earrings ribbon bow "
    "sky background wall floor window door table chair bed sofa lamp tree flower grass water sea beach "
    "mountain cloud building street car bicycle train cup bottle book phone bag umbrella sword shield "
    "armor helmet cape belt sash kimono uniform apron sweater hoodie jeans shorts socks stockings sandals "
    "wings horns tail ears halo crown tiara glasses mask choker bracelet ring tattoo scar freckles lips "
    "teeth tongue hands fingers nails arms legs feet shoulders neck collarbone back stomach navel hips "
    "thighs knees moon sun stars rain snow fire smoke light shadow reflection mirror curtain pillow blanket "
    "fence bridge river forest field garden room kitchen classroom office library shop cafe stage"
)
_SINGLES = _split(
    "solo smile blush looking-at-viewer open-mouth closed-eyes standing sitting lying kneeling walking "
    "running from-above from-below from-side upper-body full-body cowboy-shot portrait close-up outdoors "
    "indoors day night sunset sunrise depth-of-field blurry-background bokeh lens-flare chromatic-aberration "
    "highres absurdres sketch lineart monochrome greyscale watercolor realistic photorealistic anime-style "
    "simple-background white-background gradient-background holding pointing waving crossed-arms "
    "hand-on-hip head-tilt looking-back looking-away parted-lips grin frown tears sweat"
)
_SUBJECTS = ("1girl", "1boy", "2girls", "2boys", "multiple girls", "no humans", "1other")

_PROSE_WORDS = {
    "subject": _split("woman man girl boy person child dog cat bird horse figure couple group knight robot"),
    "verb": _split(
        "stands sits walks runs leans kneels smiles looks poses rests waits reads holds carries wears "
        "watches gazes dances plays laughs talks"
    ),
    "place": _split(
        "field beach street forest room kitchen cafe garden park bridge rooftop studio library market "
        "station harbor desert meadow alley courtyard balcony hallway classroom office stage lake hill"
    ),
    "light": _split(
        "soft warm cold harsh golden dim bright diffuse dramatic natural neon evening morning overcast "
        "backlit moody cinematic"
    ),
    "style": _split(
        "photograph painting illustration render sketch portrait snapshot still drawing watercolor "
        "photo artwork"
    ),
}


def _zipf_weights(n: int, s: float = 1.05) -> np.ndarray:
    weights = 1.0 / np.arange(1, n + 1) ** s
    return weights / weights.sum()


_SYLLABLES = _split("ka ri to mu sen lo va de pan qui ros tel bir nath fo gu lem sa ver chi dor ul ne ba")


def _pseudo_words(n: int, rng: np.random.Generator) -> list[str]:
    """n distinct made-up words of 2-4 syllables: the long tail of specific words real captions have
    ("saxophone", "lighthouse"), which a word list of a few hundred cannot give."""
    words: dict[str, None] = {}
    while len(words) < n:
        k = int(rng.integers(2, 5))
        words["".join(_SYLLABLES[int(i)] for i in rng.integers(len(_SYLLABLES), size=k))] = None
    return list(words)


class CaptionMaker:
    """Deterministic realistic captions: `tags_caption(rng)` a booru tag list, `prose_caption(rng)` a few
    sentences. `prose_vocab` made-up words extend the prose vocabulary past the ~250 real ones; 0 gives a
    deliberately narrow vocabulary (every caption from the same few hundred words), the worst case for
    the near-duplicate search."""

    def __init__(self, seed: int = 0, prose_vocab: int = 6000) -> None:
        rng = np.random.default_rng(seed)
        # Tags by rank: the generic ones ("solo", "smile", "outdoors") most common, then the ~4,500
        # "adjective noun" tags in a random order.
        pairs = [f"{a} {n}" for a in _ADJECTIVES for n in _NOUNS]
        self.tags = [s.replace("-", " ") for s in _SINGLES] + [pairs[i] for i in rng.permutation(len(pairs))]
        self.tag_p = _zipf_weights(len(self.tags), 0.95)
        # Prose vocabulary, Zipf-ranked: the real words first (the common ones), then the made-up tail.
        real = sorted(set(_ADJECTIVES) | set(_NOUNS))
        self.words = [real[i] for i in rng.permutation(len(real))] + _pseudo_words(prose_vocab, rng)
        self.word_p = _zipf_weights(len(self.words), 1.0 if prose_vocab else 0.9)
        self.slots = {k: (v, _zipf_weights(len(v), 0.8)) for k, v in _PROSE_WORDS.items()}

    def _pick(self, rng: np.random.Generator, slot: str) -> str:
        values, p = self.slots[slot]
        return values[rng.choice(len(values), p=p)]

    def _words(self, rng: np.random.Generator, k: int) -> list[str]:
        return [self.words[i] for i in rng.choice(len(self.words), size=k, p=self.word_p)]

    def tags_caption(self, rng: np.random.Generator) -> str:
        k = int(rng.integers(5, 26))
        drawn = rng.choice(len(self.tags), size=3 * k, p=self.tag_p)
        chosen = list(dict.fromkeys(int(i) for i in drawn))[:k]
        subject = _SUBJECTS[min(int(rng.geometric(0.55)) - 1, len(_SUBJECTS) - 1)]
        return ", ".join([TRIGGER, subject, *(self.tags[i] for i in chosen)])

    def prose_caption(self, rng: np.random.Generator) -> str:
        a, b = self._words(rng, 2)
        sentences = [
            f"A {self._pick(rng, 'style')} of {TRIGGER}, a {a} {self._pick(rng, 'subject')} who "
            f"{self._pick(rng, 'verb')} in a {b} {self._pick(rng, 'place')}."
        ]
        for _ in range(int(rng.integers(1, 4))):
            w = self._words(rng, int(rng.integers(4, 9)))
            sentences.append(
                f"The {w[0]} {w[1]} {self._pick(rng, 'verb')} near the {' '.join(w[2:-1])} {w[-1]}, "
                f"under {self._pick(rng, 'light')} light."
            )
        return " ".join(sentences)


def _near_copy(caption: str, rng: np.random.Generator, maker: CaptionMaker, tags: bool) -> str:
    """A caption a near-duplicate check should catch: one unit dropped/added/swapped, or reordered/recased."""
    units = [u.strip() for u in caption.split(",")] if tags else caption.split(" ")
    kind = int(rng.integers(4))
    if kind == 0 and len(units) > 8:
        del units[int(rng.integers(2, len(units)))]
    elif kind == 1:
        extra = maker.tags[int(rng.integers(len(maker.tags)))] if tags else maker._words(rng, 1)[0]
        units.insert(int(rng.integers(1, len(units))), extra)
    elif kind == 2:
        units[-1 if tags else len(units) // 2] = units[-1 if tags else len(units) // 2].upper()
    else:
        head, tail = units[:2], units[2:]
        rng.shuffle(tail) if tags else None
        units = head + tail
    return ", ".join(units) if tags else " ".join(units)


def make_captions(n: int, style: str, seed: int = 0, prose_vocab: int = 6000) -> list[str]:
    """n captions with ~1% exact and ~1% near copies of earlier ones (copies sit at random later places)."""
    rng = np.random.default_rng(seed)
    maker = CaptionMaker(seed, prose_vocab)
    tags = style == "tags"
    captions: list[str] = []
    for i in range(n):
        roll = rng.random()
        if i > 10 and roll < 0.01:
            captions.append(captions[int(rng.integers(i))])
        elif i > 10 and roll < 0.02:
            captions.append(_near_copy(captions[int(rng.integers(i))], rng, maker, tags))
        else:
            captions.append(maker.tags_caption(rng) if tags else maker.prose_caption(rng))
    return captions


# --- images -------------------------------------------------------------------------------------------

_SIZES = ((64, 64), (64, 48), (48, 64), (80, 45), (45, 80), (72, 54))


def _image(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    # A 6x6 colour grid blown up smoothly: distinct phashes, compresses fast, decodes like a photo thumbnail.
    grid = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    return Image.fromarray(grid).resize(size, Image.Resampling.BICUBIC)


def build_dataset(folder: Path, n: int, style: str, prose_vocab: int = 6000, seed: int = 0) -> Path:
    """Write (or find, when a previous run finished it) the dataset: 1,000 images per subfolder."""
    done = folder / "complete.json"
    if done.exists():
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    started = time.perf_counter()
    rng = np.random.default_rng(seed + 1)
    captions = make_captions(n, style, seed, prose_vocab)
    written: list[Path] = []
    for i, caption in enumerate(captions):
        sub = folder / f"{i // 1000:03d}"
        if i % 1000 == 0:
            sub.mkdir(parents=True)
        roll = rng.random()
        if written and roll < 0.005:  # byte copy of an earlier image
            source = written[int(rng.integers(len(written)))]
            path = sub / f"{i:06d}{source.suffix}"
            shutil.copyfile(source, path)
        elif written and roll < 0.01:  # the same picture re-encoded as JPEG: a phash near-duplicate
            source = written[int(rng.integers(len(written)))]
            path = sub / f"{i:06d}.jpg"
            with Image.open(source) as im:
                im.convert("RGB").save(path, quality=85)
        else:
            path = sub / f"{i:06d}.png"
            _image(rng, _SIZES[int(rng.integers(len(_SIZES)))]).save(path, compress_level=1)
        written.append(path)
        path.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
    done.write_text(json.dumps({"n": n, "style": style, "seconds": time.perf_counter() - started}))
    return folder


# --- the run ------------------------------------------------------------------------------------------


def tiny_tokenizer(cache: Path) -> Path:
    folder = cache / "tinyclip"  # the test kit's CLIP: a real CLIPTokenizerFast with a smaller vocabulary
    if not (folder / "tokenizer.json").exists():
        subprocess.run([sys.executable, "-m", "loracap.testing", "clip", str(folder)], check=True)
    return folder


_WROTE = re.compile(r"wrote (report\.\w+) in ([\d.]+) s")


def run_report(dataset: Path, tokenizer: Path, out: Path, log: Path) -> dict[str, object]:
    """One `loracap report` process: wall time, peak RSS, report.json's timing and the logged write times."""
    cmd = [sys.executable, "-m", "loracap", "report", str(dataset), "--no-clip", "--tokenizer",
           str(tokenizer), "--out", str(out), "--trigger", TRIGGER, "--quiet", "-v"]  # fmt: skip
    started = time.perf_counter()
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
        # wait4 gives this child's own rusage; RUSAGE_CHILDREN would be the largest of all children so far.
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    text = log.read_text(encoding="utf-8", errors="replace")
    if proc.returncode not in (0, 1):  # 1: a --fail-on rule broke (none are given, but it is a report)
        raise RuntimeError(f"report failed ({proc.returncode}):\n{text[-3000:]}")
    data = json.loads((out / "report.json").read_text(encoding="utf-8"))
    return {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_mib": usage.ru_maxrss / 1024,  # KiB on Linux
        "timing": data["timing"],
        "writes": {name: float(seconds) for name, seconds in _WROTE.findall(text)},
        "html_mib": (out / "report.html").stat().st_size / 2**20,
        "json_mib": (out / "report.json").stat().st_size / 2**20,
        "checks": data["checks"],
    }


def _row(n: int, style: str, r: dict) -> str:
    t, text, images = r["timing"], r["timing"]["text"], r["timing"]["images"]
    cells = [
        f"{n:,}", style, f"{r['wall_s']:.1f}", f"{r['cpu_s']:.1f}", f"{r['peak_rss_mib']:.0f}",
        f"{t['read_s']:.1f}", f"{t['tokenizer_load_s']:.1f}",
        f"{text['tokens_s']:.1f}", f"{text['duplicates_s']:.1f}", f"{text['tags_s']:.1f}",
        f"{text['sensitive_s']:.1f}", f"{text['trigger_s']:.1f}",
        f"{images['scan_s']:.1f}", f"{images['duplicates_s']:.2f}", f"{images['sizes_s']:.1f}",
        f"{t['document_s']:.1f}", f"{r['writes'].get('report.json', float('nan')):.1f}",
        f"{r['writes'].get('report.html', float('nan')):.1f}",
        f"{r['json_mib']:.1f} / {r['html_mib']:.1f}",
        f"{r['checks']['duplicate-caption']} / {r['checks']['near-duplicate-caption']} / "
        f"{r['checks']['duplicate-image']}",
    ]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


HEADER = (
    "| images | captions | wall s | CPU s | peak RSS MiB | read | tokenizer load | tokens | near-dup "
    "captions | tags | sensitive | trigger | image scan | image dups | sizes/buckets | document | "
    "write json | write html | json / html MiB | caption dups / near / image groups |\n"
    "|" + "---|" * 20
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--style", choices=("tags", "prose"), default="tags")
    parser.add_argument("--prose-vocab", type=int, default=6000, help="made-up words past the real ones")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where datasets are kept")
    parser.add_argument("--json", type=Path, help="also write every number here")
    args = parser.parse_args(argv)
    args.cache.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_tokenizer(args.cache)
    rows, results = [], {}
    for n in args.sizes:
        vocab = f"-v{args.prose_vocab}" if args.style == "prose" else ""
        folder = build_dataset(args.cache / f"{args.style}{vocab}-{n}", n, args.style, args.prose_vocab)
        out = args.cache / "out" / folder.name
        out.mkdir(parents=True, exist_ok=True)
        result = run_report(folder, tokenizer, out, out.parent / f"{folder.name}.log")
        results[n] = result
        rows.append(_row(n, args.style, result))
        print(rows[-1], flush=True)
    print(HEADER)
    print("\n".join(rows))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
