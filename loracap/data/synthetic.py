"""Synthetic compositional scenes with exact captions, for benchmarking small captioners on CPU.

A scene is a group of one to three identical objects on a plain or gradient background:

    shape       circle, square, triangle, star, cross
    colour      red, green, blue, yellow, purple, orange
    size        small, large
    count       1, 2, 3
    position    left, right, top, bottom, center (where the group sits)
    texture     solid, striped, dotted
    background  white, black, grey, blue, gradient (light grey at the top to dark grey at the bottom)

An object is never the colour of its background (no blue on blue). Every caption follows one template:

    {a | two | three} {size} {colour} {texture} {shape | shapes} {where} on a {background} background

    where: on the left | on the right | at the top | at the bottom | in the center
    "a small green solid square on the left on a white background"
    "two large red striped circles at the top on a blue background"
    "three small yellow dotted crosses in the center on a gradient background"

Held-out compositions: the test split is every scene that pairs a shape with a reserved colour or a texture
with a reserved shape (RESERVED_SHAPE_COLOURS, RESERVED_TEXTURE_SHAPES). Each single value still occurs
in train; only those pairings never do, so a captioner scores well on test only if it composes attributes
instead of memorising combinations. val is a fixed pseudo-random 10% of the other compositions.

    python -m loracap.data.synthetic DIR --n 1000 [--seed 0] [--size 64] [--test-share 0.1]

writes DIR/00000.png with its caption in DIR/00000.txt (as `loracap caption` writes sidecars), ... and
DIR/splits.json ({"train": ["00003.png", ...], "val": [...], "test": [...]}), which `loracap train` keeps
as the dataset's own split.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from loracap.data.splits import DATASET_SPLITS_FILE, SPLITS  # the names `loracap train` reads back
from loracap.dataset import SidecarStore
from loracap.files import atomic_write_bytes, atomic_write_text

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "COUNTS",
    "DEFAULT_SHARES",
    "MIN_SIZE",
    "PALETTE",
    "POSITIONS",
    "RESERVED_SHAPE_COLOURS",
    "RESERVED_TEXTURE_SHAPES",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "TEXTURES",
    "Scene",
    "all_scenes",
    "caption",
    "main",
    "render",
    "sample_scenes",
    "split_of",
    "write_dataset",
]

SHAPES = ("circle", "square", "triangle", "star", "cross")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES = ("small", "large")
COUNTS = (1, 2, 3)
POSITIONS = ("left", "right", "top", "bottom", "center")
TEXTURES = ("solid", "striped", "dotted")
BACKGROUNDS = ("white", "black", "grey", "blue", "gradient")

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 80, 220),
    "yellow": (245, 210, 20),
    "purple": (140, 50, 180),
    "orange": (245, 130, 20),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "grey": (128, 128, 128),
}
_GRADIENT = (230, 60)  # grey level at the top and at the bottom: colourless, so it clashes with no object

# 5 of the 30 (shape, colour) pairs and 3 of the 15 (texture, shape) pairs, about 17% and 20%. A fixed
# list rather than a hash so it can be read here: each shape loses one colour, each texture one shape, and
# no value loses more than one partner, so every value keeps most of its combinations in training.
RESERVED_SHAPE_COLOURS = frozenset(
    {("circle", "red"), ("square", "green"), ("triangle", "blue"), ("star", "yellow"), ("cross", "purple")}
)
RESERVED_TEXTURE_SHAPES = frozenset({("striped", "circle"), ("dotted", "triangle"), ("solid", "star")})
_VAL_SHARE = 0.1
_VAL_SALT = "loracap-synthetic-val-v1"  # changing it reshuffles which compositions are val

DEFAULT_SHARES: Mapping[str, float] = {"train": 0.8, "val": 0.1, "test": 0.1}
MIN_SIZE = 32  # a small object is then about 5 px across; any smaller and its shape no longer reads

_NUMBERS = {1: "a", 2: "two", 3: "three"}
_PLURALS = {"cross": "crosses"}
_WHERE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}

# Object side as a share of the canvas side, jittered by +-6%. Each object gets its own slot a third of
# the canvas wide and high, less _PAD on every side: 0.293, so even the largest object (0.265) fits with
# room to move, and neighbours keep at least 2 px apart at 64 px.
_DIAMETER = {"small": 0.15, "large": 0.25}
_JITTER = 0.06
_PAD = 0.02


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: str
    count: int
    position: str
    texture: str
    background: str

    def __post_init__(self) -> None:
        allowed = {
            "shape": SHAPES,
            "colour": COLOURS,
            "size": SIZES,
            "count": COUNTS,
            "position": POSITIONS,
            "texture": TEXTURES,
            "background": BACKGROUNDS,
        }
        for name, values in allowed.items():
            if getattr(self, name) not in values:
                raise ValueError(f"{name} must be one of {values}, not {getattr(self, name)!r}")
        if self.colour == self.background:
            raise ValueError(f"a {self.colour} object on a {self.background} background would be invisible")


def caption(scene: Scene) -> str:
    """The exact caption (see the module docstring for the template)."""
    noun = _PLURALS.get(scene.shape, scene.shape + "s") if scene.count > 1 else scene.shape
    return (
        f"{_NUMBERS[scene.count]} {scene.size} {scene.colour} {scene.texture} {noun} "
        f"{_WHERE[scene.position]} on a {scene.background} background"
    )


def split_of(scene: Scene) -> str:
    """The split a composition belongs to: "test" when it has a reserved pair, else "val" for a fixed 10%
    of the rest, else "train". Depends on nothing but the composition."""
    if (scene.shape, scene.colour) in RESERVED_SHAPE_COLOURS:
        return "test"
    if (scene.texture, scene.shape) in RESERVED_TEXTURE_SHAPES:
        return "test"
    # A salted hash, not Python's hash(): the same composition must be val in every process and version.
    return "val" if _unit_hash(_VAL_SALT, caption(scene)) < _VAL_SHARE else "train"


@lru_cache(maxsize=1)
def all_scenes() -> tuple[Scene, ...]:
    """Every valid composition, in a fixed order."""
    combos = itertools.product(SHAPES, COLOURS, SIZES, COUNTS, POSITIONS, TEXTURES, BACKGROUNDS)
    return tuple(Scene(*combo) for combo in combos if combo[1] != combo[6])


@lru_cache(maxsize=len(SPLITS))
def _compositions(split: str) -> tuple[Scene, ...]:
    return tuple(scene for scene in all_scenes() if split_of(scene) == split)


def sample_scenes(n: int, *, split: str, seed: int) -> list[Scene]:
    """`n` scenes of `split`, the same for the same seed.

    All distinct while the split has enough compositions (thousands each); beyond that each composition
    repeats as evenly as possible, and the render jitter still makes every image different.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, not {n}")
    pool = _compositions(split)
    rng = np.random.default_rng(seed)
    scenes: list[Scene] = []
    while len(scenes) < n:
        scenes.extend(pool[i] for i in rng.permutation(len(pool))[: n - len(scenes)])
    return scenes


# --- rendering ----------------------------------------------------------------------------------------


def render(scene: Scene, size: int = 64, rng: np.random.Generator | int | None = None) -> Image.Image:
    """A `size` x `size` RGB image of `scene`.

    `rng` jitters each object's size and place within its slot; None seeds it from the composition, so a
    scene always renders the same way unless a generator (or seed) is given. Objects never overlap or
    touch, never leave the canvas, and are drawn without anti-aliasing: every object pixel is exactly
    PALETTE[scene.colour] or, inside striped and dotted objects, black or white ink.
    """
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE} px, not {size}")
    rng = np.random.default_rng(rng if rng is not None else _unit_seed(caption(scene)))
    pixels = _background(scene.background, size).copy()
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    boxes = _layout(scene, size, rng)
    for box in boxes:
        _draw_shape(draw, scene.shape, *box)
    pixels[np.asarray(mask) > 0] = PALETTE[scene.colour]
    if scene.texture != "solid":
        # The pattern stays off a rim of the object's own colour, so the silhouette holds even where the
        # ink matches the background (white stripes on a white background).
        rim = max(1, round(min(side for _, _, side in boxes) / 24))
        core = np.asarray(mask.filter(ImageFilter.MinFilter(2 * rim + 1))) > 0
        for left, top, side in boxes:
            where = (slice(top, top + side), slice(left, left + side))
            pixels[where][core[where] & _pattern(scene.texture, side)] = _ink(scene.colour)
    return Image.fromarray(pixels, "RGB")


def _slots(position: str, count: int) -> list[tuple[float, float, float, float]]:
    """One (x0, y0, x1, y1) box per object, in canvas fractions, each a third of the canvas on a side.

    The boxes are disjoint and inside the canvas, so objects placed inside them cannot overlap or leave it.
    Along the group's line the boxes are centred: one takes the middle third, two the middle two thirds.
    """
    third = 1 / 3
    along = [0.5 - count * third / 2 + i * third for i in range(count)]
    if position in ("left", "right"):
        x = 0.0 if position == "left" else 2 * third
        return [(x, a, x + third, a + third) for a in along]
    if position in ("top", "bottom"):
        y = 0.0 if position == "top" else 2 * third
        return [(a, y, a + third, y + third) for a in along]
    if count == 3:  # center: a row of three would reach the left and right edges; a triangle stays central
        return [(third, 1 / 6, 2 * third, 0.5), (1 / 6, 0.5, 0.5, 5 / 6), (0.5, 0.5, 5 / 6, 5 / 6)]
    return [(a, third, a + third, 2 * third) for a in along]


def _layout(scene: Scene, size: int, rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """(left, top, side) in pixels of each object's square box."""
    pad = _PAD * size
    boxes = []
    for fx0, fy0, fx1, fy1 in _slots(scene.position, scene.count):
        # Whole pixels strictly inside the padded slot: x0 <= left and left + side <= x1. Neighbouring slots
        # are 2 * pad apart, so their objects keep at least a pixel between them, and the canvas edge too.
        x0, y0 = math.ceil(fx0 * size + pad), math.ceil(fy0 * size + pad)
        x1, y1 = math.floor(fx1 * size - pad), math.floor(fy1 * size - pad)
        side = _DIAMETER[scene.size] * size * rng.uniform(1 - _JITTER, 1 + _JITTER)
        side = min(int(side), x1 - x0, y1 - y0)
        left = int(rng.integers(x0, x1 - side + 1))
        top = int(rng.integers(y0, y1 - side + 1))
        boxes.append((left, top, side))
    return boxes


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, left: int, top: int, side: int) -> None:
    right, bottom = left + side - 1, top + side - 1
    if shape == "circle":
        draw.ellipse((left, top, right, bottom), fill=255)
    elif shape == "square":
        draw.rectangle((left, top, right, bottom), fill=255)
    elif shape == "triangle":
        draw.polygon([(left + (side - 1) / 2, top), (right, bottom), (left, bottom)], fill=255)
    elif shape == "star":
        r = (side - 1) / 2
        # A five-pointed star is 1.81 r tall: shifting it down by 0.095 r centres it in the box. Inner
        # corners at half the radius keep it fat enough to read as a star at 10 px.
        cx, cy = left + r, top + r + 0.095 * r
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else 0.5 * r
            points.append((cx + radius * math.sin(k * math.pi / 5), cy - radius * math.cos(k * math.pi / 5)))
        draw.polygon(points, fill=255)
    else:  # cross: a plus sign whose arms are a third of the box wide
        a, b = left + round(side / 3), left + round(2 * side / 3) - 1
        c, d = top + round(side / 3), top + round(2 * side / 3) - 1
        draw.rectangle((a, top, b, bottom), fill=255)
        draw.rectangle((left, c, right, d), fill=255)


@lru_cache(maxsize=16)
def _background(name: str, size: int) -> np.ndarray:
    if name == "gradient":
        ramp = np.linspace(*_GRADIENT, size).round().astype(np.uint8)
        return np.repeat(ramp[:, None], size * 3, axis=1).reshape(size, size, 3)
    return np.full((size, size, 3), PALETTE[name], np.uint8)


@lru_cache(maxsize=256)
def _pattern(texture: str, side: int) -> np.ndarray:
    """Where the ink goes in an object's box: diagonal stripes or a grid of dots, under half the area either
    way, so the object's colour stays its most common one. The period follows the object, about five
    stripes or dots across it, so a small object is as clearly striped as a large one (5 px at least)."""
    period = max(5, round(side / 5))
    yy, xx = np.mgrid[0:side, 0:side]
    if texture == "striped":
        return (xx + yy) % period < max(2, round(0.4 * period))
    dx, dy = xx % period - (period - 1) / 2, yy % period - (period - 1) / 2
    return dx * dx + dy * dy <= (0.27 * period) ** 2


def _ink(colour: str) -> tuple[int, int, int]:
    # Black on light colours (yellow, orange), white on dark ones: the pattern must contrast with the object.
    r, g, b = PALETTE[colour]
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def _unit_hash(*parts: str) -> float:
    """A stable pseudo-random number in [0, 1) for `parts`."""
    return _unit_seed(*parts) / 2**64


def _unit_seed(*parts: str) -> int:
    digest = hashlib.blake2b("\0".join(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


# --- writing a dataset --------------------------------------------------------------------------------


def write_dataset(
    out_dir: str | Path,
    n: int,
    *,
    seed: int = 0,
    size: int = 64,
    splits: Mapping[str, float] = DEFAULT_SHARES,
) -> dict[str, Any]:
    """Render `n` scenes into the new or empty folder `out_dir`; return a summary.

    `splits` gives each split's share of the images (a split left out gets none); the counts are rounded
    so they sum to `n`. Writes NNNNN.png, its caption in NNNNN.txt (UTF-8, no trailing newline, as the
    sidecar writer writes captions) and splits.json. File numbers are shuffled so that they say nothing
    about the split. Every file is written atomically. The same arguments write the same bytes.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, not {n}")
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE} px, not {size}")
    counts = _apportion(n, splits)
    out = Path(out_dir)
    # A non-empty folder could hold images of an earlier run that splits.json would not list but a reader
    # of the folder would still pick up.
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: write the dataset to a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)

    drawn = [(name, scene) for name in SPLITS for scene in sample_scenes(counts[name], split=name, seed=seed)]
    # Separate streams for the shuffle and each image's jitter ([seed] and [seed, 0] would be the same).
    order = np.random.default_rng([seed, 1]).permutation(len(drawn))
    width = max(5, len(str(n - 1)))
    files: dict[str, list[str]] = {name: [] for name in SPLITS}
    store = SidecarStore(out)
    for index, i in enumerate(order):
        split, scene = drawn[i]
        image = out / f"{index:0{width}d}.png"
        buffer = io.BytesIO()
        render(scene, size, np.random.default_rng([seed, 2, index])).save(buffer, "PNG")
        atomic_write_bytes(image, buffer.getvalue())
        store.write(image, caption(scene))
        files[split].append(image.name)
    for names in files.values():
        names.sort()
    atomic_write_text(out / DATASET_SPLITS_FILE, json.dumps(files, indent=1) + "\n")
    return {
        "out_dir": str(out),
        "n": n,
        "size": size,
        "seed": seed,
        "counts": {name: len(names) for name, names in files.items()},
    }


def _apportion(n: int, shares: Mapping[str, float]) -> dict[str, int]:
    """Split n by shares, rounding by largest remainder so the counts sum to n."""
    unknown = set(shares) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown splits {sorted(unknown)}: expected some of {SPLITS}")
    if any(share < 0 for share in shares.values()) or sum(shares.values()) <= 0:
        raise ValueError(f"split shares must be >= 0 with a positive sum, not {dict(shares)}")
    total = sum(shares.values())
    exact = {name: n * shares.get(name, 0) / total for name in SPLITS}
    counts = {name: int(value) for name, value in exact.items()}
    by_remainder = sorted(SPLITS, key=lambda name: counts[name] - exact[name])
    for name in by_remainder[: n - sum(counts.values())]:
        counts[name] += 1
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loracap.data.synthetic",
        description="Render synthetic scenes with exact captions, holding out attribute pairings for test.",
    )
    parser.add_argument("out_dir", type=Path, help="new or empty folder to write into")
    parser.add_argument("--n", type=int, required=True, help="number of images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--test-share", type=float, default=0.1, help="share of images in test (0.1)")
    parser.add_argument("--val-share", type=float, default=0.1, help="share of images in val (0.1)")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error("--n must be at least 1")
    if args.size < MIN_SIZE:
        parser.error(f"--size must be at least {MIN_SIZE}")
    if not (0 <= args.test_share <= 1 and 0 <= args.val_share <= 1 and args.test_share + args.val_share <= 1):
        parser.error("--test-share and --val-share must be between 0 and 1 and sum to at most 1")
    shares = {"train": 1 - args.test_share - args.val_share, "val": args.val_share, "test": args.test_share}
    try:
        summary = write_dataset(args.out_dir, args.n, seed=args.seed, size=args.size, splits=shares)
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    counts = ", ".join(f"{name} {count}" for name, count in summary["counts"].items())
    print(f"wrote {args.n} images ({args.size} px) to {args.out_dir}: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
