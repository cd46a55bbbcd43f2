"""Start -> ran -> reaped latency of a worker with a module preloaded, and idle-worker memory.

Every sample is the wall time from "start a worker" until the worker has run
(exit status 0) and been reaped by the process that started it.  The worker's
module (``_spawn_workers``) imports the ``--preload`` module (numpy if
importable, else json).  Contenders, measured in ONE run and interleaved
round-robin (A B C D A B C D ...) after a warm-up (except the last):

  forkserver                 a Template with the module required; per sample
                             tpl.fork().run("_spawn_workers:work"), wait(),
                             close the control socket
  forkserver, small parent   the same, driven by a small helper process
                             (only with --parent-mib: the small-parent figure)
  mp forkserver              multiprocessing "forkserver" context with the
                             module preloaded; Process.start() + join()
                             (children do not re-run this script: see
                             main_file_hidden)
  mp spawn                   multiprocessing "spawn" context (n/10 samples;
                             --skip-spawn leaves it out)
  os.fork, small process     os.fork + os._exit(0) + waitpid in a small helper
                             process that imported the module: the floor
  os.fork in this process    the same here: with --parent-mib, the slow path
                             that forkserver avoids (measured alone, after the
                             others: see main)

The helpers time themselves and answer one request at a time, so they take
their turn in the round-robin.  Then the USS (psutil) of 16 idle workers with
the module loaded: forkserver workers blocked on their control socket vs
multiprocessing forkserver workers blocked on a Pipe.  The table ends with
the goals of DESIGN.md ("Numbers to beat"), evaluated on this run.

Run:
    python benchmarks/spawn.py                    # --n 200, about 15 s
    python benchmarks/spawn.py --quick            # a few seconds (CI)
    python benchmarks/spawn.py --parent-mib 4096  # the big-parent goal
    python benchmarks/spawn.py --skip-spawn --json spawn.json
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, Iterator, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
WORKERS = "_spawn_workers"  # the worker module, found on sys.path via HERE
TIMEOUT = 60.0  # seconds any single wait may take before we call it a hang
IDLE_WORKERS = 16
MIB = 1 << 20


class Contender:
    """One way of starting a worker; ``once()`` runs a sample, returns seconds."""

    def __init__(self, name: str, once: Callable[[], float], every: int = 1) -> None:
        self.name, self.once, self.every = name, once, every  # every: sample each k-th round
        self.samples: List[float] = []


def timed(name: str, start_and_reap: Callable[[], int]) -> Callable[[], float]:
    """Wrap a function returning an exit status into a sampler returning seconds."""

    def once() -> float:
        t0 = time.perf_counter()
        status = start_and_reap()
        elapsed = time.perf_counter() - t0
        if status != 0:
            raise RuntimeError(f"{name}: the worker exited with status {status}")
        return elapsed

    return once


def forkserver_start(tpl, target: str):
    """``tpl.fork().run(target)``, discarding the clone if ``run`` fails."""
    clone = tpl.fork()
    try:
        return clone.run(target)
    except BaseException:
        clone.close()
        raise


def forkserver_reap(child) -> int:
    """Close the control socket and reap the worker (killed if it hangs)."""
    child.control.close()
    try:
        return child.wait(timeout=TIMEOUT)
    finally:
        if child.poll() is None:
            os.kill(child.pid, 9)
            child.wait()


def mp_start_and_reap(ctx, target) -> int:
    proc = ctx.Process(target=target)
    proc.start()
    try:
        proc.join(TIMEOUT)
    finally:
        if proc.exitcode is None:
            proc.kill()
            proc.join()
    code = proc.exitcode
    proc.close()
    return code


class Helper:
    """A small process running ``_spawn_workers.timing_server(kind)``: one sample per request."""

    def __init__(self, kind: str) -> None:
        code = (f"import sys; sys.path.insert(0, {HERE!r}); import {WORKERS}; "
                f"{WORKERS}.timing_server({kind!r})")
        self.kind = kind
        self.proc = subprocess.Popen([sys.executable, "-c", code],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def once(self) -> float:
        self.proc.stdin.write(b"\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"timing helper {self.kind!r} died (exit status {self.proc.wait()})")
        nanoseconds, status = map(int, line.split())
        if status != 0:
            raise RuntimeError(f"timing helper {self.kind!r}: worker exit status {status}")
        return nanoseconds / 1e9

    def close(self) -> None:
        self.proc.stdin.close()  # EOF: the helper exits (closing its template)
        try:
            self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


def measure(contenders: List[Contender], rounds: int, warmup: int) -> None:
    """Round-robin: each round runs every contender once (sparse ones every k-th round)."""
    gc.collect()
    gc.disable()  # no collector pauses inside samples
    try:
        for r in range(-warmup, rounds):
            for c in contenders:
                if r < 0 and (c.every == 1 or r == -warmup):
                    c.once()  # warm-up: sparse (slow) contenders once only
                elif r >= 0 and r % c.every == 0:
                    c.samples.append(c.once())
    finally:
        gc.enable()


def uss_mib(pids: List[int]) -> float:
    import psutil

    return statistics.median(psutil.Process(pid).memory_full_info().uss / MIB for pid in pids)


def idle_uss_forkserver(tpl, count: int) -> float:
    children = []
    try:
        for _ in range(count):
            children.append(forkserver_start(tpl, f"{WORKERS}:idle"))
        for child in children:  # each says "up" with one byte
            child.control.settimeout(TIMEOUT)
            if child.control.recv(1) != b"r":
                raise RuntimeError(f"idle forkserver worker {child.pid} did not start")
        return uss_mib([child.pid for child in children])
    finally:
        for child in children:
            forkserver_reap(child)  # EOF on control: the worker returns


def idle_uss_mp(ctx, target, count: int) -> float:
    procs, conns = [], []
    try:
        for _ in range(count):
            ours, theirs = ctx.Pipe()
            conns.append(ours)
            try:
                proc = ctx.Process(target=target, args=(theirs,))
                proc.start()
                procs.append(proc)
            finally:
                theirs.close()  # the worker has its own copy: our close -> its EOF
        for conn in conns:
            if not conn.poll(TIMEOUT) or conn.recv_bytes() != b"r":
                raise RuntimeError("an idle multiprocessing worker did not start")
        return uss_mib([proc.pid for proc in procs])
    finally:
        for conn in conns:
            conn.close()
        for proc in procs:
            proc.join(TIMEOUT)
            if proc.exitcode is None:
                proc.kill()
                proc.join()


@contextlib.contextmanager
def main_file_hidden() -> Iterator[None]:
    """Keep multiprocessing children from re-running this script.

    multiprocessing makes each child run the parent's main script (as
    ``__mp_main__``) when ``__main__`` has a ``__file__``, and on CPython
    < 3.13 ``set_forkserver_preload(["__main__"])`` does not prevent it
    (python/cpython#126631).  Compiling and running this script costs
    milliseconds that are no part of multiprocessing's own cost, so we take
    its best case: no main script, as for ``python -c``.
    """
    main = sys.modules["__main__"]
    path = main.__dict__.pop("__file__", None)
    try:
        yield
    finally:
        if path is not None:
            main.__file__ = path


def stop_servers(workers) -> None:
    """Stop and reap the long-lived helper processes: forkserver's default
    template, multiprocessing's forkserver and resource tracker.  Each would
    exit by itself after this process; private APIs, so best effort."""
    from multiprocessing import forkserver as mp_forkserver, resource_tracker

    workers.stop_default_template()
    for stop in (lambda: mp_forkserver._forkserver._stop(),
                 lambda: resource_tracker._resource_tracker._stop()):
        try:
            stop()
        except Exception:
            pass  # not started, or the private API changed


def percentile(samples: List[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def goal(text: str, value: Optional[float], limit: float, unit: str, le: bool = True) -> dict:
    met = None if value is None else (value <= limit if le else value >= limit)
    return {"goal": text, "value": value, "limit": limit, "unit": unit, "met": met}


def report(args, contenders: List[Contender], uss: Dict[str, float]) -> dict:
    med = {c.name: statistics.median(c.samples) * 1e3 for c in contenders}
    base = med["forkserver"]
    print(f"\nPython {platform.python_version()}, {os.cpu_count()} CPUs, preload {args.preload}, "
          f"this process holds {args.parent_mib} MiB extra, n={args.n}")
    print(f"{'contender':<28}{'n':>5}{'median ms':>11}{'p90 ms':>10}{'vs forkserver':>15}")
    rows = {}
    for c in contenders:
        p90 = percentile(c.samples, 0.9) * 1e3
        ratio = med[c.name] / base
        print(f"{c.name:<28}{len(c.samples):>5}{med[c.name]:>11.3f}{p90:>10.3f}{ratio:>14.2f}x")
        rows[c.name] = {"n": len(c.samples), "median_ms": med[c.name], "p90_ms": p90,
                        "ratio": ratio, "samples_ms": [s * 1e3 for s in c.samples]}
    print(f"idle worker USS (median of {IDLE_WORKERS}): forkserver {uss['forkserver']:.2f} MiB, "
          f"mp forkserver {uss['mp forkserver']:.2f} MiB")

    small = med.get("forkserver, small parent")
    big = f"a {args.parent_mib} MiB parent" if args.parent_mib else "a 4096 MiB parent"
    goals = [
        goal("forkserver >= 3x faster than mp forkserver",
             med["mp forkserver"] / base, 3.0, "x", le=False),
        goal("forkserver <= 1.3x bare fork of a small process with the module",
             base / med["os.fork, small process"], 1.3, "x"),
        goal(f"forkserver from {big} <= 1.1x the small-parent figure",
             None if small is None else base / small, 1.1, "x"),
        goal("idle forkserver worker USS <= 1.5 MiB", uss["forkserver"], 1.5, "MiB"),
    ]
    print("goals (DESIGN.md, this run):")
    for g in goals:
        if g["value"] is None:
            shown, verdict = "n/a", "(run with --parent-mib 4096)"
        else:
            shown, verdict = f"{g['value']:.2f} {g['unit']}", "met" if g["met"] else "MISSED"
        print(f"  {g['goal']:<66}{shown:>10}  {verdict}")
    return {"python": platform.python_version(), "cpus": os.cpu_count(), "preload": args.preload,
            "parent_mib": args.parent_mib, "n": args.n, "contenders": rows, "idle_uss_mib": uss,
            "goals": goals}


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    default_preload = "numpy" if importlib.util.find_spec("numpy") else "json"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="samples per contender (default 200)")
    parser.add_argument("--quick", action="store_true", help="CI-sized run: a few seconds")
    parser.add_argument("--parent-mib", type=int, default=0, metavar="M",
                        help="allocate and touch M MiB in this process first (design goal: 4096)")
    parser.add_argument("--preload", default=default_preload, metavar="MODULE",
                        help=f"module the workers have loaded (default here: {default_preload})")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--skip-spawn", action="store_true",
                        help="leave out the slow mp spawn contender")
    args = parser.parse_args(argv)
    if args.quick:
        args.n = min(args.n, 20)
    if args.n < 1:
        parser.error("--n must be at least 1")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    # Set before anything starts: templates, helpers and multiprocessing
    # servers inherit sys.path/the environment, so all find the worker module,
    # and importing it imports the preload module.
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    os.environ["FORKSERVER_BENCH_PRELOAD"] = args.preload
    ballast = bytearray(args.parent_mib * MIB)
    ballast[::4096] = b"\1" * len(range(0, len(ballast), 4096))  # touch every page
    workers = importlib.import_module(WORKERS)  # the preload module, here too

    import multiprocessing

    import forkserver

    with contextlib.ExitStack() as cleanup:
        cleanup.callback(stop_servers, workers)
        tpl = forkserver.Template().require(args.preload, WORKERS)
        cleanup.callback(tpl.close)
        cleanup.enter_context(main_file_hidden())
        mp_fs = multiprocessing.get_context("forkserver")
        mp_fs.set_forkserver_preload([args.preload, WORKERS])
        work = f"{WORKERS}:work"
        contenders: List[Contender] = []

        def add(name: str, start_and_reap: Callable[[], int], every: int = 1) -> None:
            contenders.append(Contender(name, timed(name, start_and_reap), every))

        # Closing the control socket first is harmless here (work() ignores it).
        add("forkserver", lambda: forkserver_reap(forkserver_start(tpl, work)))
        if args.parent_mib > 0:  # the small-parent figure, in the same run
            small = cleanup.enter_context(contextlib.closing(Helper("forkserver")))
            contenders.append(Contender("forkserver, small parent", small.once))
        add("mp forkserver", lambda: mp_start_and_reap(mp_fs, workers.work_noarg))
        if not args.skip_spawn:  # about n/10 samples: one every k-th round
            mp_spawn = multiprocessing.get_context("spawn")
            add("mp spawn", lambda: mp_start_and_reap(mp_spawn, workers.work_noarg),
                every=max(1, args.n // max(3, args.n // 10)))
        floor = cleanup.enter_context(contextlib.closing(Helper("fork")))
        contenders.append(Contender("os.fork, small process", floor.once))
        warmup = 2 if args.quick else 5
        measure(contenders, args.n, warmup)
        # Alone, afterwards: a fork write-protects all of this process's memory,
        # and the copy-on-write faults that follow (~0.5 ms here) would be
        # charged to whichever contender of this process ran next.
        add("os.fork in this process", workers.bare_fork)
        measure(contenders[-1:], args.n, warmup)
        uss = {"forkserver": idle_uss_forkserver(tpl, IDLE_WORKERS),
               "mp forkserver": idle_uss_mp(mp_fs, workers.idle_noarg, IDLE_WORKERS)}

    result = report(args, contenders, uss)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    del ballast
    return 0


if __name__ == "__main__":
    sys.exit(main())
