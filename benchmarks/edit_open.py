"""How fast `loracap edit` opens a big dataset: seconds from start to the first page of the grid, to the
whole index, and to a re-open (the index already built), and the process's memory, at 1k / 10k / 100k.

    python benchmarks/edit_open.py --sizes 1000,10000,100000

Each size gets a folder of tiny PNGs with tag sidecars (the file count is what costs, not the pixels), made
once under --work and kept for later runs. Each measurement runs in a fresh process: the app is created
(its index starts building in a thread) and /api/images is asked for the first page until it has items;
the goal is under 2 s at 100k.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

PROBE = r"""
import json, resource, sys, time
started = time.perf_counter()
from fastapi.testclient import TestClient
from loracap.edit.app import EditConfig, create_app
client = TestClient(create_app(EditConfig(dir=sys.argv[1])))
while not client.get("/api/images", params={"limit": 100}).json()["items"]:
    time.sleep(0.01)
first = time.perf_counter() - started
while client.get("/api/info").json()["indexing"]:
    time.sleep(0.05)
whole = time.perf_counter() - started
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"first_page_s": first, "indexed_s": whole, "total": client.get("/api/info").json()["total"],
                  "peak_rss_mb": rss}))
"""


def make_dataset(folder: Path, n: int) -> None:
    from PIL import Image

    if folder.is_dir() and sum(1 for _ in folder.glob("*.png")) == n:
        return
    folder.mkdir(parents=True, exist_ok=True)
    buffer = folder / "_seed.png"
    Image.new("RGB", (8, 8), (120, 80, 40)).save(buffer)
    data = buffer.read_bytes()
    buffer.unlink()
    for i in range(n):
        (folder / f"{i:06d}.png").write_bytes(data)
        (folder / f"{i:06d}.txt").write_text(
            f"ohwx, tag{i % 97}, colour{i % 13}, shot{i % 5}", encoding="utf-8"
        )


def probe(folder: Path) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(folder)], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "loracap-edit-bench")
    args = parser.parse_args(argv)
    print(
        "| images | first page, new index (s) | whole index (s) | first page, re-open (s) | peak RSS (MB) |"
    )
    print("|---|---|---|---|---|")
    for n in (int(s) for s in args.sizes.split(",")):
        folder = args.work / str(n)
        make_dataset(folder, n)
        index = folder / ".loracap"
        if index.exists():
            import shutil

            shutil.rmtree(index)
        fresh = probe(folder)
        again = probe(folder)
        print(f"| {n} | {fresh['first_page_s']:.2f} | {fresh['indexed_s']:.2f} | {again['first_page_s']:.2f} "
              f"| {max(fresh['peak_rss_mb'], again['peak_rss_mb']):.0f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
