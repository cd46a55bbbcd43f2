"""Command line: ``python -m forkserver bench``."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m forkserver")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("bench", help="side-by-side numbers against multiprocessing and subprocess")
    args = parser.parse_args(argv)
    if args.command == "bench":
        print(
            "forkserver bench: not yet — the side-by-side table lands with the bench issue.\n"
            "For now: python benchmarks/fdpass.py (fd passing vs socket.send_fds)."
        )
        return 0
    return 2  # unreachable: argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
