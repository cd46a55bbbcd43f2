"""Worker code for ``python -m forkserver bench``.

These functions run in other processes: ``work`` and ``idle`` in forkserver
workers (the template requires this module), ``timing_server`` in the small
timing helper processes, which run this file as a script so that the "fork"
helper does not import the ``forkserver`` package (which makes every later
``os.fork`` of that process slower: it would not be the floor we compare
with).  multiprocessing workers never import this module either (see
``forkserver._bench._core``).  The workers do no work: what is measured is the cost
of getting such a process.
"""
from __future__ import annotations

import importlib
import os
import signal
import sys
import time

TIMEOUT = 60.0  # seconds any single wait may take before we call it a hang
MODULE = "forkserver._bench._workers"  # our name, also when run as a script


def work(control) -> None:
    """forkserver worker: returns at once (exit status 0 proves it ran)."""


def ran(control) -> None:
    """forkserver worker: sends the moment it began (``time.perf_counter_ns``, 8 bytes).

    ``perf_counter`` is ``CLOCK_MONOTONIC`` on Linux: one clock for every
    process of the machine, so the parent can subtract its own reading.
    """
    control.sendall(time.perf_counter_ns().to_bytes(8, "little"))


def idle(control) -> None:
    """forkserver worker that stays idle until the parent closes its control socket."""
    control.sendall(b"r")  # "I am up": the parent measures USS only after this
    while control.recv(4096):
        pass


def bare_fork() -> int:
    """os.fork + os._exit(0) in the child + waitpid; returns the exit status.

    SIGINT is held back meanwhile (two cheap syscalls): a KeyboardInterrupt
    raised as fork() returns would leave the child unreaped.
    """
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def bare_fork_ran() -> "tuple[int, int]":
    """(ns from os.fork() to the child's first line, exit status): the floor of start -> ran."""
    r, w = os.pipe()
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        t0 = time.perf_counter_ns()
        pid = os.fork()
        if pid == 0:
            os.write(w, time.perf_counter_ns().to_bytes(8, "little"))
            os._exit(0)
        os.close(w)
        begin = int.from_bytes(os.read(r, 8), "little")
        status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        return begin - t0, status
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.close(r)
        try:
            os.close(w)
        except OSError:
            pass  # closed above


def _timed_ns(once):
    """A sampler returning (elapsed ns, exit status) around ``once()``."""
    def sample():
        t0 = time.perf_counter_ns()
        status = once()
        return time.perf_counter_ns() - t0, status

    return sample


def timing_server(kind: str, preload: str) -> None:
    """Serve timing requests: per line on stdin, one sample; answer "<ns> <status>".

    Runs in a small helper process that imported ``preload``: ``kind`` "fork"
    times :func:`bare_fork` (the floor), "fork_ran" :func:`bare_fork_ran` (the
    floor of start -> ran), "forkserver" times a worker started from a
    template of this small process.  The parent sends requests in its
    round-robin, so the helper takes its turn like any contender.  It ends
    when its stdin closes.
    """
    # Ctrl-C reaches the whole process group: the benchmark ends us (stdin EOF).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    importlib.import_module(preload)
    tpl = None
    if kind == "fork":
        sample = _timed_ns(bare_fork)
    elif kind == "fork_ran":
        sample = bare_fork_ran
    elif kind == "forkserver":
        from forkserver._template import Template

        tpl = Template().require(preload, MODULE)
        sample = _timed_ns(lambda: start_and_reap(tpl, f"{MODULE}:work"))
    else:
        raise SystemExit(f"timing_server: unknown kind {kind!r}")
    try:
        _serve(sample, tpl)
    finally:
        if tpl is not None:
            tpl.close()
            stop_default_template()


def _serve(sample, tpl=None) -> None:
    """Answer each request line with one sample, (ns, status) (``tpl``: settled after each)."""
    stdin, stdout = sys.stdin.buffer, sys.stdout
    while stdin.readline():
        elapsed, status = sample()
        if tpl is not None:
            settle(tpl)
        stdout.write(f"{elapsed} {status}\n")
        stdout.flush()


def start_and_reap(tpl, target: str) -> int:
    """``tpl.fork().run(target)``, close the control socket, reap; the exit status.

    A clone whose ``run`` fails is closed; a worker that hangs is killed.
    """
    clone = tpl.fork()
    try:
        child = clone.run(target)
    except BaseException:
        clone.close()
        raise
    child.control.close()  # harmless: work() ignores it; idle() ends on it
    try:
        return child.wait(timeout=TIMEOUT)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def settle(tpl) -> None:
    """Wait, untimed, until ``tpl``'s next spare clone is ready (it greets once it is).

    forkserver makes that clone in the background once a worker is reaped;
    without this wait it would run during the next contender's sample and
    slow that one down (measured: mp forkserver 5 % slower right after a
    forkserver sample), flattering our ratios.  Private API: our own code.
    """
    spare = tpl._spare
    if spare is not None:
        _ = spare.pid  # reads its greeting


def stop_default_template() -> None:
    """Close and reap forkserver's default template of this process, if any.

    It would exit by itself once this process exits, but as an orphan; there is
    no public API for this yet, so this is best effort on a private one.
    """
    default = sys.modules.get("forkserver._default")
    if default is not None:  # else it was never started
        default._default.shutdown()


if __name__ == "__main__":  # python .../forkserver/_bench/_workers.py KIND PRELOAD SYS_PATH
    # sys.path[0] is forkserver/_bench/ itself: put the directory that holds
    # forkserver/ there, then the benchmark's own sys.path (os.pathsep-joined).
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.path[:] = [here] + (sys.argv[3].split(os.pathsep) if len(sys.argv) > 3 else sys.path[1:])
    timing_server(sys.argv[1], sys.argv[2])
