"""The ``mp_*`` scenarios of ``python -m forkserver bench``: ``forkserver.mp_context()``.

* ``mp_start``: ``ctx.Process(target=...).start(); join()`` with the preload
  module imported, from this (small) process: our context against the
  standard ``forkserver`` context (preload set), interleaved; then ten
  starts back to back (the mean of ten), where our context's waiting child
  is ready for the first only; then ``fork`` and ``spawn``, each alone (a
  fork of this process, a spawn child's imports, would slow down whichever
  contender came next).
* ``mp_big_parent``: the same from this process holding ``parent_gib`` GiB,
  interleaved with the same from a small helper process (the goal's base),
  and the standard forkserver; ``fork`` alone afterwards.
* ``mp_pool``: a ``ProcessPoolExecutor`` created, its first result, with our
  context and the standard ``forkserver`` one (its server running already,
  the preload module in it), and ``fork``'s.

Every target is ``importlib.import_module(preload)`` (``abs`` in the pool):
no module of ours is imported by any child but our context's (see ``_core``).
Our context's background work (making the next waiting child) is waited
for after each sample, untimed, as the spare clones of the other scenarios
are; the back-to-back rows show the cost without that wait.

This module only depends on ``_core``: ``_scenarios`` and ``_report`` hand
it their ``Scenario`` class and goal helper (no import circle).
"""
from __future__ import annotations

import contextlib
import gc
import importlib
import time
import warnings
from typing import Any, Callable, Dict, List, Optional

from . import _core as B

OURS = "mp_context()"
OURS_SMALL = "mp_context(), small parent"
MP_FS, MP_SPAWN, MP_FORK = "mp forkserver + preload", "mp spawn", "mp fork"
BLOCK = 10  # back to back: starts per sample
PPE_SAMPLES = 20  # ProcessPoolExecutor cold starts per contender (mp forkserver: ~0.1 s each)
SCENARIOS = ("mp_start", "mp_big_parent", "mp_pool")
TITLES = {"mp_start": "mp context: Process start + join",
          "mp_big_parent": "mp context: the same from a big parent",
          "mp_pool": "mp context: ProcessPoolExecutor first result"}


def runners(scenario: Callable[..., Any]) -> Dict[str, Callable[[Any], Any]]:
    """Our scenarios' runners, building results with ``scenario`` (``_scenarios.Scenario``)."""
    return {"mp_start": lambda bench: mp_start(bench, scenario),
            "mp_big_parent": lambda bench: mp_big_parent(bench, scenario),
            "mp_pool": lambda bench: mp_pool(bench, scenario)}


@contextlib.contextmanager
def _our_context(preload: str):
    from .._pool._mp import mp_context

    ctx = mp_context(preload=[preload])
    try:
        yield ctx
    finally:
        ctx.close()


def _settled(ctx: Any) -> Callable[[], None]:
    """Untimed, after a sample: wait for the context's next waiting child."""
    return lambda: ctx._warm.wait_ready(B.TIMEOUT)


def _start_join(bench: Any, ctx: Any, name: str, settle: bool = False) -> Callable[[], float]:
    target = importlib.import_module
    return B.timed(name, lambda: B.mp_start_and_reap(ctx, target, (bench.s.preload,)),
                   _settled(ctx) if settle else None)


def _block(once: Callable[[], float],
           after: Optional[Callable[[], None]] = None) -> Callable[[], float]:
    def block() -> float:
        mean = sum(once() for _ in range(BLOCK)) / BLOCK
        if after is not None:
            after()
        return mean

    return block


def _measure(bench: Any, contenders: List[Any]) -> None:
    """Interleaved rounds after a longer warm-up than the other scenarios': a quarter of the
    rounds.  A start path is only at its speed after some tens of starts (the interpreter
    specialises code that runs often: measured here, the first hundred of ours took 1.2x)."""
    s = bench.s
    B.measure(contenders, s.rounds, max(s.warmup, s.rounds // 4), bench.progress.tick)


def mp_start(bench: Any, scenario: Callable[..., Any]) -> Any:
    """start + join from this small process, against the standard contexts."""
    import multiprocessing

    s = bench.s
    sc = scenario("mp_start", f"mp context: Process start + join, {s.preload} preloaded", "ms")
    with _our_context(s.preload) as ctx:
        fork_ctx = multiprocessing.get_context("fork")
        fork = B.Contender(MP_FORK, _start_join(bench, fork_ctx, MP_FORK))
        sc.contenders = [
            B.Contender(OURS, _start_join(bench, ctx, OURS, settle=True)),
            B.Contender(MP_FS, _start_join(bench, bench.mp_fs, MP_FS)),
        ]
        back = [B.Contender(f"{OURS}, {BLOCK} back to back", _block(_start_join(bench, ctx, OURS),
                                                                     _settled(ctx))),
                B.Contender(f"{MP_FS}, {BLOCK} back to back",
                            _block(_start_join(bench, bench.mp_fs, MP_FS)))]
        _measure(bench, sc.contenders)
        bench.measure(back, rounds=max(1, s.rounds // BLOCK))
        # Alone, after the others: a fork of this process write-protects its
        # memory (the copy-on-write faults would be charged to the next
        # contender), and a spawn child's import of the preload module
        # (~90 ms of CPU) leaves the caches cold for the next.
        with _fork_quietly():
            bench.measure([fork])
        sc.contenders.append(fork)
        if s.spawn_samples > 0:
            spawn = B.Contender(MP_SPAWN, _start_join(bench, bench.mp_spawn, MP_SPAWN))
            bench.measure([spawn], rounds=s.spawn_samples)
            sc.contenders.append(spawn)
        sc.contenders += back
    sc.notes.append(f"{OURS} = forkserver.mp_context(preload=[{s.preload!r}]); its next "
                    "waiting child is awaited untimed after each sample")
    sc.notes.append(f"{MP_FORK} and {MP_SPAWN} are measured after the others, each alone (a fork "
                    "of this process, a spawn child's imports, would slow down the next contender)")
    sc.notes.append(f"back to back = the mean of {BLOCK} start + join in a row, nothing awaited")
    sc.goals.append(dict(text=f"mp_context: start + join >= 2x faster than {MP_FS}",
                         value=_ratio(sc.median(MP_FS), sc.median(OURS)), limit=2.0, unit="x",
                         at_least=True))
    return sc


def mp_big_parent(bench: Any, scenario: Callable[..., Any]) -> Any:
    """The same from a parent holding ``parent_gib`` GiB, against the same from a small
    helper process (interleaved), the standard forkserver, then fork (alone)."""
    import multiprocessing

    s = bench.s
    sc = scenario("mp_big_parent",
                  f"mp context: the same from a parent holding {s.parent_gib:g} GiB", "ms")
    with _our_context(s.preload) as ctx, contextlib.closing(SmallParent(s.preload)) as small:
        ours = B.Contender(OURS, _start_join(bench, ctx, OURS, settle=True))
        here = B.Contender(OURS_SMALL, small.once)
        fs = B.Contender(MP_FS, _start_join(bench, bench.mp_fs, MP_FS))
        fork_ctx = multiprocessing.get_context("fork")
        fork = B.Contender(MP_FORK, _start_join(bench, fork_ctx, MP_FORK), s.big_fork_samples)
        sc.contenders = [ours, here, fs, fork]
        bench.progress.status(f"allocating and touching {s.parent_gib:g} GiB")
        ballast = B.ballast(s.parent_gib)
        try:
            _measure(bench, [ours, here, fs])
            with _fork_quietly():  # alone: its copy-on-write faults would hit the others
                bench.measure([fork], rounds=s.big_fork_samples)
        finally:
            del ballast
            gc.collect()
    sc.notes.append(f"{OURS_SMALL} = the same from a small helper process (interleaved); "
                    f"{MP_FORK} is measured after the others, alone")
    sc.goals.append(dict(text=f"mp_context: from {s.parent_gib:g} GiB <= 1.1x from a small parent",
                         value=_ratio(sc.median(OURS), sc.median(OURS_SMALL)), limit=1.1, unit="x"))
    return sc


class SmallParent(B.Helper):
    """A small process timing our context's start + join, a sample per request (as ``_workers``)."""

    def __init__(self, preload: str) -> None:
        import os
        import sys

        # Our sys.path first, as for the other helpers: a --preload module
        # importable only from here is importable there too.
        code = ("import os, sys; sys.path[:0] = sys.argv[1].split(os.pathsep); "
                f"from forkserver._bench._mp import timing_helper; timing_helper({preload!r})")
        super().__init__("mp_context", preload,
                         argv=[sys.executable, "-c", code, os.pathsep.join(sys.path)])


def timing_helper(preload: str) -> None:
    """In the small helper: per line on stdin, time one start + join; answer "<ns> <status>"."""
    import signal
    import sys

    from .._pool._mp import mp_context

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the benchmark ends us (stdin EOF)
    importlib.import_module(preload)
    with mp_context(preload=[preload]) as ctx:
        for _ in iter(sys.stdin.buffer.readline, b""):
            t0 = time.perf_counter_ns()
            status = B.mp_start_and_reap(ctx, importlib.import_module, (preload,))
            elapsed = time.perf_counter_ns() - t0
            ctx._warm.wait_ready(B.TIMEOUT)
            sys.stdout.write(f"{elapsed} {status}\n")
            sys.stdout.flush()


def mp_pool(bench: Any, scenario: Callable[..., Any]) -> Any:
    """ProcessPoolExecutor(max_workers=1, mp_context=...) to its first result (shutdown untimed)."""
    import multiprocessing

    s = bench.s
    sc = scenario("mp_pool", "mp context: ProcessPoolExecutor created -> first result", "ms")
    samples = max(3, min(PPE_SAMPLES, s.rounds))
    with _our_context(s.preload) as ctx:
        fork = B.Contender(MP_FORK, _pool_first(multiprocessing.get_context("fork")))
        sc.contenders = [
            B.Contender(OURS, _pool_first(ctx, _settled(ctx))),
            B.Contender(MP_FS, _pool_first(bench.mp_fs)),
        ]
        B.measure(sc.contenders, samples, 1, bench.progress.tick)
        with _fork_quietly():
            B.measure([fork], samples, 1, bench.progress.tick)
        sc.contenders.append(fork)
    sc.notes.append(f"{MP_FS}: its server runs already, with {s.preload} preloaded; "
                    f"{MP_FORK} is measured after the others, alone")
    sc.goals.append(dict(text="mp_context: ProcessPoolExecutor first result <= 10 ms",
                         value=sc.median(OURS), limit=10.0, unit="ms"))
    return sc


def _pool_first(ctx: Any, after: Optional[Callable[[], None]] = None) -> Callable[[], float]:
    from concurrent.futures import ProcessPoolExecutor

    def once() -> float:
        t0 = time.perf_counter()
        pool = ProcessPoolExecutor(max_workers=1, mp_context=ctx)
        try:
            if pool.submit(abs, -1).result(B.TIMEOUT) != 1:
                raise RuntimeError("the pool returned a wrong result")
            elapsed = time.perf_counter() - t0
        finally:
            pool.shutdown(wait=True)
        if after is not None:
            after()
        return elapsed * 1e3

    return once


@contextlib.contextmanager
def _fork_quietly():
    with warnings.catch_warnings():  # 3.12+: "multi-threaded, use of fork()" (our threads)
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None else a / b
