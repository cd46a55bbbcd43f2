"""The executor scenarios of ``python -m forkserver bench`` (parent side).

forkserver.Executor against ``ProcessPoolExecutor`` (forkserver and fork
contexts) and loky (when installed), workers with the preload module loaded
(``_executor_tasks`` imports it):

* ``executor_rt``: ``submit(noop).result()`` round trip (median of a block;
  the blocks' means in the notes).
* ``executor_map``: ``map(ident, range(N), chunksize=1)`` with two workers.
* ``executor_first``: a fresh executor's first result, template warm; then
  the same from a parent holding ``parent_gib`` GiB (``fork`` copies it).
"""
from __future__ import annotations

import contextlib
import gc
import importlib
import os
import statistics
import time
import warnings
from typing import TYPE_CHECKING, Any, Callable, List, Optional

from . import _core as B

if TYPE_CHECKING:  # pragma: no cover
    from concurrent import futures
    from typing import Dict

RT_BLOCK = 100  # round trips per sample: the first ones after a pause pay the CPUs' wake-ups
MAP_TASKS = 10_000
WORKERS = 2
TASKS = "forkserver._bench._executor_tasks"
FS, PPE_FS, PPE_FORK, LOKY = ("forkserver.Executor", "PPE, forkserver context",
                             "PPE, fork context", "loky")
FS_BIG, PPE_FORK_BIG = "forkserver.Executor, big parent", "PPE fork, big parent"
KEYS = ("executor_rt", "executor_map", "executor_first")
NO_LOKY = "not installed (pip install 'forkserver[bench]')"
TITLES = {"executor_rt": "executor round trip", "executor_map": "executor map, small tasks",
          "executor_first": "executor first result"}


def _loky() -> Any:
    try:
        return importlib.import_module("loky")
    except ImportError:
        return None


def _stop_loky_tracker() -> None:
    """Stop and reap loky's resource tracker (we leave no child behind).  Private API."""
    with contextlib.suppress(Exception):
        from loky.backend import resource_tracker

        resource_tracker._resource_tracker._stop()


@contextlib.contextmanager
def _quiet_fork():
    with warnings.catch_warnings():  # 3.12+: "multi-threaded, use of fork()"
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


class Executors:
    """The long-lived executors of the round-trip and map scenarios (two workers each)."""

    def __init__(self, bench: Any, stack: contextlib.ExitStack) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        from .._pool._executor import Executor
        from .._template import Template

        os.environ["FORKSERVER_BENCH_PRELOAD"] = bench.s.preload  # for the workers' import
        self.tasks = importlib.import_module(TASKS)
        self.tpl = stack.enter_context(Template().require(bench.s.preload, TASKS))
        self.pools: Dict[str, futures.Executor] = {FS: Executor(WORKERS, template=self.tpl)}
        with _quiet_fork():
            self.pools[PPE_FS] = ProcessPoolExecutor(WORKERS, mp_context=bench.mp_fs)
            self.pools[PPE_FORK] = ProcessPoolExecutor(
                WORKERS, mp_context=multiprocessing.get_context("fork"))
        loky = _loky()
        if loky is not None:
            stack.callback(_stop_loky_tracker)  # last: after every loky executor has stopped
            self.pools[LOKY] = loky.ProcessPoolExecutor(WORKERS)
        for pool in self.pools.values():
            stack.callback(pool.shutdown)
        with _quiet_fork():
            for pool in self.pools.values():  # every worker up and warm
                list(pool.map(self.tasks.ident, range(200)))

    def contenders(self, sampler: Callable[..., Callable[[], float]]) -> List[B.Contender]:
        out = [B.Contender(name, sampler(pool, name)) for name, pool in self.pools.items()]
        if LOKY not in self.pools:
            out.append(B.Contender(LOKY, None, note=NO_LOKY))
        return out


def runners(scenario: Callable[..., Any]) -> dict:
    """The scenario runners, ``runner(bench)``; ``scenario`` makes their result objects."""

    def shared(bench: Any) -> Executors:
        if getattr(bench, "executors", None) is None:
            bench.executors = Executors(bench, bench.stack)
        return bench.executors

    return {
        "executor_rt": lambda bench: executor_rt(bench, shared(bench), scenario),
        "executor_map": lambda bench: executor_map(bench, shared(bench), scenario),
        "executor_first": lambda bench: executor_first(bench, shared(bench), scenario),
    }


def executor_rt(bench: Any, executors: Executors, Scenario: Callable[..., Any]) -> Any:
    noop = executors.tasks.noop
    means: dict = {}

    def sampler(pool: Any, name: str) -> Callable[[], float]:
        def once() -> float:
            times = []
            for _ in range(RT_BLOCK):
                t0 = time.perf_counter()
                pool.submit(noop).result(B.TIMEOUT)
                times.append(time.perf_counter() - t0)
            means.setdefault(name, []).append(sum(times) / len(times) * 1e6)
            return statistics.median(times) * 1e6
        return once

    sc = Scenario("executor_rt", "executor: submit(noop).result() round trip", "us")
    sc.contenders = executors.contenders(sampler)
    bench.measure(sc.contenders)
    sc.notes.append(f"{WORKERS} workers each, {bench.s.preload} loaded; a sample is the median of "
                    f"{RT_BLOCK} round trips in a row (steady state)")
    for name, values in means.items():  # the first round trips after a pause pay wake-ups
        sc.notes.append(f"{name}: mean of a block {statistics.median(values):.1f} us")
    sc.goals.append(dict(text=f"executor round trip >= 4x faster than {PPE_FS}",
                         value=_ratio(sc.median(PPE_FS), sc.median(FS)), limit=4.0, unit="x",
                         at_least=True))
    return sc


def executor_map(bench: Any, executors: Executors, Scenario: Callable[..., Any]) -> Any:
    ident = executors.tasks.ident
    n = MAP_TASKS if bench.s.rounds >= 100 else MAP_TASKS // 5

    def sampler(pool: Any, name: str) -> Callable[[], float]:
        def once() -> float:
            t0 = time.perf_counter()
            for _ in pool.map(ident, range(n), chunksize=1):
                pass
            return (time.perf_counter() - t0) * 1e3
        return once

    sc = Scenario("executor_map", f"executor: map(ident, range({n}), chunksize=1)", "ms")
    sc.contenders = executors.contenders(sampler)
    bench.measure(sc.contenders, rounds=max(3, bench.s.rounds // 20))
    for c in sc.contenders:
        if c.samples:
            median = sorted(c.samples)[len(c.samples) // 2]
            sc.notes.append(f"{c.name}: {n / (median / 1e3):,.0f} tasks/s")
    sc.goals.append(dict(text=f"executor map, 2 workers, >= 4x {PPE_FS}'s throughput",
                         value=_ratio(sc.median(PPE_FS), sc.median(FS)), limit=4.0, unit="x",
                         at_least=True))
    return sc


def executor_first(bench: Any, executors: Executors, Scenario: Callable[..., Any]) -> Any:
    """A fresh executor, its first result; template (or parent) with the preload module warm."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from .._pool._executor import Executor
    from ._workers import settle

    noop, tpl, s = executors.tasks.noop, executors.tpl, bench.s

    def first(make: Callable[[], Any],
              after: Optional[Callable[[], None]] = None) -> Callable[[], float]:
        def once() -> float:
            t0 = time.perf_counter()
            with _quiet_fork():
                pool = make()
                pool.submit(noop).result(B.TIMEOUT)
            elapsed = time.perf_counter() - t0
            pool.shutdown(wait=True)
            if after is not None:
                after()
            return elapsed * 1e3
        return once

    fork = multiprocessing.get_context("fork")
    ours = first(lambda: Executor(template=tpl), lambda: settle(tpl))
    ppe_fork = first(lambda: ProcessPoolExecutor(mp_context=fork))
    sc = Scenario("executor_first", "executor: first result from a fresh executor", "ms")
    small = [B.Contender(FS, ours),
             B.Contender(PPE_FS, first(lambda: ProcessPoolExecutor(mp_context=bench.mp_fs)),
                         max(3, s.rounds // 10)),
             B.Contender(PPE_FORK, ppe_fork)]
    loky = _loky()
    if loky is not None:
        small.append(B.Contender(LOKY, first(lambda: loky.ProcessPoolExecutor()),
                                 max(2, s.spawn_samples // 4)))
    else:
        small.append(B.Contender(LOKY, None, note=NO_LOKY))
    big = [B.Contender(FS_BIG, ours), B.Contender(PPE_FORK_BIG, ppe_fork)]
    sc.contenders = small + big
    rounds = max(5, s.rounds // 4)
    bench.measure(small, rounds=rounds)
    bench.progress.status(f"allocating and touching {s.parent_gib:g} GiB")
    ballast = B.ballast(s.parent_gib)
    try:
        bench.measure(big, rounds=rounds)
    finally:
        del ballast
        gc.collect()
    sc.notes.append(f"{PPE_FS}: its server preloads {s.preload}; a worker is forked from it")
    sc.notes.append(f"big parent: this process holding {s.parent_gib:g} GiB more")
    sc.goals.append(dict(text="executor first result <= 3 ms", value=sc.median(FS), limit=3.0,
                         unit="ms"))
    sc.goals.append(dict(text="executor first result, big parent <= 3 ms", value=sc.median(FS_BIG),
                         limit=3.0, unit="ms"))
    return sc


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None else a / b
