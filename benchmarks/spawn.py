"""Start -> ran -> reaped latency of a worker with a module preloaded, and idle-worker memory.

A thin script over ``python -m forkserver bench`` (``forkserver/_bench*.py``):
the same measurements, limited to the worker scenarios (no exec rows).
Contenders, interleaved round-robin after a warm-up: forkserver,
multiprocessing forkserver with the module preloaded, multiprocessing spawn
(n/10 samples), and ``os.fork`` in a small process with the module (the
floor); with ``--parent-mib`` also the same from this process holding that
much memory (forkserver vs a small helper's forkserver vs ``os.fork`` here).
Then the USS of idle workers, and the goals of docs/benchmarks.md on this run.

Run:
    python benchmarks/spawn.py                    # --n 200, about 15 s
    python benchmarks/spawn.py --quick            # a few seconds (CI)
    python benchmarks/spawn.py --parent-mib 4096  # the big-parent goal
    python benchmarks/spawn.py --skip-spawn --json spawn.json
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from forkserver.__main__ import default_preload
from forkserver.__main__ import main as forkserver_main


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    """This script's options (kept from before it moved into the package)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="samples per contender (default 200)")
    parser.add_argument("--quick", action="store_true", help="CI-sized run: a few seconds")
    parser.add_argument("--parent-mib", type=int, default=0, metavar="M",
                        help="allocate and touch M MiB in this process (design goal: 4096)")
    parser.add_argument("--preload", default=default_preload(), metavar="MODULE",
                        help="module the workers have loaded (default here: %(default)s)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--skip-spawn", action="store_true",
                        help="leave out the slow mp spawn contender")
    return parser.parse_args(argv)


def bench_argv(args: argparse.Namespace) -> List[str]:
    """The equivalent ``python -m forkserver bench`` command line."""
    n = min(args.n, 20) if args.quick else args.n
    argv = ["bench", "--rounds", str(n), "--preload", args.preload]
    only = ["start", "idle_uss"]
    if args.parent_mib > 0:
        only.insert(1, "big_parent")
        argv += ["--parent-gib", str(args.parent_mib / 1024)]
    argv += ["--only", ",".join(only)]
    if args.quick:
        argv.append("--quick")
    if args.skip_spawn:
        argv += ["--spawn-samples", "0"]
    if args.json:
        argv += ["--json", args.json]
    return argv


def main(argv: Optional[List[str]] = None) -> int:
    """Run the worker scenarios of ``python -m forkserver bench``; the exit status."""
    return forkserver_main(bench_argv(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
