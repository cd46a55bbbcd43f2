"""forkserver.Executor against ProcessPoolExecutor (forkserver and fork contexts) and loky.

A thin script over ``python -m forkserver bench`` (``forkserver/_bench/_executor.py``),
limited to the executor scenarios, all in one run, contenders interleaved
round-robin after a warm-up, workers with numpy loaded (their task module
imports it):

* round trip ``submit(noop).result()`` (goal: >= 4x faster than PPE, forkserver context);
* ``map(ident, range(10_000), chunksize=1)`` with two workers (goal: >= 4x PPE's throughput);
* the first result of a fresh executor whose template has numpy already
  (goal: <= 3 ms), then the same from this process holding 1 GiB more.

loky is measured when installed (``pip install -e '.[bench]'``).  The goals
are printed at the end, met or missed, from this run's medians.

Run:
    python benchmarks/executor.py               # about a minute
    python benchmarks/executor.py --quick       # a few seconds (CI)
    python benchmarks/executor.py --json executor.json
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from forkserver.__main__ import default_preload
from forkserver.__main__ import main as forkserver_main


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200, help="samples of the fast contenders")
    parser.add_argument("--quick", action="store_true", help="CI-sized run: a few seconds")
    parser.add_argument("--preload", default=default_preload(), metavar="MODULE",
                        help="module the workers have loaded (default here: %(default)s)")
    parser.add_argument("--parent-gib", type=float, default=1.0, metavar="N",
                        help="memory this process holds for the big-parent row (default 1)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return parser.parse_args(argv)


def bench_argv(args: argparse.Namespace) -> List[str]:
    """The equivalent ``python -m forkserver bench`` command line."""
    argv = ["bench", "--only", "executor_rt,executor_map,executor_first", "--preload", args.preload,
            "--rounds", str(min(args.rounds, 20) if args.quick else args.rounds)]
    argv += ["--parent-gib", str(0.25 if args.quick else args.parent_gib)]
    if args.quick:
        argv.append("--quick")
    if args.json:
        argv += ["--json", args.json]
    return argv


if __name__ == "__main__":
    sys.exit(forkserver_main(bench_argv(parse_args(sys.argv[1:]))))
