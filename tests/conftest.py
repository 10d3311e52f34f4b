"""Shared fixtures: tiny random-weight models of the real architectures, built once per session.

Tests never reach a model hub: the hub is off (HF_HUB_OFFLINE=1) and every cache points into a
temporary folder, so a test that passes here passes on a machine with no network.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from PIL import Image

_SANDBOX = Path(tempfile.mkdtemp(prefix="loracap-tests-"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_CACHE"] = str(_SANDBOX / "hf-cache")
os.environ["LORACAP_CACHE"] = str(_SANDBOX / "loracap-cache")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _loracap_messages_on_stderr():
    """loracap's log messages on stderr at the CLI's default level, as a user of the command sees them,
    also in tests that call the Python API directly."""
    from loracap.cli import setup_logging

    setup_logging(quiet=False, verbose=False)


# Random tiny models often stop at once; a few forced tokens make every caption non-empty.
GEN_ARGS = ["--min-new-tokens", "2", "--max-new-tokens", "6", "--quiet"]


@pytest.fixture
def one_thread():
    """One torch thread for the test (and torch's count back after): tiny models run as fast on one as on
    several, and far faster on a busy machine. Modules that run torch throughout use it for every test
    with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model("florence2") -> folder of a saved tiny model, built on first use."""
    from loracap.testing import make_tiny_model

    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = make_tiny_model(arch, tmp_path_factory.mktemp(arch.replace("-", "_")))
        return built[arch]

    return get


def write_images(folder: Path, names: list[str], size: tuple[int, int] = (48, 40)) -> list[Path]:
    """Small real images; the extension picks the format."""
    paths = []
    for i, name in enumerate(names):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, ((40 * i) % 256, 120, 200)).save(path)
        paths.append(path)
    return paths


# --- the browser tests (report.html, loracap edit): Debian's Chromium, driven headless through Playwright.
# `.ci/run` installs Chromium and sets CI, and there a missing browser is a failure, not a skip: a browser
# test that skips in CI checks nothing. On a developer machine without Chromium it skips.

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# The flags keep Chromium off the network this machine does not have (it retries many lookups otherwise).
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser():
    missing = "chromium" if CHROMIUM is None else None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = "playwright"
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{missing} is not installed; .ci/run installs it (apt-get install chromium)")
        pytest.skip(f"{missing} is not installed (apt-get install chromium; pip install playwright)")
    with sync_playwright() as p:
        instance = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield instance
        instance.close()
