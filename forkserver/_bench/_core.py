"""Measuring core of ``python -m forkserver bench`` (parent side).

A *contender* is one way of getting a process; ``once()`` takes one sample.
``measure`` runs contenders round-robin (A B C A B C ...) after a warm-up, so
machine drift hits them alike.  The rest are the pieces the scenarios share:
timing helper processes, the multiprocessing targets, USS of idle workers,
memory ballast and cleanup of the long-lived servers.

multiprocessing workers never import ``forkserver``: their target is
``importlib.import_module(preload)`` (a dict lookup where the module is
preloaded, a real import in a spawn child) or ``exec`` of a few lines, so
they pay for the preload module and multiprocessing, nothing of ours.
"""
from __future__ import annotations

import contextlib
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, TextIO

TIMEOUT = 60.0  # seconds any single wait may take before we call it a hang
MIB = 1 << 20
GIB = 1 << 30
PAGE = 4096

# An idle multiprocessing worker (run with exec, `conn` bound): import the
# preload module, say "up", block until the parent closes its end.
MP_IDLE_SOURCE = """\
import {preload}
conn.send_bytes(b"r")
try:
    conn.recv_bytes()
except EOFError:
    pass
"""


@dataclass
class Contender:
    """One way of getting a process: ``once()`` returns one sample (ms or MiB).

    ``limit`` caps the samples of slow contenders (spread evenly over the
    rounds); ``once`` None means "not available", explained by ``note``.
    A contender whose sample raised is ``failed``: it takes no more samples,
    keeps none, and ``note`` says what went wrong.
    """

    name: str
    once: Optional[Callable[[], float]]
    limit: Optional[int] = None
    note: Optional[str] = None
    samples: List[float] = field(default_factory=list)
    failed: bool = False

    def fail(self, exc: BaseException) -> None:
        """Record that a sample raised ``exc``: the run goes on without this contender."""
        self.failed, self.once, self.samples = True, None, []
        self.note = f"failed: {type(exc).__name__}: {exc}"

    def due(self, r: int, rounds: int) -> bool:
        """Whether round ``r`` (0-based) takes a sample of this contender."""
        if self.limit is None:
            return True
        every = max(1, rounds // max(1, self.limit))
        return r % every == 0 and len(self.samples) < self.limit


@dataclass
class Scenario:
    """One table section: ``contenders[0]`` is forkserver's (the ratio base).

    Scenario modules (``_bench/_<name>.py``) build these from ``_core``
    alone; ``goals`` holds the keyword arguments of the goals they check
    (``text``, ``value``, ``limit``, ``unit``, optionally ``at_least``,
    ``hint``), which the report adds to the DESIGN.md ones.
    """

    key: str
    title: str
    unit: str
    contenders: List[Contender] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    goals: List[dict] = field(default_factory=list)

    def get(self, name: str) -> Optional[Contender]:
        """The contender called ``name``, if it is in this scenario."""
        return next((c for c in self.contenders if c.name == name), None)

    def median(self, name: str) -> Optional[float]:
        """The median of contender ``name``'s samples (None: not run, or failed)."""
        c = self.get(name)
        stats = None if c is None else summary(c.samples)
        return None if stats is None else stats["median"]


def sample(contender: Contender) -> Optional[float]:
    """One sample of ``contender``, or None if it failed (then it is marked failed)."""
    try:
        return contender.once()  # type: ignore[misc]
    except Exception as exc:  # KeyboardInterrupt still ends the run
        contender.fail(exc)
        return None


def timed(name: str, start_and_reap: Callable[[], int],
          after: Optional[Callable[[], None]] = None) -> Callable[[], float]:
    """Wrap a function returning an exit status into a sampler returning milliseconds.

    ``after`` runs untimed after each sample: it waits for the contender's
    background work, so that it is not charged to the next contender.
    """

    def once() -> float:
        t0 = time.perf_counter()
        status = start_and_reap()
        elapsed = time.perf_counter() - t0
        if after is not None:
            after()
        if status != 0:
            raise RuntimeError(f"{name}: the process exited with status {status}")
        return elapsed * 1e3

    return once


def measure(contenders: List[Contender], rounds: int, warmup: int,
            tick: Optional[Callable[[int, int], None]] = None) -> None:
    """Round-robin over ``contenders`` for ``rounds`` rounds after ``warmup`` rounds.

    Slow (limited) contenders warm up once only.  The garbage collector is
    off meanwhile, so no collection pause lands inside a sample.  Samples
    follow each other without a pause (a pause was tried: after 2 ms of
    idling, every contender got slower and noisier on this VM); contenders'
    own background work is waited for by their samplers (``timed``'s
    ``after``), so it is not charged to the next one.
    """
    runnable = [c for c in contenders if c.once is not None and c.limit != 0]
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(-warmup, rounds):
            for c in runnable:
                if c.failed:
                    continue
                if r < 0 and (c.limit is None or r == -warmup):
                    sample(c)
                elif r >= 0 and c.due(r, rounds):
                    value = sample(c)
                    if value is not None:
                        c.samples.append(value)
            if tick is not None and r >= 0:
                tick(r + 1, rounds)
    finally:
        if enabled:
            gc.enable()


def percentile(samples: List[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``samples``, nearest rank."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(samples: List[float]) -> Optional[dict]:
    """Median and p90 of ``samples``, or None when there are none."""
    if not samples:
        return None
    return {"n": len(samples), "median": statistics.median(samples),
            "p90": percentile(samples, 0.9)}


class Progress:
    """A progress line on stderr: updated in place on a tty, plain lines otherwise."""

    def __init__(self, steps: int, stream: Optional[TextIO] = None) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.tty = self.stream.isatty()
        self.steps, self.step_no, self.label = steps, 0, ""
        self.t0 = self.last = time.monotonic()

    def step(self, label: str) -> None:
        """Start the next step of the run."""
        self.step_no += 1
        self.label = label
        self._show(f"{label} ...", newline=not self.tty)

    def status(self, text: str) -> None:
        """A sub-step of the current step (a line of its own when not on a tty)."""
        self._show(f"{self.label}: {text}", newline=not self.tty)

    def tick(self, done: int, total: int) -> None:
        """Report ``done`` of ``total`` rounds of the current step (tty only, 10 Hz)."""
        now = time.monotonic()
        if self.tty and (now - self.last >= 0.1 or done == total):
            self.last = now
            self._show(f"{self.label}: {done}/{total}", newline=False)

    def close(self) -> None:
        """End the progress display (clears the line on a tty)."""
        if self.tty:
            self.stream.write("\r\033[K")
        else:
            self.stream.write(f"bench: done in {time.monotonic() - self.t0:.1f} s\n")
        self.stream.flush()

    def _show(self, text: str, newline: bool) -> None:
        elapsed = time.monotonic() - self.t0
        line = f"bench [{self.step_no}/{self.steps}] {elapsed:5.1f} s  {text}"
        self.stream.write(line + "\n" if newline else "\r\033[K" + line)
        self.stream.flush()


class HelperError(RuntimeError):
    """A timing helper process failed; the message has its exit status and last error line."""


class Helper:
    """A small process running ``_workers.timing_server``: one sample per request.

    It gets our ``sys.path`` (so a ``--preload`` module importable only from
    here -- the current directory, a path added at run time -- is importable
    there too) and its stderr goes to a file, so that a failure is reported
    with the helper's own last words instead of a broken pipe.
    """

    def __init__(self, kind: str, preload: str, argv: Optional[List[str]] = None) -> None:
        """``argv``: another program speaking the same line protocol (default: ``_workers.py``)."""
        if argv is None:
            script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_workers.py")
            argv = [sys.executable, script, kind, preload, os.pathsep.join(sys.path)]
        self.kind = kind
        self.errors = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.errors,
        )

    def once(self) -> float:
        """One sample, timed inside the helper; milliseconds."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(b"\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = b""
        if not line:
            raise HelperError(self._died())
        nanoseconds, status = map(int, line.split())
        if status != 0:
            raise HelperError(f"timing helper {self.kind!r}: worker exit status {status}")
        return nanoseconds / 1e6

    def _died(self) -> str:
        try:
            code = self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.errors.seek(0)
        lines = self.errors.read().decode(errors="replace").strip().splitlines()
        last = lines[-1] if lines else "no error output"
        return f"timing helper {self.kind!r} exited with status {code}: {last}"

    def close(self) -> None:
        """EOF on its stdin: the helper exits (closing its template); reap it."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.close()
        try:
            self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        self.errors.close()


def mp_start_and_reap(ctx, target: Callable, args: tuple = ()) -> int:
    """Start a multiprocessing Process, join it (killed if it hangs); its exit code."""
    proc = ctx.Process(target=target, args=args)
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


def uss_mib(pids: List[int]) -> List[float]:
    """The USS (unique set size, psutil) of each process, in MiB."""
    import psutil

    return [psutil.Process(pid).memory_full_info().uss / MIB for pid in pids]


def idle_uss_forkserver(tpl, count: int) -> List[float]:
    """USS of ``count`` idle forkserver workers cloned from ``tpl``."""
    children = []
    try:
        for _ in range(count):
            children.append(tpl.fork().run("forkserver._bench._workers:idle"))
        for child in children:  # each says "up" with one byte
            child.control.settimeout(TIMEOUT)
            if child.control.recv(1) != b"r":
                raise RuntimeError(f"idle forkserver worker {child.pid} did not start")
        return uss_mib([child.pid for child in children])
    finally:
        for child in children:
            child.control.close()  # EOF: the worker returns
            reap(child)


def reap(child) -> int:
    """Wait for a forkserver ``Child``; kill it if it hangs; its returncode."""
    try:
        return child.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        child.kill()
        return child.wait()


def idle_uss_mp(ctx, preload: str, count: int) -> List[float]:
    """USS of ``count`` idle multiprocessing workers of ``ctx`` with ``preload`` imported."""
    procs, conns = [], []
    source = MP_IDLE_SOURCE.format(preload=preload)
    try:
        for _ in range(count):  # all started before any is waited for
            ours, theirs = ctx.Pipe()
            conns.append(ours)
            try:
                proc = ctx.Process(target=exec, args=(source, {"conn": theirs}))
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
            proc.close()


def ballast(gib: float) -> bytearray:
    """``gib`` GiB held by this process, every page written (resident, private)."""
    buf = bytearray(int(gib * GIB))  # zero-filled by CPython: already written once
    buf[::PAGE] = b"\1" * len(range(0, len(buf), PAGE))  # and again, to be sure
    return buf


@contextlib.contextmanager
def main_module_hidden() -> Iterator[None]:
    """Keep multiprocessing children from re-running the main script.

    multiprocessing makes each spawn child (and the forkserver process) import
    the parent's ``__main__`` again, by ``__spec__`` name or ``__file__``.
    Importing it costs milliseconds that are no part of multiprocessing's own
    cost (and under pytest it would be pytest), so we take its best case:
    no main module, as for ``python -c``.
    """
    main = sys.modules["__main__"]
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__spec__ = None
    try:
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)


@contextlib.contextmanager
def mp_forkserver_preloaded(modules: List[str]) -> Iterator[object]:
    """multiprocessing's "forkserver" context preloading ``modules``.

    Afterwards its server and the resource tracker are stopped and reaped
    (each would exit by itself after this process, but we must leave no child
    behind) and the preload list restored.  Private APIs: best effort.
    """
    import multiprocessing
    from multiprocessing import forkserver as mp_forkserver, resource_tracker

    server = mp_forkserver._forkserver
    saved = list(getattr(server, "_preload_modules", ["__main__"]))
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(modules)
    try:
        yield ctx
    finally:
        for stop in (server._stop, resource_tracker._resource_tracker._stop):  # type: ignore[attr-defined]  # private: best effort
            with contextlib.suppress(Exception):
                stop()
        ctx.set_forkserver_preload(saved)
