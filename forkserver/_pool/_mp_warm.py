"""The child a ``forkserver.mp_context()`` keeps started and waiting (parent side).

``Process.start()`` takes it: the payload goes out at once, with no fork to
wait for, to a child that has walked its start-up path once already (the
rehearsal in ``_mp_worker``).  A daemon thread makes the next one meanwhile,
so the fork (a round trip to the template, ~0.3 ms here) is off the path
of ``start()`` -- and off that of a ``ProcessPoolExecutor``'s first result.

The waiting child is an idle process of ~1 MiB, your child like the
others; it exits as soon as its control socket closes (``discard``).
"""
from __future__ import annotations

import os
import threading
import weakref
from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:  # pragma: no cover
    from .._process import Child

_DISCARD_GRACE = 5.0  # seconds a discarded child gets to see EOF and exit before SIGKILL


class Warm:
    """One started child, replaced in the background each time it is taken."""

    def __init__(self, make: Callable[[], "Child"]) -> None:
        self._make = weakref.WeakMethod(make)  # the context's; it may be collected
        # Callers use the lock itself in ``with`` (C code: an interrupt lands
        # before or after it, never inside), the condition only to notify.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._child: Optional["Child"] = None
        self._wanted = False
        self._making = False  # the thread is making one now
        self._generation = 0  # bumped when the template changes: older children are stale
        self._thread: Optional[threading.Thread] = None
        self._closed = False
        self._pid = os.getpid()
        _all.add(self)

    def take(self) -> Optional["Child"]:
        """The waiting child, or None if there is none ready (then ``request`` the next one)."""
        child = None
        try:
            with self._lock:
                child, self._child = self._child, None
            if child is not None and child.poll() is not None:
                child.close()  # it died while it waited (someone killed it): not usable
                return None
            return child
        except BaseException:
            if child is not None:
                discard(child)  # interrupted: nobody else has it now
            raise

    def request(self) -> None:
        """Make a child to wait, unless one is waiting."""
        with self._lock:
            self._want()

    def wait_ready(self, timeout: float) -> bool:
        """Wait until a child is waiting (or this is closed); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._child is not None or self._closed, timeout)

    def settle(self, timeout: float) -> bool:
        """Wait until no child is asked for or being made; False on timeout."""
        with self._cond:
            return self._cond.wait_for(self._idle, timeout)

    def _idle(self) -> bool:  # lock held
        return self._closed or not self._making and (self._child is not None or not self._wanted)

    def standing(self) -> Optional["Child"]:
        """The waiting child, if there is one (for leak checks)."""
        return self._child

    def invalidate(self) -> None:
        """The template changed: discard the waiting child (it is a copy of the old state)."""
        with self._lock:
            self._generation += 1
            child, self._child = self._child, None
        if child is not None:
            discard(child)

    def close(self) -> None:
        """Stop the thread and discard the waiting child.  Idempotent."""
        with self._lock:
            self._closed = True
            child, self._child = self._child, None
            thread = self._thread
            self._cond.notify_all()
        if child is not None:
            discard(child)
        if thread is not None and thread is not threading.current_thread():
            thread.join(_DISCARD_GRACE)

    def _want(self) -> None:  # lock held
        if self._closed:
            return
        # The thread cannot look before we release the lock; the flag goes
        # last, so an interrupt in between leaves no request nobody serves.
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="forkserver-mp-warm", daemon=True)
            self._thread.start()
        else:
            self._cond.notify_all()
        self._wanted = True

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (self._child is not None or not self._wanted):
                    self._cond.wait()
                if self._closed:
                    self._thread = None
                    return
                self._wanted, self._making = False, True
                generation = self._generation
            child = self._make_one()
            with self._cond:
                keep = (child is not None and not self._closed
                        and generation == self._generation and self._child is None)
                if keep:
                    self._child = child
            if child is not None and not keep:
                discard(child)  # the template changed meanwhile, or this closed
            with self._cond:
                self._making = False
                self._cond.notify_all()

    def _make_one(self) -> Optional["Child"]:
        make = self._make()
        if make is None:
            with self._cond:
                self._closed = True
            return None
        try:
            return make()
        except Exception:
            return None  # e.g. the template died: start() forks itself and raises the error

    def after_fork_child(self) -> None:
        """In a forked copy of the caller: nothing here is its own any more."""
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._thread = None
        child, self._child = self._child, None
        if child is not None and child.control is not None:
            child.control.close()  # our copy: the parent's waiting child must see its EOF
        self._generation += 1
        self._pid = os.getpid()


def discard(child: "Child") -> None:
    """End a child that waits for its payload: EOF on its socket, then reap it (SIGKILL if slow)."""
    import subprocess

    child.close()
    try:
        child.wait(_DISCARD_GRACE)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def _after_fork_child() -> None:
    for warm in list(_all):
        warm.after_fork_child()


_all: "weakref.WeakSet[Warm]" = weakref.WeakSet()
os.register_at_fork(after_in_child=_after_fork_child)
