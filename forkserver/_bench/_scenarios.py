"""The scenarios of ``python -m forkserver bench`` (parent side).

Each scenario is a list of contenders measured in one interleaved run; the
first contender is forkserver's, the base of the ratio column.
"""
from __future__ import annotations

import contextlib
import gc
import importlib
import os
import subprocess
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from . import _core as B, _executor, _latency, _mp, _supervise, _zygote
from ._core import Scenario
from ._workers import bare_fork, settle, start_and_reap, stop_default_template

SCENARIOS = ("start", "start_ran", "back_to_back", "big_parent", "exec", "idle_uss", "first_reply", "zygote",
             "supervise", *_mp.SCENARIOS, *_executor.KEYS)
BLOCK = 10  # back_to_back: workers per sample, one right after the other
TRUE = "/bin/true"

# contender names, shared with the report's goals
FS, FS_SMALL, FS_SPAWN = "forkserver", "forkserver, small parent", "forkserver.spawn"
FS_NO_SPARE = "forkserver, spare=False"
MP_FS, MP_SPAWN = "mp forkserver + preload", "mp spawn"
FORK_FLOOR, FORK_HERE = "os.fork, small process", "os.fork, this process"
SUBPROCESS, POSIX_SPAWN = "subprocess.run", "os.posix_spawn + waitpid"


@dataclass
class Settings:
    """What to run and how many samples (see ``__main__`` for the command line)."""

    preload: str
    rounds: int = 200
    warmup: int = 5
    spawn_samples: int = 20  # mp spawn: ~200 ms each with numpy
    big_fork_samples: int = 50  # os.fork from the big parent: ~45 ms per GiB
    idle_workers: int = 16
    idle_spawn_workers: int = 4
    parent_gib: float = 1.0
    only: Tuple[str, ...] = SCENARIOS


class Bench:
    """The pieces scenarios share: the template, multiprocessing, the timing helpers."""

    def __init__(self, settings: Settings, progress: B.Progress,
                 stack: contextlib.ExitStack) -> None:
        from .. import _default
        from .._template import Template

        self.s, self.progress, self.stack = settings, progress, stack
        importlib.import_module(settings.preload)  # fails here, loudly, if it is missing
        if _default._default.template is None:  # ours: stop it when done
            stack.callback(stop_default_template)
        self.tpl = Template().require(settings.preload, "forkserver._bench._workers")
        stack.callback(self.tpl.close)
        self.tpl_no_spare = None
        if "back_to_back" in settings.only:
            self.tpl_no_spare = Template(spare=False).require(
                settings.preload, "forkserver._bench._workers")
            stack.callback(self.tpl_no_spare.close)
        self.helpers: Dict[str, B.Helper] = {}
        for kind, needed in (("fork", ("start", "back_to_back")), ("forkserver", ("big_parent",)),
                             ("fork_ran", ("start_ran",))):
            if set(needed) & set(settings.only):  # started now: they warm up meanwhile
                helper = B.Helper(kind, settings.preload)
                self.helpers[kind] = stack.enter_context(contextlib.closing(helper))
        stack.enter_context(B.main_module_hidden())
        self.mp_fs = stack.enter_context(B.mp_forkserver_preloaded([settings.preload]))
        import multiprocessing

        self.mp_spawn = multiprocessing.get_context("spawn")

    def measure(self, contenders: List[B.Contender], rounds: Optional[int] = None) -> None:
        """Interleave ``contenders`` for the configured rounds (or ``rounds``)."""
        B.measure(contenders, self.s.rounds if rounds is None else rounds,
                  self.s.warmup, self.progress.tick)

    def forkserver_work(self, tpl=None, name: str = FS, settled: bool = True) -> Callable[[], float]:
        """Sampler: a worker from this process's template, started, ran, reaped.

        ``settled``: then wait (untimed) until the template's next spare is ready.
        """
        tpl = self.tpl if tpl is None else tpl
        return B.timed(name, lambda: start_and_reap(tpl, "forkserver._bench._workers:work"),
                       (lambda: settle(tpl)) if settled else None)

    def mp_work(self, ctx, name: str) -> Callable[[], float]:
        """Sampler: a multiprocessing worker whose target imports the preload module."""
        return B.timed(name, lambda: B.mp_start_and_reap(
            ctx, importlib.import_module, (self.s.preload,)))


def start(bench: Bench) -> Scenario:
    """Worker start -> ran -> reaped, preload module loaded, from this (small) process."""
    s = bench.s
    sc = Scenario("start", f"start -> ran -> reaped, {s.preload} preloaded", "ms")
    sc.contenders = [
        B.Contender(FS, bench.forkserver_work()),
        B.Contender(MP_FS, bench.mp_work(bench.mp_fs, MP_FS)),
        B.Contender(FORK_FLOOR, bench.helpers["fork"].once),
    ]
    if s.spawn_samples > 0:
        spawn = B.Contender(MP_SPAWN, bench.mp_work(bench.mp_spawn, MP_SPAWN), s.spawn_samples)
        sc.contenders.insert(2, spawn)
    bench.measure(sc.contenders)
    sc.notes.append(f"{FORK_FLOOR} = the floor: os.fork + _exit + waitpid in a process "
                    f"that imported {s.preload} only")
    return sc


def back_to_back(bench: Bench) -> Scenario:
    """Workers one right after the other: a spare clone gets no idle time to get ready.

    In ``start`` the other contenders' turns give forkserver's template time
    to make its next spare clone; here each sample is the mean of BLOCK
    workers started back to back, so a spare is made while the last worker
    runs and exits, or not at all (``spare=False``).
    """
    sc = Scenario("back_to_back", f"back to back, {BLOCK} in a row (mean per worker)", "ms")
    sc.contenders = [
        B.Contender(FS, _block(bench.forkserver_work(settled=False), lambda: settle(bench.tpl))),
        B.Contender(FS_NO_SPARE, _block(bench.forkserver_work(bench.tpl_no_spare, FS_NO_SPARE))),
        B.Contender(MP_FS, _block(bench.mp_work(bench.mp_fs, MP_FS))),
        B.Contender(FORK_FLOOR, _block(bench.helpers["fork"].once)),
    ]
    bench.measure(sc.contenders, rounds=max(1, bench.s.rounds // BLOCK))
    sc.notes.append(f"{FS_NO_SPARE} = a template that keeps no spare clone ready")
    return sc


def _block(once: Callable[[], float], after: Optional[Callable[[], None]] = None) -> Callable[[], float]:
    """Sampler: the mean of BLOCK samples of ``once`` taken back to back (then ``after``, untimed)."""

    def block() -> float:
        mean = sum(once() for _ in range(BLOCK)) / BLOCK
        if after is not None:
            after()
        return mean

    return block


def big_parent(bench: Bench) -> Scenario:
    """The same from a parent holding ``parent_gib`` GiB of touched memory."""
    s = bench.s
    sc = Scenario("big_parent", f"the same, from a parent holding {s.parent_gib:g} GiB", "ms")
    fs = B.Contender(FS, bench.forkserver_work())
    small = B.Contender(FS_SMALL, bench.helpers["forkserver"].once)
    here = B.Contender(FORK_HERE, B.timed(FORK_HERE, bare_fork), s.big_fork_samples)
    sc.contenders = [fs, small, here]
    bench.progress.status(f"allocating and touching {s.parent_gib:g} GiB")
    ballast = B.ballast(s.parent_gib)
    try:
        bench.measure([fs, small])
        # Alone, afterwards: a fork write-protects all of this process's memory,
        # and the copy-on-write faults that follow would be charged to
        # whichever contender of this process ran next.
        with warnings.catch_warnings():  # 3.12+: "multi-threaded, use of fork()"
            warnings.simplefilter("ignore", DeprecationWarning)
            bench.progress.status(f"{FORK_HERE} ...")
            bench.measure([here], rounds=s.big_fork_samples)
    finally:
        del ballast
        gc.collect()
    sc.notes.append(f"{FS_SMALL} = the same from a small helper process (interleaved)")
    sc.notes.append(f"{FORK_HERE} = os.fork + _exit + waitpid here, measured after the others")
    return sc


def exec_true(bench: Bench) -> Scenario:
    """Exec of /bin/true and its exit status: forkserver.spawn, subprocess, posix_spawn."""
    from .._programs._spawn import spawn

    sc = Scenario("exec", f"exec {TRUE} -> exit status", "ms")
    sc.contenders = [
        B.Contender(FS_SPAWN, B.timed(FS_SPAWN, lambda: _spawn_true(spawn))),
        B.Contender(SUBPROCESS, B.timed(SUBPROCESS, lambda: subprocess.run([TRUE]).returncode)),
        B.Contender(POSIX_SPAWN, B.timed(POSIX_SPAWN, _posix_spawn_true)),
    ]
    bench.measure(sc.contenders)
    return sc


def _spawn_true(spawn) -> int:
    child = spawn([TRUE])
    try:
        return B.reap(child)
    finally:
        control = getattr(child, "control", None)
        if control is not None:
            control.close()


def _posix_spawn_true() -> int:
    pid = os.posix_spawn(TRUE, [TRUE], os.environ)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def idle_uss(bench: Bench) -> Scenario:
    """USS of idle workers with the preload module loaded (psutil)."""
    s = bench.s
    sc = Scenario("idle_uss", f"idle worker USS, {s.preload} loaded", "MiB")
    jobs = [(FS, s.idle_workers, lambda n: B.idle_uss_forkserver(bench.tpl, n)),
            (MP_FS, s.idle_workers, lambda n: B.idle_uss_mp(bench.mp_fs, s.preload, n)),
            (MP_SPAWN, s.idle_spawn_workers, lambda n: B.idle_uss_mp(bench.mp_spawn, s.preload, n))]
    for i, (name, count, measure) in enumerate(jobs):
        if count > 0:
            contender = B.Contender(name, None)
            try:
                contender.samples = measure(count)
            except Exception as exc:  # reported in the table; the others still run
                contender.fail(exc)
            sc.contenders.append(contender)
            bench.progress.tick(i + 1, len(jobs))
    sc.notes.append("n = workers alive at once, each blocked on its socket or pipe")
    return sc


RUNNERS = {"start": start, "back_to_back": back_to_back, "big_parent": big_parent, "exec": exec_true,
           "idle_uss": idle_uss}
TITLES = {"start": "worker start -> ran -> reaped", "back_to_back": "workers back to back",
          "big_parent": "the same from a big parent",
          "exec": f"exec {TRUE}", "idle_uss": "idle worker USS"}
RUNNERS.update(start_ran=_latency.start_ran, first_reply=_latency.first_reply, zygote=_zygote.zygote,
               supervise=_supervise.supervise)
TITLES.update(start_ran="worker start -> ran", first_reply="new template -> first reply",
              zygote="script start via a zygote", supervise="restart latency")
RUNNERS.update(_mp.runners(Scenario))
TITLES.update(_mp.TITLES)
RUNNERS.update(_executor.runners(Scenario))
TITLES.update(_executor.TITLES)


def run(settings: Settings, progress: B.Progress) -> List[Scenario]:
    """Run the selected scenarios in one process run; everything started is stopped."""
    results = []
    with contextlib.ExitStack() as stack:
        progress.step(f"starting: template, helpers ({settings.preload} preloaded)")
        bench = Bench(settings, progress, stack)
        for key in SCENARIOS:
            if key in settings.only:
                progress.step(TITLES[key])
                results.append(RUNNERS[key](bench))
    return results
