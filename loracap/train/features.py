"""A disk cache of a frozen vision tower's features, for `loracap train --cache-features`.

With the vision tower frozen and no augmentation, an image's features never change during training, so
they are computed once and read back every epoch, and by later runs on the same images. An entry is keyed
by both halves of what decides it:

- the encoder: its id plus a fingerprint of the tower as loaded (its config, the image processor's config,
  a SHA-256 of every weight's bytes, and the versions of the code that decodes and preprocesses), so two
  checkpoints of the same architecture, or one folder retrained in place, never share entries;
- the image's content: the SHA-256 of the file (`file-`), of the bytes a Hugging Face dataset stores
  (`bytes-`), or of the decoded pixels where it stores none (`pixels-`). Files and stored bytes are kinds
  of their own because they are decoded differently (files shrink while decoding, as `loracap caption`
  reads them), so the same bytes can reach the tower as different pixels.

Layout: `ROOT/<encoder key>/<image key>.safetensors`, one float32 (N, Dv) tensor per image (the dtype
training runs the towers in), written atomically. ROOT is `$LORACAP_CACHE/vision-features` unless given.
Each entry records its keys and a checksum of its data: an entry that is unreadable, truncated or altered
reads as missing and is computed again, so no damaged entry can stop a run or reach training.

`fill_cache` computes the missing entries from the images as `loracap.train.batches.CaptionDataset` decodes
them; `FeatureDataset` reads them back in its place while training.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PIL
import torch
import transformers
from safetensors import SafetensorError
from safetensors.torch import load, save
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from loracap.files import atomic_write_bytes, atomic_write_text
from loracap.hub import loracap_cache_dir
from loracap.inputs import ImageDecodeError, file_sha256
from loracap.train.batches import CaptionDataset
from loracap.train.data import Example, TableImage, visit_of

log = logging.getLogger(__name__)

__all__ = [
    "CACHE_VERSION",
    "FeatureCache",
    "FeatureDataset",
    "Filled",
    "fill_cache",
    "find_entries",
    "image_key",
    "open_cache",
    "read_entry",
    "weights_digest",
]

CACHE_VERSION = 1
"""Bump when loracap changes how an image becomes the tower's features (decoding, CLS handling): every
earlier entry then belongs to another encoder key and is never read again."""

TENSOR = "features"
ENCODER_FILE = "encoder.json"


@dataclass(frozen=True)
class FeatureCache:
    """The entries of one encoder: `folder` is ROOT/<encoder key>."""

    folder: Path

    @property
    def encoder(self) -> str:
        return self.folder.name

    def entry(self, image_key: str) -> Path:
        return self.folder / f"{image_key}.safetensors"

    def read(self, image_key: str) -> torch.Tensor | None:
        return read_entry(self.entry(image_key))

    def write(self, image_key: str, features: torch.Tensor) -> Path:
        """Store one image's features (N, Dv) as float32; a reader sees the old entry or the new one."""
        features = features.detach().to("cpu", torch.float32).contiguous()
        metadata = {"encoder": self.encoder, "image": image_key, "sha256": _tensor_sha256(features)}
        path = self.entry(image_key)
        atomic_write_bytes(path, save({TENSOR: features}, metadata=metadata))
        return path


def read_entry(path: Path) -> torch.Tensor | None:
    """The features stored at `path`, or None when the entry is missing, unreadable or not what its name
    says (another encoder's or image's, or data that no longer matches its checksum)."""
    # Read whole into memory, not through safe_open: its tensors are views of a memory map, which would
    # change (or fault) under the reader if the file were rewritten in place after the checks.
    try:
        data = path.read_bytes()
        size = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + size]).get("__metadata__") or {}
        features = load(data)[TENSOR]
    except (OSError, ValueError, AttributeError, KeyError, SafetensorError):
        return None  # missing, cut short, not safetensors (ValueError: its header is no JSON object)
    expected = {"encoder": path.parent.name, "image": path.stem}
    if any(metadata.get(k) != v for k, v in expected.items()):
        return None
    if features.dtype != torch.float32 or features.dim() != 2:
        return None
    if metadata.get("sha256") != _tensor_sha256(features):
        return None
    return features


def _tensor_sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(_tensor_bytes(tensor)).hexdigest()


def _tensor_bytes(tensor: torch.Tensor) -> Any:
    # A uint8 view of the flat tensor, handed to hashlib without a copy (bf16 included, which numpy lacks).
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


# --- the encoder key -------------------------------------------------------------------------------------


def open_cache(model: Any, image_processor: Any, root: str | Path | None = None) -> FeatureCache:
    """The cache folder of `model`'s vision tower as it is now (a `PrefixCaptioner`), under `root`
    (default `loracap_cache_dir()/vision-features`). Also writes `encoder.json` there, which says in
    words which encoder the folder belongs to."""
    base = Path(root).expanduser() if root is not None else loracap_cache_dir() / "vision-features"
    described = _encoder_description(model, image_processor)
    fingerprint = hashlib.sha256(json.dumps(described, sort_keys=True).encode("utf-8"))
    fingerprint.update(weights_digest(model.vision_tower).encode("ascii"))
    folder = base / f"{_slug(model.config.vision_id)}-{fingerprint.hexdigest()[:16]}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / ENCODER_FILE).is_file():
            atomic_write_text(folder / ENCODER_FILE, json.dumps(described, indent=1, sort_keys=True) + "\n")
    except OSError as exc:  # a user error (exit 2 from the CLI), not a traceback
        raise ValueError(
            f"cannot write the feature cache in {base} ({exc.strerror or exc}): pass --feature-cache DIR "
            "with a folder you can write to"
        ) from None
    return FeatureCache(folder)


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 over every tensor of `module`'s state dict: name, dtype, shape and bytes. All of the bytes,
    not a sample: two fine-tunes of one checkpoint may differ in a single layer. About 0.2 s for a
    SigLIP-base tower (370 MB) where the CPU has SHA instructions."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def _encoder_description(model: Any, image_processor: Any) -> dict[str, Any]:
    return {
        "vision_id": model.config.vision_id,
        "vision_config": _stable(model.config.vision_config),
        "image_processor": _stable(image_processor.to_dict()),
        # Pillow decodes and shrinks the files, transformers preprocesses them and runs the tower: an
        # upgrade of either may change the features, so it gets entries of its own.
        "versions": {
            "cache": CACHE_VERSION,
            "transformers": transformers.__version__,
            "pillow": PIL.__version__,
        },
    }


def _stable(config: dict[str, Any]) -> dict[str, Any]:
    # Without the bookkeeping that changes when nothing that matters does (the folder a config was read
    # from, the version that wrote it); json round trip so the result is plain and sortable.
    kept = {k: v for k, v in config.items() if not k.startswith("_") and k != "transformers_version"}
    return json.loads(json.dumps(kept, sort_keys=True, default=str))


def _slug(vision_id: str | None) -> str:
    """A readable folder-name prefix: the hub id (`google--siglip-base-patch16-224`) or a folder's tail."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", (vision_id or "vision").replace("/", "--"))
    return name[-48:].strip("-.") or "vision"


# --- the image key ---------------------------------------------------------------------------------------


def image_key(example: Example, undecoded: dict[tuple[int, str], Any] | None = None) -> str:
    """The content key of `example`'s image (see the module docstring). `undecoded` keeps the undecoded
    view of each Hugging Face table between calls. Raises OSError for a file that cannot be read and
    ImageDecodeError for an image that cannot be decoded when its pixels are the key."""
    if example.path is not None:
        return f"file-{file_sha256(example.path)}"
    stored = _stored_digest(example, {} if undecoded is None else undecoded)
    if stored is not None:
        return f"bytes-{stored}"
    image = example.image()
    digest = hashlib.sha256(f"{image.mode}:{image.size};".encode())
    digest.update(image.tobytes())
    return f"pixels-{digest.hexdigest()}"


def _stored_digest(example: Example, undecoded: dict[tuple[int, str], Any]) -> str | None:
    """SHA-256 of the bytes a Hugging Face dataset stores for the image, without decoding it; None when
    the example is not one of `loracap.train.data`'s table rows or the table stores no bytes."""
    loader = example.loader
    if not isinstance(loader, TableImage):
        return None
    import datasets  # the `train` extra, and heavy: only Hugging Face rows (which need it) get here

    table, index, column = loader.table, loader.index, loader.column
    if not isinstance(table.features.get(column), datasets.Image):
        return None
    key = (id(table), column)
    if key not in undecoded:  # a new view of the same arrow data, not a copy: cheap
        undecoded[key] = table.cast_column(column, datasets.Image(decode=False))
    stored = undecoded[key][index][column] or {}
    if stored.get("bytes"):
        return hashlib.sha256(stored["bytes"]).hexdigest()
    if stored.get("path"):
        try:
            return file_sha256(stored["path"])
        except OSError:
            return None
    return None


# --- filling it ------------------------------------------------------------------------------------------


@dataclass
class Filled:
    entries: list[Path | None]
    """Each example's entry, in order; None where its image could not be read (reported once)."""
    reused: int
    computed: int
    """Distinct images: examples with the same content share one entry."""
    unreadable: int


def fill_cache(
    cache: FeatureCache,
    model: Any,
    examples: list[Example],
    image_processor: Any,
    *,
    batch_size: int = 16,
    workers: int = 0,
    progress: bool = True,
) -> Filled:
    """Compute, in batches on the vision tower's device, the features of every image of `examples` that
    has no readable entry, and return every example's entry. Unreadable images are reported on stderr
    and left out.

    The pixels are those training would feed the tower (decoded at the processor's input side, one
    processor call per batch) and the features those `model.vision_features` returns, in float32 with
    no autocast. Draws nothing from the global RNG, so a run with the cache keeps the dropout masks of
    a run without it."""
    keys, unreadable = _image_keys(examples)
    entries: dict[str, Path] = {}
    todo: dict[str, Example] = {}  # one example per distinct image still to compute
    for example, key in zip(examples, keys, strict=True):
        if key is None or key in entries or key in todo:
            continue
        if cache.read(key) is not None:
            entries[key] = cache.entry(key)
        else:
            todo[key] = example
    reused = len(entries)

    loader = DataLoader(
        _Positioned(list(todo.values()), image_processor),
        batch_size=batch_size,
        collate_fn=_Preprocess(image_processor),
        num_workers=workers,
        generator=torch.Generator(),  # not the global RNG: see the docstring
    )
    todo_keys = list(todo)
    bar = tqdm(
        total=len(todo),
        desc="caching vision features",
        unit="img",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    tower = model.vision_tower
    device = next(tower.parameters()).device
    was_training = tower.training
    tower.eval()
    try:
        with torch.no_grad():
            for positions, pixels, failed in loader:
                if positions:
                    features = model.vision_features(pixels.to(device))
                    for position, row in zip(positions, features, strict=True):
                        key = todo_keys[position]
                        entries[key] = cache.write(key, row)
                unreadable += len(failed)
                bar.update(len(positions) + len(failed))
    finally:
        tower.train(was_training)
        bar.close()
    return Filled(
        entries=[entries.get(k) if k is not None else None for k in keys],
        reused=reused,
        computed=len(entries) - reused,
        unreadable=unreadable,
    )


def find_entries(cache: FeatureCache, examples: list[Example]) -> list[Path | None]:
    """Each example's entry as another process filled it (None where there is none). Reports nothing:
    the process that filled the cache did."""
    keys, _ = _image_keys(examples, report=False)
    return [cache.entry(k) if k is not None and cache.entry(k).is_file() else None for k in keys]


def _image_keys(examples: list[Example], *, report: bool = True) -> tuple[list[str | None], int]:
    """Every example's image key, None for one whose image cannot be read (reported on stderr); and how
    many of those there were."""
    undecoded: dict[tuple[int, str], Any] = {}
    keys: list[str | None] = []
    for example in examples:
        try:
            keys.append(image_key(example, undecoded))
        except (OSError, ImageDecodeError) as exc:
            if report:
                log.warning("skipping %s: %s", example.key, getattr(exc, "reason", exc))
            keys.append(None)
    return keys, keys.count(None)


class _Positioned(Dataset):
    """(position, CaptionDataset's item): the images decoded exactly as training decodes them, an
    unreadable one reported there and None."""

    def __init__(self, examples: list[Example], image_processor: Any) -> None:
        self.items = CaptionDataset(examples, image_processor)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[int, dict[str, Any] | None]:
        return index, self.items[index]


@dataclass
class _Preprocess:
    """(position, item) pairs -> (positions, pixel_values, failed positions), one processor call per
    batch as in training. A class, not a closure: spawned DataLoader workers receive it pickled."""

    image_processor: Any

    def __call__(
        self, pairs: list[tuple[int, dict[str, Any] | None]]
    ) -> tuple[list[int], torch.Tensor | None, list[int]]:
        decoded = [(i, item["image"]) for i, item in pairs if item is not None]
        failed = [i for i, item in pairs if item is None]
        if not decoded:
            return [], None, failed
        pixels = self.image_processor(images=[image for _, image in decoded], return_tensors="pt")[
            "pixel_values"
        ]
        return [i for i, _ in decoded], pixels, failed


# --- reading it back in training -------------------------------------------------------------------------


class FeatureDataset(Dataset):
    """Cached vision features with their captions (`cache_features`): what the tower would make of
    CaptionDataset's images, read from the cache. An example without an entry (its image was unreadable,
    reported while the cache was filled) is None and left out of its batch, as CaptionDataset leaves it
    out, so batches hold the same examples with the cache as without it."""

    def __init__(self, examples: list[Example], entries: list[Path | None]) -> None:
        self.examples, self.entries = examples, entries

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        position, visit = visit_of(index, len(self.examples))  # see batches.EpochSampler
        example, entry = self.examples[position], self.entries[position]
        if entry is None:
            return None
        features = read_entry(entry)
        if features is None:  # checked when the cache was filled: something changed it since
            log.warning("skipping %s: its cached features %s are unreadable", example.key, entry)
            return None
        return {"features": features, "caption": example.caption_for(visit)}
