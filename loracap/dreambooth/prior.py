"""Class images for prior preservation: the user's own, reused generated ones, and the missing ones made.

The class folder (--class-data-dir, default OUT/class-images) may hold images of your own: they are used
as they are. Images loracap generates are recorded in the folder's manifest, `loracap-class-images.json`,
each with what made it (a fingerprint of the base model's files, prompt, seed, size, steps, guidance): a
later run reuses one only when all of that matches, and removes generated ones that no longer match (an
edited prompt, another base), so they never pass as images of your own. Image i of a run is made with seed
class_seed + i, batched, one generator per image, so an image does not depend on its batch; the manifest
is written after every batch, so an interrupted generation keeps what it made.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loracap.files import atomic_write_bytes, atomic_write_text
from loracap.inputs import find_images

log = logging.getLogger(__name__)

__all__ = ["MANIFEST", "ClassImages", "ClassRecipe", "base_fingerprint", "prepare_class_images"]

MANIFEST = "loracap-class-images.json"
_PREFIX = "loracap-class-"
_SAMPLE_BYTES = 1 << 16  # read from each end of every weight file for the fingerprint


@dataclass(frozen=True)
class ClassRecipe:
    """What makes a generated class image: equal recipes give the same image."""

    base: str
    """`base_fingerprint` of the base pipeline."""
    prompt: str
    size: int
    steps: int
    guidance: float

    def record(self, seed: int) -> dict[str, Any]:
        return {"base": self.base, "prompt": self.prompt, "size": self.size, "steps": self.steps,
                "guidance": self.guidance, "seed": seed}  # fmt: skip


@dataclass
class ClassImages:
    folder: Path
    images: list[Path]
    """The ones training uses: your own first, then generated ones, `num_class_images` in all."""
    own: int
    reused: int
    generated: int
    removed: int
    """Generated images of an earlier recipe, deleted."""


def base_fingerprint(folder: Path) -> str:
    """A short hash of a pipeline folder: every file's relative path and size, config files whole, and the
    first and last 64 KB of each weight file (hashing gigabytes at every start would take minutes, and two
    checkpoints differ in those bytes)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(folder).as_posix()}\0{size}\0".encode())
        with open(path, "rb") as f:
            if path.suffix in (".json", ".txt") or size <= 2 * _SAMPLE_BYTES:
                digest.update(f.read())
            else:
                digest.update(f.read(_SAMPLE_BYTES))
                f.seek(size - _SAMPLE_BYTES)
                digest.update(f.read())
    return digest.hexdigest()[:16]


def _read_manifest(folder: Path) -> dict[str, dict[str, Any]]:
    try:
        doc = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        return dict(doc.get("images", {}))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, AttributeError) as exc:
        # Unreadable: treat every image as the user's own rather than delete anything.
        log.warning("ignoring %s (%s): the images in %s count as your own", MANIFEST, exc, folder)
        return {}


def _write_manifest(folder: Path, images: dict[str, dict[str, Any]]) -> None:
    doc = {"version": 1, "images": dict(sorted(images.items()))}
    atomic_write_text(folder / MANIFEST, json.dumps(doc, indent=1) + "\n")


def prepare_class_images(
    folder: Path,
    count: int,
    recipe: ClassRecipe,
    *,
    seed: int,
    batch_size: int,
    generate: Callable[[list[int]], list[Any]],
    progress: bool = True,
) -> ClassImages:
    """`count` class images in `folder`, generating the missing ones with `generate(seeds) -> PIL images`
    (called only when some are missing, so the pipeline loads only then)."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest = _read_manifest(folder)
    present = {p.name: p for p in find_images(folder, recursive=False)}
    own = sorted(p for name, p in present.items() if name not in manifest)
    matching: dict[int, Path] = {}
    removed = 0
    for name, record in list(manifest.items()):
        path = folder / name
        if name in present and record == recipe.record(record.get("seed", -1)):
            matching[int(record["seed"])] = path
            continue
        if name in present:  # ours, made by another recipe: it must not linger as one of "your own"
            path.unlink(missing_ok=True)
            removed += 1
        del manifest[name]
    if removed:
        log.info("removed %d class images generated for another prompt, base or size", removed)
        _write_manifest(folder, manifest)
    reused = sorted(matching.items())[: max(0, count - len(own))]
    images = own[:count] + [path for _, path in reused]
    missing = count - len(images)
    if missing <= 0:
        return ClassImages(folder, images, min(len(own), count), len(reused), 0, removed)
    used = set(matching)
    seeds = [s for s in range(seed, seed + count + len(used) + 1) if s not in used][:missing]
    log.info("generating %d class images of %r in %s", missing, recipe.prompt, folder)
    from tqdm.auto import tqdm

    bar = tqdm(total=missing, desc="class images", unit="img", disable=not progress)
    try:
        for start in range(0, missing, batch_size):
            chunk = seeds[start : start + batch_size]
            for s, image in zip(chunk, generate(chunk), strict=True):
                name = f"{_PREFIX}{s:05d}.png"
                _save_png(folder / name, image)
                manifest[name] = recipe.record(s)
                images.append(folder / name)
            _write_manifest(folder, manifest)
            bar.update(len(chunk))
    finally:
        bar.close()
    return ClassImages(folder, images, min(len(own), count), len(reused), missing, removed)


def _save_png(path: Path, image: Any) -> None:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
