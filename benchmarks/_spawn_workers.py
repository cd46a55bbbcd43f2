"""Worker functions for ``benchmarks/spawn.py``.

They live in an importable module (not ``__main__``) so that both a
forkserver template and a multiprocessing forkserver can resolve them by
name.  Importing this module imports the module named by the environment
variable ``FORKSERVER_BENCH_PRELOAD`` (the benchmark's ``--preload``), so every
contender's worker has it loaded: preloaded in a forkserver template or a
multiprocessing forkserver, imported afresh by a "spawn" child.  The workers
do no work: what is measured is the cost of getting such a process.
"""
from __future__ import annotations

import importlib
import os
import signal
import sys
import time

# The module the benchmark preloads (``--preload``): importing this module
# imports it, so a multiprocessing "spawn" child pays for it like a real one.
PRELOAD_ENV = "FORKSERVER_BENCH_PRELOAD"
if os.environ.get(PRELOAD_ENV):
    importlib.import_module(os.environ[PRELOAD_ENV])


def work(control) -> None:
    """forkserver worker: returns at once (exit status 0 proves it ran)."""


def idle(control) -> None:
    """forkserver worker that stays idle until the parent closes its control socket."""
    control.sendall(b"r")  # "I am up": the parent measures USS only after this
    while control.recv(4096):
        pass


def work_noarg() -> None:
    """multiprocessing worker: returns at once (exitcode 0 proves it ran)."""


def idle_noarg(conn) -> None:
    """multiprocessing worker idle until the parent closes its end of ``conn``."""
    conn.send_bytes(b"r")
    try:
        conn.recv_bytes()
    except EOFError:
        pass


# -- timing helpers run in a small, separate process -----------------------------
#
# ``python -c "...; timing_server(kind)"``: for every line read on stdin, run one
# iteration of ``kind`` and answer "<nanoseconds> <status>".  The parent sends
# requests round-robin with its own contenders; this process stays small, so a
# big benchmark parent (--parent-mib) does not slow these down.


def bare_fork() -> int:
    """os.fork + os._exit(0) in the child + waitpid; the exit status.

    SIGINT is held back meanwhile (two cheap syscalls): a KeyboardInterrupt
    raised as fork() returns would leave the child unreaped.
    """
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        return os.waitpid(pid, 0)[1]
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def timing_server(kind: str) -> None:
    # Ctrl-C reaches the whole process group: let the benchmark decide, and
    # end us by closing our stdin.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    tpl = None
    if kind == "fork":
        once = bare_fork
    elif kind == "forkserver":
        import forkserver

        tpl = forkserver.Template().require(__name__)

        def once() -> int:
            child = tpl.fork().run(f"{__name__}:work")
            try:
                return child.wait(timeout=60)
            finally:
                child.control.close()
                if child.poll() is None:  # wait() timed out: never leave it running
                    os.kill(child.pid, 9)
                    child.wait()
    else:
        raise SystemExit(f"timing_server: unknown kind {kind!r}")
    try:
        stdin, stdout = sys.stdin.buffer, sys.stdout
        while stdin.readline():
            t0 = time.perf_counter_ns()
            status = once()
            elapsed = time.perf_counter_ns() - t0
            stdout.write(f"{elapsed} {status}\n")
            stdout.flush()
    finally:
        if tpl is not None:
            tpl.close()
            stop_default_template()


def stop_default_template() -> None:
    """Close and reap forkserver's default template of this process, if any.

    It would exit by itself once this process exits, but as an orphan; there is
    no public API for this yet, so this is best effort on a private one.
    """
    forkserver = sys.modules.get("forkserver")
    try:
        forkserver._template._default.template.close()  # type: ignore[union-attr]
    except Exception:
        pass  # never started, or the private API changed
