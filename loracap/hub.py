"""Find a model's files: a local folder, the Hugging Face cache, or a download from the hub."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)

# What a captioning checkpoint needs; other frameworks' weights and ONNX exports are skipped.
_IGNORE_PATTERNS = [
    "*.onnx",
    "*.onnx_data",
    "onnx/*",
    "*.msgpack",
    "*.h5",
    "flax_model*",
    "tf_model*",
    "*.ot",
    "*.tflite",
    "*.gguf",
    "*.mlmodel",
    "coreml/*",
    "openvino/*",
]
_REPO_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
_TRUE = {"1", "true", "yes", "on"}


class ModelUnavailable(Exception):
    """The model cannot be found or fetched. The message is one line that says what to do."""


def offline_mode() -> bool:
    # Read at call time: huggingface_hub reads HF_HUB_OFFLINE once, at import.
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home).expanduser() / "hub"


def loracap_cache_dir() -> Path:
    """loracap's own cache (CLIPScore scores, converted checkpoints): `$LORACAP_CACHE`, else ~/.cache/loracap.

    Read at call time, so tests and users can point it elsewhere per run.
    """
    return Path(os.environ.get("LORACAP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "loracap"))


def folder_fingerprint(folder: Path) -> str:
    """Identifies this exact checkpoint (for caches of what is made from it): its resolved path plus the
    size and mtime of its files."""
    digest = hashlib.sha256(str(folder.resolve()).encode())
    for path in sorted(folder.iterdir()):
        if path.is_file():
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{int(stat.st_mtime)}".encode())
    return digest.hexdigest()[:16]


def is_cached(repo_id: str) -> bool:
    """Whether the hub id already has a snapshot in the local cache (no network)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json", cache_dir=hf_cache_dir())
    return isinstance(found, str)


TAGGER_FILES = ("model.onnx", "selected_tags.csv")
"""What makes a folder a WD14-style tagger (SmilingWolf's wd-*-tagger repos, and any like them)."""


def is_tagger_folder(path: Path) -> bool:
    return all((Path(path) / name).is_file() for name in TAGGER_FILES)


def resolve_model(spec: str, *, offline: bool | None = None, revision: str | None = None) -> Path:
    """Turn `--model` into a local folder holding config.json (or a tagger's model.onnx and
    selected_tags.csv), downloading once if allowed."""
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file() and not is_tagger_folder(path):
            raise ModelUnavailable(
                f"{spec} is not a model folder: it has no config.json (nor a tagger's model.onnx and "
                "selected_tags.csv)"
            )
        return path.resolve()
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or not _REPO_ID.match(spec):
        raise ModelUnavailable(f"no model folder at {spec}, and it is not a Hugging Face model id")

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hf_cache_dir()
    try:
        return Path(snapshot_download(spec, revision=revision, cache_dir=cache, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError):
        pass
    if offline_mode() if offline is None else offline:
        raise ModelUnavailable(
            f"{spec} is not in the local Hugging Face cache ({cache}) and offline mode is on "
            f"(HF_HUB_OFFLINE=1): run `hf download {spec}` on a machine with internet and copy {cache} "
            f"here, or pass a local folder with --model PATH"
        )
    return _download(spec, revision, cache)


def _download(spec: str, revision: str | None, cache: Path) -> Path:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        files = HfApi().list_repo_files(spec, revision=revision)
        ignore = list(_IGNORE_PATTERNS)
        if "selected_tags.csv" in files:  # a WD tagger: its ONNX graph is the model
            ignore = [p for p in ignore if "onnx" not in p]
        if any(name.endswith(".safetensors") for name in files):
            ignore.append("*.bin")  # both are often published; one copy is enough
        log.info("downloading %s (first use; cached for next time in %s)", spec, cache)
        return Path(snapshot_download(spec, revision=revision, cache_dir=cache, ignore_patterns=ignore))
    except GatedRepoError:
        raise ModelUnavailable(
            f"{spec} is gated: accept its licence on huggingface.co and log in with `hf auth login`"
        ) from None
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise ModelUnavailable(
            f"no model named {spec} on the Hugging Face hub (check the spelling)"
        ) from None
    except Exception as exc:  # network failures arrive as httpx, OSError or hub errors alike
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelUnavailable(
            f"could not download {spec} ({reason}): check the connection, or run `hf download {spec}` on a "
            f"machine with internet and copy {cache} here (then HF_HUB_OFFLINE=1 skips the network)"
        ) from None
