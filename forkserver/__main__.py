"""Command line: ``python -m forkserver bench|serve|run|status|stop|launcher``."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from ._bench._cli import default_preload  # noqa: F401 - benchmarks/spawn.py uses it


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m forkserver``."""
    from ._bench import _cli as bench_cli
    from ._zygote import _cli as zygote_cli

    parser = argparse.ArgumentParser(prog="python -m forkserver")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    bench_cli.add_parser(sub)
    zygote_cli.add_parsers(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["run"]:  # its arguments are the script's: argparse would take its options
        from ._zygote._client import main as run

        return run(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # no command: say what there is
        parser.print_help()
        return 0
    if args.command == "bench":
        from ._bench._cli import bench

        return bench(args, argv)
    if args.command in ("serve", "run", "status", "stop", "launcher"):
        from ._zygote._cli import dispatch

        return dispatch(args)
    return 2  # unreachable: argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
