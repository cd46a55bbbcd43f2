"""Restart latency of a pre-forked server's worker: forkserver.Supervisor vs gunicorn's arbiter.

A thin script over ``python -m forkserver bench --only supervise``
(``forkserver/_bench/_supervise.py``): one worker serving the same WSGI app
on the same kind of listener; each sample SIGKILLs it and times a request
sent right after, until the replacement answers.  Both contenders
interleaved, in one run; the ratio is the goal (<= 0.5x gunicorn).

Run (gunicorn from PyPI: pip install -e '.[bench]'):
    python benchmarks/supervise.py              # 40 samples each, a few seconds
    python benchmarks/supervise.py --n 10 --json supervise.json
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from forkserver.__main__ import main as forkserver_main


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=40, help="samples per contender (default 40)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    bench = ["bench", "--only", "supervise", "--rounds", str(args.n), "--preload", "json"]
    if args.json:
        bench += ["--json", args.json]
    return forkserver_main(bench)


if __name__ == "__main__":
    sys.exit(main())
