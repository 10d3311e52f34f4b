"""`python -m loracap.testing ARCH OUT_DIR [--size tiny|full] [--seed N]`: build a test model, print its path.

A command-line entry so shell scripts, benchmarks and CI steps can produce an offline checkpoint without
writing Python.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from loracap.testing.models import ARCHS, SIZES, WEIGHTS_FORMATS, make_tiny_model


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv`, build the model, print the output directory; returns the process exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m loracap.testing",
        description="Build a random-weight model (captioner, encoder or diffusion pipeline) of a real "
        "architecture, offline.",
    )
    parser.add_argument("arch", choices=ARCHS, help="architecture to build")
    parser.add_argument("out_dir", help="directory to write the checkpoint into (created if missing)")
    parser.add_argument(
        "--size", choices=SIZES, default="tiny", help="tiny (tests, default) or full (benchmarks)"
    )
    parser.add_argument("--seed", type=int, default=0, help="torch seed for the random weights (default 0)")
    parser.add_argument(
        "--weights-format",
        choices=WEIGHTS_FORMATS,
        default="safetensors",
        help="florence2-original only: write pytorch_model.bin as microsoft/* do",
    )
    args = parser.parse_args(argv)
    try:
        path = make_tiny_model(
            args.arch, args.out_dir, size=args.size, seed=args.seed, weights_format=args.weights_format
        )
    except ValueError as exc:
        parser.error(str(exc))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
