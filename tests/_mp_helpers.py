"""Helpers of the mp_context tests: leak checks that know a context's waiting child, interrupts.

A context keeps one child started and waiting (``forkserver._pool._mp_warm``)
and replaces it after each start, so the plain ``no_leaks`` fixture would
see a new child (and its two fds) after every test.  ``mp_no_leaks`` waits
for that background work to settle and leaves the waiting children out,
and expects multiprocessing's resource tracker to run already
(``mp_tracker``: it is a child of ours that the first ``start()`` makes).
"""
from __future__ import annotations

import contextlib
import dis
import gc
import os
import sys
import threading
import time
import traceback
from typing import Any, Callable, Dict, Iterator, Set, Tuple

import pytest

import forkserver
from tests.conftest import _describe, child_pids, open_fds

SETTLE = 30.0  # seconds the background work of a context may take


def standing() -> Tuple[Set[int], Set[int]]:
    """(pids, fds) of every live context's waiting child, once its background work settled."""
    from forkserver._pool import _mp

    pids: Set[int] = set()
    fds: Set[int] = set()
    for ctx in list(_mp._contexts):
        warm = ctx._warm
        assert warm.settle(SETTLE), f"{ctx!r}: its waiting child was not made in {SETTLE}s"
        child = warm.standing()
        if child is not None:
            pids.add(child.pid)
            fds.add(child.control.fileno())
            if child._pidfd is not None:
                fds.add(child._pidfd)
    return pids, fds


def snapshot() -> Tuple[Set[int], Set[int]]:
    """(fds, children) now, minus those that stand by design.

    Besides the waiting children: multiprocessing's heap (``Value``,
    ``Array``) keeps its arenas, files under /dev/shm named ``pym-*``, for
    reuse as long as the process lives.
    """
    pids, fds = standing()
    fds = {fd for fd in open_fds() - fds if not _describe(fd).startswith("/dev/shm/pym-")}
    return fds, child_pids() - pids


@pytest.fixture
def mp_no_leaks(mp_tracker):
    """``no_leaks`` for tests of mp contexts: no fd or child left, waiting children aside."""
    from forkserver._reaper import reaper

    fds_before, kids_before = snapshot()
    yield
    gc.collect()  # a Process keeps its sentinel until collected (Pool: in cycles)
    assert reaper.wait_idle(10), "the reaper still waits for dropped processes"
    fds_after, kids_after = snapshot()
    # An fd gone by the time it is described was a background thread's, in
    # use for an instant (the context making its next waiting child): closed.
    described = {fd: _describe(fd) for fd in fds_after - fds_before}
    leaked = {fd: what for fd, what in described.items() if what != "?"}
    assert not leaked, f"fds leaked: {leaked}"
    assert not kids_after - kids_before, f"children left behind: {kids_after - kids_before}"


@contextlib.contextmanager
def module_context(ctx):
    """For a module-scoped fixture: ``ctx`` built now (not in the first test), closed at the end."""
    ctx._root_template()
    try:
        yield ctx
    finally:
        ctx.close()


@pytest.fixture(scope="module")
def mp_tracker():
    """multiprocessing's resource tracker, running for a module's tests, stopped after them.

    The first ``start()`` of a process starts it: a child of ours for as
    long as this process lives, which other modules' tests would count.
    """
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    yield
    resource_tracker._resource_tracker._stop()


class Injected(KeyboardInterrupt):
    """The KeyboardInterrupt ``interrupt_at_line`` raises."""


POOL = os.path.join(os.path.dirname(os.path.abspath(forkserver.__file__)), "_pool") + os.sep


@contextlib.contextmanager
def interrupt_at_line(n: int, where: str = POOL) -> Iterator[Callable[[], bool]]:
    """Raise ``Injected`` at the ``n``-th line event (1-based) of code under ``where`` meanwhile.

    Yields a function telling whether it was raised.  Only lines of files
    under ``where`` (by default ``forkserver/_pool/``) count; calls into
    other code are taken as atomic, as C calls are: the core's own
    interrupt safety is its tests' to check, and the standard library is
    not interrupt-safe everywhere (``socket.socketpair`` loses an fd when
    interrupted between its two wraps, ``threading.Condition.__exit__``
    keeps its lock when interrupted before releasing it).  Threads other
    than this one are not traced.
    """
    state = {"count": 0, "raised": False}

    def tracer(frame, event, arg):
        if (event == "line" and not state["raised"] and frame.f_code.co_filename.startswith(where)
                and frame.f_lasti not in _with_exits(frame.f_code)):
            state["count"] += 1
            if state["count"] == n:
                state["raised"] = True
                stack = "".join(traceback.format_stack(frame, limit=8))
                raise Injected(f"injected at line event {n}, in\n{stack}")
        return tracer

    old = sys.gettrace()
    sys.settrace(tracer)
    try:
        yield lambda: state["raised"]
    finally:
        sys.settrace(old)


_exits: Dict[Any, Set[int]] = {}


def _with_exits(code: Any) -> Set[int]:
    """Offsets in ``code`` where a ``with`` block's normal exit starts (3.10+).

    That exit (``__exit__(None, None, None)``) is reported as a line event
    of the ``with`` line; an exception raised by a trace function there
    skips the ``__exit__`` call (a lock stays held).  A signal's
    KeyboardInterrupt cannot land there -- it is raised once the call has
    returned -- so these events are not interruption points.
    """
    found = _exits.get(code)
    if found is None:
        ins = [i for i in dis.get_instructions(code) if i.opname != "CACHE"]
        found = {
            ins[k].offset for k in range(len(ins) - 3)
            if all(i.opname == "LOAD_CONST" and i.argval is None for i in ins[k:k + 3])
            and ins[k + 3].opname in ("PRECALL", "CALL")
        }
        _exits[code] = found
    return found


def every_interruption(call: Callable[[], None], check: Callable[[], None], every: int = 1,
                       limit: int = 100000) -> int:
    """Run ``call`` with a KeyboardInterrupt injected at line event 1, 1 + every, ... until a
    run completes; ``check()`` runs after each.  Returns how many runs were interrupted."""
    injected = 0
    for n in range(1, limit, every):
        if os.environ.get("FS_DEBUG_INJECT"):
            with open(os.environ["FS_DEBUG_INJECT"], "a") as f:
                f.write(f"{n}\n")
        where = None
        try:
            with interrupt_at_line(n) as raised:
                call()
        except Injected as exc:
            injected += 1
            where = str(exc)
            if os.environ.get("FS_DEBUG_INJECT"):
                with open(os.environ["FS_DEBUG_INJECT"], "a") as f:
                    f.write(where + "\n")
        try:
            check()
        except AssertionError as exc:
            where = where or "swallowed"
            raise AssertionError(f"after the KeyboardInterrupt {where}: {exc}") from None
        if not raised():
            return injected
    raise AssertionError(f"{call!r} was still interrupted after {limit} line events")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# -- for the tests of every context's parts (test_mp_stdlib*.py) --------------------------------

TIMEOUT = 30.0


def join(proc, timeout=TIMEOUT):
    """Join ``proc`` with a deadline; its exit code."""
    proc.join(timeout)
    assert proc.exitcode is not None, f"{proc!r} still runs after {timeout}s"
    return proc.exitcode


def close_queue(q):
    """Close a multiprocessing queue and wait for its feeder thread."""
    q.close()
    q.join_thread()


def wait_until(predicate, timeout=TIMEOUT):
    """True once ``predicate()`` holds, checked every few ms until ``timeout``.

    Only for states nothing signals (how many parties wait at a barrier,
    what a callback thread appended); everything else waits on its fd.
    """
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not predicate():
        if time.monotonic() > deadline:
            return False
        pause.wait(0.005)
    return True


def readable(q, timeout=TIMEOUT):
    """Wait until the queue's pipe has data (its feeder thread wrote it)."""
    return q._reader.poll(timeout)
