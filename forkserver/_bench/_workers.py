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


def timing_server(kind: str, preload: str) -> None:
    """Serve timing requests: per line on stdin, one sample; answer "<ns> <status>".

    Runs in a small helper process that imported ``preload``: ``kind`` "fork"
    times :func:`bare_fork` (the floor), "forkserver" times a worker started
    from a template of this small process.  The parent sends requests in its
    round-robin, so the helper takes its turn like any contender.  It ends
    when its stdin closes.
    """
    # Ctrl-C reaches the whole process group: the benchmark ends us (stdin EOF).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    importlib.import_module(preload)
    tpl = None
    if kind == "fork":
        once = bare_fork
    elif kind == "forkserver":
        from forkserver._template import Template

        tpl = Template().require(preload, MODULE)

        def once() -> int:
            return start_and_reap(tpl, f"{MODULE}:work")
    else:
        raise SystemExit(f"timing_server: unknown kind {kind!r}")
    try:
        _serve(once, tpl)
    finally:
        if tpl is not None:
            tpl.close()
            stop_default_template()


def _serve(once, tpl=None) -> None:
    """Answer each request line with one timed sample (``tpl``: settled after each)."""
    stdin, stdout = sys.stdin.buffer, sys.stdout
    while stdin.readline():
        t0 = time.perf_counter_ns()
        status = once()
        elapsed = time.perf_counter_ns() - t0
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
        default._default.shutdown()  # type: ignore[attr-defined]


if __name__ == "__main__":  # python .../forkserver/_bench/_workers.py KIND PRELOAD
    # sys.path[0] is forkserver/_bench/ itself: put the directory that holds forkserver/ there.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    timing_server(sys.argv[1], sys.argv[2])
