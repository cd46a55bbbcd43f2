"""The child a ``forkserver.mp_context()`` keeps started and waiting (parent side).

``Process.start()`` takes it: the payload goes out at once, with no fork to
wait for, to a child that has walked its start-up path once already (the
rehearsal in ``_mp_worker``).  A daemon thread makes the next one, so the
fork (a round trip to the template, ~0.3 ms here) is off the path of
``start()`` -- and off that of a ``ProcessPoolExecutor``'s first result.

When the next one is made.  Making it costs ~1 ms of CPU (the template's
clone, then the new child's rehearsal); done while the child just started
runs, it competes with that child for the CPUs.  So when the child taken
was waiting already (there is idle time between starts), the thread waits
until it has been reaped (``exited``, from ``Popen.poll``), or until a
``start()`` finds no child waiting.  When it was not (starts come back to back), the next
is made at once, and without a rehearsal (it would compete with that
child for the CPUs, to save time the next start does not leave).  A
``start()`` that finds a child being made waits for it rather than forking
a second one beside it.  The core's spare clones
follow the same rule (``_cloning.py``, "When the next spare is made").

The waiting child is an idle process of ~2 MiB of its own (USS, numpy
loaded; its rehearsal copied those pages), your child like the others; it
exits as soon as its control socket closes (``discard``).
"""
from __future__ import annotations

import os
import select
import threading
import weakref
from typing import TYPE_CHECKING, Callable, Optional, Tuple

if TYPE_CHECKING:  # pragma: no cover
    from .._process import Child

_DISCARD_GRACE = 5.0  # seconds a discarded child gets to see EOF and exit before SIGKILL
_TAKE_WAIT = 2.0  # seconds start() waits for the child being made before forking one itself


class Warm:
    """One started child, replaced in the background after each is taken."""

    def __init__(self, make: Callable[..., "Child"]) -> None:
        self._make = weakref.WeakMethod(make)  # the context's; it may be collected
        # Callers use the lock itself in ``with`` (C code: an interrupt lands
        # before or after it, never inside), the condition to wait and notify.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._child: Optional["Child"] = None
        self._wanted = False  # a child is to be made (once ``_after`` has exited)
        self._after: Optional[int] = None  # the pid of the child last taken
        self._rehearse = True  # whether the next one rehearses (only with idle time to spare)
        self._making = False  # the thread is making one now
        self._generation = 0  # bumped when the template changes: older children are stale
        self._thread: Optional[threading.Thread] = None
        self._wake = (-1, -1)  # a pipe: how the thread is woken from its poll
        self._closed = False
        _all.add(self)

    # -- what start() does --------------------------------------------------------

    def take(self) -> Tuple[Optional["Child"], bool]:
        """(the waiting child or the one being made -- None: fork one yourself, whether it
        was waiting already).  Pass the latter to ``request``."""
        child = None
        try:
            with self._lock:
                ready = self._child is not None
                if not ready and self._thread is not None and (self._wanted or self._making):
                    self._after = None  # needed now: no more waiting for the last one's exit
                    self._kick()
                    self._cond.wait_for(self._has_or_gives_up, _TAKE_WAIT)
                child, self._child = self._child, None
            if child is not None and child.poll() is not None:
                child.close()  # it died while it waited (someone killed it): not usable
                return None, False
            return child, ready
        except BaseException:
            if child is not None:
                discard(child)  # interrupted: nobody else has it now
            raise

    def request(self, after: Optional[int] = None, back_to_back: bool = False) -> None:
        """Make a child to wait, unless one is waiting: once ``after`` (a pid) has exited.

        Starts that took a child that was waiting already pass it as
        ``after``: there was idle time, the next one can wait for it.  Those
        that found none pass ``back_to_back``: the next is made at once,
        while the child just started runs, and does not rehearse.
        """
        with self._lock:
            if self._closed:
                return
            self._after = after
            self._rehearse = not back_to_back
            if self._thread is None:
                self._wake = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
                self._thread = threading.Thread(target=self._loop, name="forkserver-mp-warm",
                                                daemon=True)
                self._thread.start()
            elif after is None:
                self._kick()
            # else no wake-up (it would cost this start ~20 us and the GIL):
            # ``exited(after)`` or the next ``take()`` wakes the thread.
            # Last: an interrupt before it leaves no request nobody serves.
            self._wanted = True

    def exited(self, pid: int) -> None:
        """``pid`` was reaped: if the next child waits for that, make it now."""
        with self._lock:
            if self._after == pid:
                self._after = None
                self._kick()

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
            self._kick()
            self._cond.notify_all()
        if child is not None:
            discard(child)
        if thread is not None and thread is not threading.current_thread():
            thread.join(_DISCARD_GRACE)
            if not thread.is_alive():
                self._close_wake()

    # -- for benchmarks and tests -----------------------------------------------------

    def wait_ready(self, timeout: float) -> bool:
        """Wait until a child is waiting (or this is closed); False on timeout."""
        with self._lock:
            self._after = None
            self._kick()
            return self._cond.wait_for(lambda: self._child is not None or self._closed, timeout)

    def settle(self, timeout: float) -> bool:
        """Wait until the thread has nothing left to do now; False on timeout."""
        with self._lock:
            self._after = None
            self._kick()
            return self._cond.wait_for(self._idle, timeout)

    def standing(self) -> Optional["Child"]:
        """The waiting child, if there is one."""
        return self._child

    # -- the thread ---------------------------------------------------------------------

    def _idle(self) -> bool:  # lock held
        return self._closed or not self._making and (self._child is not None or not self._wanted)

    def _has_or_gives_up(self) -> bool:  # lock held
        return self._child is not None or self._closed or not (self._wanted or self._making)

    def _kick(self) -> None:  # lock held
        if self._wake[1] >= 0:
            try:
                os.write(self._wake[1], b"x")
            except BlockingIOError:
                pass  # woken already

    def _loop(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
                make = self._wanted and self._child is None and self._after is None
                if make:
                    self._wanted, self._making = False, True
                    generation, rehearse = self._generation, self._rehearse
            if not make:
                self._sleep()
                continue
            child = self._make_one(rehearse)
            with self._lock:
                keep = (child is not None and not self._closed
                        and generation == self._generation and self._child is None)
                if keep:
                    self._child = child
            if child is not None and not keep:
                discard(child)  # the template changed meanwhile, or this closed
            with self._lock:
                self._making = False
                self._cond.notify_all()

    def _sleep(self) -> None:
        """Until woken (``_kick``)."""
        poller = select.poll()
        poller.register(self._wake[0], select.POLLIN)
        poller.poll()
        try:
            os.read(self._wake[0], 4096)
        except BlockingIOError:
            pass

    def _make_one(self, rehearse: bool) -> Optional["Child"]:
        make = self._make()
        if make is None:
            with self._lock:
                self._closed = True
            return None
        try:
            return make(background=True, rehearse=rehearse)
        except Exception:
            return None  # e.g. the template died: start() forks itself and raises the error

    def _close_wake(self) -> None:
        wake, self._wake = self._wake, (-1, -1)
        for fd in wake:
            if fd >= 0:
                os.close(fd)

    def after_fork_child(self) -> None:
        """In a forked copy of the caller: nothing here is its own any more."""
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._thread = None
        self._wanted = self._making = False
        self._after = None
        self._close_wake()
        child, self._child = self._child, None
        if child is not None and child.control is not None:
            child.control.close()  # our copy: the parent's waiting child must see its EOF
        self._generation += 1


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
