"""The JavaScript the caption page runs, from npm at pinned versions, checked against npm's integrity hashes.

onnxruntime-web (the WASM runtime, and its WebGPU build) and fflate (the zip of sidecar captions) are
fetched once into the package's `web/vendor/` folder (or `$LORACAP_CACHE/web-vendor/` where the package
cannot be written), and every page is served or written from there: the page loads nothing from a CDN and
works offline.

    python -m loracap.browser.runtime      # or `loracap web --fetch-runtime`
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import os
import sys
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from loracap.files import atomic_write_bytes
from loracap.hub import loracap_cache_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NpmPackage:
    name: str
    version: str
    integrity: str
    """npm's `dist.integrity` (sha512 of the tarball, base64)."""
    files: tuple[str, ...]
    """Paths inside the tarball's package/ folder that the page needs."""

    @property
    def url(self) -> str:
        return f"https://registry.npmjs.org/{self.name}/-/{self.name}-{self.version}.tgz"


PACKAGES = (
    NpmPackage(
        "onnxruntime-web",
        "1.30.0",
        "sha512-q0y+JrrtukXSzsBWEMccVfqX25LRmosXHF+CaRJmg8pZClzcV7svNc4rKY3jL02Vb7QmRMDs1SigqR4CXAfKYQ==",
        (
            # WASM (every browser) ...
            "dist/ort.wasm.min.mjs",
            "dist/ort-wasm-simd-threaded.mjs",
            "dist/ort-wasm-simd-threaded.wasm",
            # ... and WebGPU, loaded only where the browser has it
            "dist/ort.webgpu.min.mjs",
            "dist/ort-wasm-simd-threaded.asyncify.mjs",
            "dist/ort-wasm-simd-threaded.asyncify.wasm",
            "package.json",  # its "license" (MIT); the tarball has no LICENSE file
        ),
    ),
    NpmPackage(
        "fflate",
        "0.8.2",
        "sha512-cPJU47OaAoCbg0pBvzsgpTPhmhqI5eJjh/JIu8tPj5q+T7iLvW/JAYUqmE7KOB4R1ZyEhzBaIQpQpardBF5z8A==",
        ("esm/browser.js", "LICENSE"),
    ),
)

_PACKAGED = Path(__file__).resolve().parents[1] / "web" / "vendor"


def _folders() -> list[Path]:
    return [_PACKAGED, loracap_cache_dir() / "web-vendor"]


def package_dir(root: Path, package: NpmPackage) -> Path:
    return root / f"{package.name}-{package.version}"


def runtime_dir() -> Path | None:
    """The vendor folder that holds every pinned file, or None when they were never fetched."""
    for root in _folders():
        if all((package_dir(root, p) / f).is_file() for p in PACKAGES for f in p.files):
            return root
    return None


def fetch_runtime() -> Path:
    """Download the pinned packages (skipped when present), check each tarball's integrity, and keep the
    files the page needs. Returns the vendor folder. OSError when npm's registry cannot be reached."""
    found = runtime_dir()
    if found is not None:
        return found
    root = _PACKAGED if os.access(_PACKAGED.parent, os.W_OK) else loracap_cache_dir() / "web-vendor"
    for package in PACKAGES:
        log.info("fetching %s %s from npm", package.name, package.version)
        try:
            with urllib.request.urlopen(package.url, timeout=60) as response:
                tarball = response.read()
        except OSError as exc:  # (URLError is one)
            raise OSError(
                f"cannot fetch {package.url} ({exc}); on a machine without npm's registry, copy the "
                f"folder {root} from one that ran `loracap web --fetch-runtime`"
            ) from None
        digest = "sha512-" + base64.b64encode(hashlib.sha512(tarball).digest()).decode()
        if digest != package.integrity:
            raise OSError(f"{package.url} does not match its pinned integrity hash; nothing was kept")
        with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as archive:
            for name in package.files:
                member = archive.extractfile(f"package/{name}")
                if member is None:
                    raise OSError(f"{package.name} {package.version} has no {name}")
                target = package_dir(root, package) / name
                target.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(target, member.read())
    return root


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="loracap: %(message)s")
    print(fetch_runtime(), file=sys.stdout)
