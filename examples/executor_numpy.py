"""Warm numpy workers: a template loads numpy and a matrix once; forkserver.Executor forks it.

    python examples/executor_numpy.py --tasks 200 --size 300

The template imports numpy and builds a weight matrix; every worker is a
fork of it, so it starts in about a millisecond with numpy loaded and the
matrix in memory (shared with the template, copy-on-write).  The executor
runs ``score(seed)`` calls there -- a drop-in ``concurrent.futures``
executor -- and one task kills its own worker on purpose: only that task
fails (``WorkerDiedError``), the others complete on a replacement worker.
A longer task reports progress to the parent with ``forkserver.worker.event``.
"""
from __future__ import annotations

import argparse
import os
import signal
import time

import numpy

import forkserver
from forkserver.worker import event

WEIGHTS = None  # set in the template (see main): every worker has it


def score(seed: int) -> float:
    """A worker's task: the matrix applied to a random vector, summed."""
    vector = numpy.random.default_rng(seed).standard_normal(WEIGHTS.shape[0])
    return float((WEIGHTS @ vector).sum())


def scores_with_progress(seeds: list) -> list:
    """A longer task that tells the parent how far it got (``on_event``)."""
    out = []
    for i, seed in enumerate(seeds):
        out.append(score(seed))
        event((i + 1, len(seeds)))
    return out


def crash() -> None:
    """A task that kills its own worker (as the OOM killer would)."""
    os.kill(os.getpid(), signal.SIGKILL)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--size", type=int, default=300, help="the matrix is size x size")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)

    # Run as a script, this file is __main__; the workers find its functions
    # under its module name (this directory is on sys.path, which templates adopt).
    import executor_numpy as me

    setup = ("import executor_numpy as m, numpy; "
             "m.WEIGHTS = numpy.random.default_rng(0).random(args[0])")
    progress = []
    with forkserver.Template().require("numpy", "executor_numpy").eval(
            setup, (args.size, args.size)) as template:
        with forkserver.Executor(args.workers, template=template,
                                 on_event=lambda future, step: progress.append(step)) as ex:
            t0 = time.perf_counter()
            first = ex.submit(me.score, 0).result()
            print(f"first result after {(time.perf_counter() - t0) * 1e3:.1f} ms "
                  "(its worker forked on demand, numpy and the matrix already loaded)")
            doomed = ex.submit(me.crash)
            t1 = time.perf_counter()
            results = list(ex.map(me.score, range(args.tasks)))
            print(f"{args.tasks} tasks in {(time.perf_counter() - t1) * 1e3:.1f} ms")
            try:
                doomed.result()
            except forkserver.WorkerDiedError as exc:
                print(f"one task failed alone: {exc}")
            batch = ex.submit(me.scores_with_progress, list(range(5))).result()

    me.WEIGHTS = numpy.random.default_rng(0).random((args.size, args.size))
    local = [me.score(seed) for seed in range(args.tasks)]
    same = numpy.allclose(results, local) and first == local[0] and batch == local[:5]
    print(f"progress events: {progress}")
    print(f"{len(results)} results, the same as computed here: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
