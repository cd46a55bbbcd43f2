"""``python -m forkserver bench``: its arguments and the run (parent side)."""
from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import sys
import time
from typing import List

# How long a run takes, measured on our 2-vCPU machine: the one place it is
# stated (docs/benchmarks.md shows this string; the run prints its own time).
TYPICAL_RUN = "about 2 minutes on 2 CPUs (--quick: about 20 s)"

BENCH_HELP = f"""\
Side-by-side numbers on this machine, in one run (contenders interleaved
round-robin after a warm-up): worker start -> ran -> reaped with a preloaded
module (forkserver / multiprocessing forkserver with preload / multiprocessing
spawn / bare os.fork), start -> ran (the moment the worker's function begins),
the same from a big parent, exec of /bin/true (forkserver / subprocess.run /
posix_spawn), idle worker USS, a new template's first reply, restart latency of a
supervised worker (forkserver.Supervisor / gunicorn's arbiter), forkserver.Executor
against ProcessPoolExecutor and loky (round trip, map of small tasks, first
result), forkserver.mp_context() against the standard contexts; then the
project goals, met or missed.  Takes {TYPICAL_RUN}.
The exit status is 0 (it is a measurement) unless --check is given.
"""


def default_preload() -> str:
    """numpy when it is installed, else json (always there)."""
    return "numpy" if importlib.util.find_spec("numpy") is not None else "json"


def _scenarios(text: str) -> tuple:
    from ._scenarios import SCENARIOS

    keys = tuple(k.strip().replace("-", "_") for k in text.split(",") if k.strip())
    unknown = [k for k in keys if k not in SCENARIOS]
    if unknown or not keys:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(SCENARIOS)}")
    return keys


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a missing parent package
        return False


def add_parser(sub) -> argparse.ArgumentParser:
    """Add the ``bench`` command to the subcommands ``sub`` of the CLI parser."""
    bench = sub.add_parser("bench", help="side-by-side numbers against multiprocessing and "
                           "subprocess", description=BENCH_HELP,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("--quick", action="store_true",
                       help="CI-sized run: fewer samples, a 0.25 GiB big parent")
    bench.add_argument("--json", metavar="PATH", help="also write the results (and every "
                       "sample) as JSON to PATH")
    bench.add_argument("--preload", metavar="MODULE", default=default_preload(),
                       help="module every worker has loaded (default here: %(default)s)")
    bench.add_argument("--parent-gib", type=float, metavar="N",
                       help="memory the big parent holds (default 1; --quick 0.25; "
                       "the design goal is stated for 4)")
    bench.add_argument("--rounds", type=int, metavar="N",
                       help="samples per fast contender (default 200; --quick 20)")
    bench.add_argument("--spawn-samples", type=int, metavar="K",
                       help="samples of multiprocessing spawn (~200 ms each with numpy; "
                       "default rounds/10, at least 3; 0 leaves it out)")
    from ._scenarios import SCENARIOS

    bench.add_argument("--only", type=_scenarios, metavar="A,B",
                       help=f"run only these scenarios: {', '.join(SCENARIOS)}")
    bench.add_argument("--check", action="store_true",
                       help="exit with status 1 when a goal is missed (or a contender failed)")
    return bench


def settings_from(args: argparse.Namespace):
    """Turn the parsed ``bench`` arguments into ``_scenarios.Settings``."""
    from ._scenarios import SCENARIOS, Settings

    quick = args.quick
    rounds = args.rounds if args.rounds is not None else (20 if quick else 200)
    if rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    gib = args.parent_gib if args.parent_gib is not None else (0.25 if quick else 1.0)
    if gib <= 0:
        raise SystemExit("--parent-gib must be positive (leave the scenario out with --only)")
    spawn = args.spawn_samples if args.spawn_samples is not None else max(3, rounds // 10)
    return Settings(
        preload=args.preload, rounds=rounds, warmup=2 if quick else 5,
        spawn_samples=max(0, spawn), big_fork_samples=max(3, rounds // 4),
        idle_workers=4 if quick else 16, idle_spawn_workers=min(spawn, 2 if quick else 4),
        parent_gib=gib, only=args.only or SCENARIOS,
    )


def bench(args: argparse.Namespace, argv: List[str]) -> int:
    """Run the benchmark (``argv``: its command line), print the table, write the JSON."""
    from . import _report as R, _scenarios as S
    from ._core import Progress

    settings = settings_from(args)
    if not _importable(settings.preload):
        print(f"forkserver bench: no module named {settings.preload!r}", file=sys.stderr)
        return 2
    progress = Progress(steps=1 + len(settings.only))
    t0 = time.monotonic()
    try:
        scenarios = S.run(settings, progress)
    except Exception as exc:  # no scenario can run (the template, a server...): say why
        progress.close()
        print(f"forkserver bench: could not run: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    progress.close()
    seconds = time.monotonic() - t0
    info = R.machine(settings.preload)
    goal_list = R.goals(scenarios, settings)
    print(R.table(scenarios, info, goal_list))
    print(f"\n({seconds:.1f} s; reproduce: python -m forkserver {shlex.join(argv)})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(R.to_json(scenarios, info, goal_list, settings, seconds), f, indent=1)
    failed = [f"{sc.key}: {c.name} {c.note}" for sc in scenarios for c in sc.contenders if c.failed]
    for line in failed:
        print(f"forkserver bench: {line}", file=sys.stderr)
    missed = [g["goal"] for g in goal_list if g["met"] is False]
    if args.check and (missed or failed):
        print(f"forkserver bench --check: {len(missed)} goal(s) missed"
              + "".join(f"\n  {text}" for text in missed)
              + (f"; {len(failed)} contender(s) failed" if failed else ""), file=sys.stderr)
        return 1
    return 0
