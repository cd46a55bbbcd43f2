"""forkserver.mp_context() against multiprocessing's own start methods, in one run.

A thin script over ``python -m forkserver bench`` (``forkserver/_bench/_mp.py``):
the ``mp_start``, ``mp_big_parent`` and ``mp_pool`` scenarios.  Contenders,
interleaved round-robin after a warm-up, all with the module preloaded
(numpy by default):

* ``ctx.Process(target=...).start(); join()``: our context, the standard
  ``forkserver`` context (its preload set), ``fork``, ``spawn`` (n/10
  samples), then ten in a row (ours and ``forkserver``);
* the same from this process holding ``--parent-gib`` GiB (``fork`` alone,
  afterwards);
* ``ProcessPoolExecutor(max_workers=1, mp_context=...)`` created -> first result.

Then the goals of issue 15 on this run: >= 2x faster than the standard
forkserver, the big parent <= 1.1x the small one, the pool's first result
<= 10 ms.

Run:
    python benchmarks/mp_context.py                  # --n 200, about 30 s
    python benchmarks/mp_context.py --quick          # a few seconds (CI)
    python benchmarks/mp_context.py --parent-gib 4 --json mp.json
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from forkserver.__main__ import default_preload
from forkserver.__main__ import main as forkserver_main


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="samples per contender (default 200)")
    parser.add_argument("--quick", action="store_true", help="CI-sized run: a few seconds")
    parser.add_argument("--parent-gib", type=float, default=1.0, metavar="G",
                        help="memory the big parent holds (default 1; --quick 0.25)")
    parser.add_argument("--preload", default=default_preload(), metavar="MODULE",
                        help="module the children have loaded (default here: %(default)s)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--skip-spawn", action="store_true",
                        help="leave out the slow spawn contender")
    return parser.parse_args(argv)


def bench_argv(args: argparse.Namespace) -> List[str]:
    """The equivalent ``python -m forkserver bench`` command line."""
    n = min(args.n, 20) if args.quick else args.n
    argv = ["bench", "--rounds", str(n), "--preload", args.preload,
            "--only", "mp_start,mp_big_parent,mp_pool"]
    if args.quick:
        argv.append("--quick")
    else:
        argv += ["--parent-gib", str(args.parent_gib)]
    if args.skip_spawn:
        argv += ["--spawn-samples", "0"]
    if args.json:
        argv += ["--json", args.json]
    return argv


def main(argv: Optional[List[str]] = None) -> int:
    """Run the mp context scenarios of ``python -m forkserver bench``; the exit status."""
    return forkserver_main(bench_argv(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
