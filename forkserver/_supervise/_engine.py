"""The supervising thread: one loop polling every member's pidfd and pipes (parent side).

One thread per supervisor, none per member.  Each turn of the loop, with
the lock held, it takes the next request, runs the timers that are due (stop
ladders, stale checks, samples, throttle cycles), decides which slots need a
new process, and notes the callbacks to make; then, without the lock, it
makes the callbacks and starts the processes (a fork from a template's
spare takes about a millisecond), and polls: a pidfd becomes readable when
its process exits (no SIGCHLD handler, no ``waitpid(-1)``: other libraries'
children are left alone), a worker's control socket when it sends a
heartbeat, a program's pipe when it prints, the wake pipe when a method of
``Supervisor`` queued a request.
"""

from __future__ import annotations

import collections
import logging
import os
import select
import signal
import threading
from typing import Any, Callable, Deque, Dict, List, Optional, Set, Tuple

from .._errors import BrokenSupervisorError, ClosedError
from .._reaper import reaper
from ._lifecycle import Lifecycle
from ._limits import Limits
from ._member import Proc, Slot, all_procs, retiring_status
from ._policy import Clock, Policy
from ._requests import Request, Stop
from ._status import SupervisorStatus

log = logging.getLogger("forkserver.supervise")

IDLE_TURN_MS = 1000


class Engine(Lifecycle):
    """A supervisor's state and its thread (see the module docstring)."""

    def __init__(
        self,
        spec: Any,
        size: int,
        policy: Policy,
        limits: Optional[Limits],
        stale_timeout: Optional[float],
        stop_signals: Tuple[int, ...],
        grace: float,
        progress: Optional[Callable[[str], Any]],
        callbacks: Dict[str, Any],
        clock: Optional[Clock] = None,
    ) -> None:
        self.cond = threading.Condition(threading.RLock())
        self.clock = clock or Clock()
        self.spec, self.generation, self._generations = spec, 0, 0
        self.policy, self.limits, self.stale = policy, limits, stale_timeout
        self.signals, self.grace, self.progress = stop_signals, grace, progress
        self.callbacks = callbacks
        now, wall = self.clock.monotonic(), self.clock.time()
        self.slots: List[Slot] = [Slot(i, now, wall) for i in range(size)]
        self.retiring: List[Proc] = []
        self.requests: Deque[Request] = collections.deque()
        self.active: Optional[Request] = None
        self.phase = "running"  # stopping, stopped, broken
        self.error: Optional[str] = None
        self._stop_request: Optional[Stop] = None
        self.reloads = 0
        self.version = 0
        self.turns = 0
        self._dirty = True
        self._calls: List[Tuple[Callable[..., Any], tuple]] = []
        # (event loop, asyncio.Event) of each awaiting coroutine
        self._async: Set[Tuple[Any, Any]] = set()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.thread = threading.Thread(target=self._run, name="forkserver-supervisor", daemon=True)

    # -- called from any thread ---------------------------------------------------------

    def submit(self, req: Request) -> Request:
        """Queue ``req`` and wake the thread; a stop is not queued but noted (it goes first).

        Each change here is one assignment or one ``deque.append``, so a
        KeyboardInterrupt between two lines leaves the request either made
        or not, never half made.
        """
        try:
            with self.cond:
                if isinstance(req, Stop):
                    if self._stop_request is not None:
                        return self._stop_request  # stopping or stopped already: the same stop
                    if self.phase == "broken":
                        req.finish()
                    else:
                        self._stop_request = req
                elif self.phase != "running":
                    req.finish(self._closed_error(req.kind))
                else:
                    self.requests.append(req)
        finally:
            self.wake()
        return req

    def wake(self) -> None:
        # With the lock: the thread closes the pipe under it when it ends,
        # and a number read without it could be another file's by then.
        with self.cond:
            if self._wake_w < 0:
                return  # the thread has ended
            try:
                os.write(self._wake_w, b"x")
            except BlockingIOError:
                pass  # woken already

    def snapshot(self) -> SupervisorStatus:
        with self.cond:
            now, wall = self.clock.monotonic(), self.clock.time()
            return SupervisorStatus(
                state=self.phase,
                size=sum(1 for s in self.slots if not s.removing),
                generation=self.generation,
                reloads=self.reloads,
                members=tuple(s.status(now) for s in self.slots),
                retiring=tuple(retiring_status(p, now, wall) for p in self.retiring),
                error=self.error,
            )

    def add_waiter(self, loop: Any, event: Any) -> None:
        """Have ``event`` (an asyncio.Event of ``loop``) set at every change."""
        with self.cond:
            self._async.add((loop, event))

    def remove_waiter(self, loop: Any, event: Any) -> None:
        with self.cond:
            self._async.discard((loop, event))

    def _closed_error(self, what: str) -> Exception:
        if self.phase == "broken":
            return BrokenSupervisorError(
                f"{what}: the supervisor broke ({self.error}); make a new one"
            )
        return ClosedError(f"{what}: the supervisor was stopped; make a new one")

    # -- the thread -----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self.cond:
                    now = self.clock.monotonic()
                    self._take_requests(now)
                    self._timers(now)
                    jobs = self._jobs(now)
                    self._check_requests(now)
                    done = self._maybe_stopped()
                    self._publish()
                    self._turned()
                self._make_calls()
                if done:  # every member reaped, every callback made
                    with self.cond:
                        self._close_wake()
                        self.phase = "stopped"
                        self._stop_request.finish()  # type: ignore[union-attr]
                        self._dirty = True
                        self._publish()
                    return
                for job in jobs:
                    self._start(job)
                if not jobs:
                    self._poll()
        except BaseException as exc:  # a bug of ours: end cleanly, never orphan a member
            self._broke(exc)
        finally:
            with self.cond:
                self._close_wake()

    def _close_wake(self) -> None:  # lock held
        if self._wake_w >= 0:
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1

    def _publish(self) -> None:  # lock held
        if not self._dirty:
            return
        self._dirty = False
        self.version += 1
        self.cond.notify_all()
        for loop, event in list(self._async):
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # its loop is closed
                self._async.discard((loop, event))

    def _turned(self) -> None:  # lock held
        # Counted at the end of both locked sections of a turn, so two more
        # than now means a whole turn has begun since (tests/_fake_clock.py).
        self.turns += 1
        self.cond.notify_all()

    def _make_calls(self) -> None:
        with self.cond:
            calls, self._calls = self._calls, []
        for func, args in calls:
            try:
                func(*args)
            except BaseException:  # never let a callback end the supervision
                log.exception("supervisor callback %r raised (ignored)", func)

    def _emit(self, name: str, *args: Any) -> None:  # lock held
        func = self.callbacks.get(name)
        if func is not None:
            self._calls.append((func, args))

    def _set_state(self, slot: Slot, state: str, now: float) -> None:  # lock held
        old = slot.set_state(state, now, self.clock.time())
        self._dirty = True
        if old is not None:
            self._emit("on_state_change", slot.status(now), old)

    # -- the poll ----------------------------------------------------------------------

    def _poll(self) -> None:
        with self.cond:
            procs = all_procs(self.slots, self.retiring)
            deadline = self._deadline()
            now = self.clock.monotonic()
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        fds: Dict[int, Tuple[Proc, bool]] = {}
        for proc in procs:
            if proc.pidfd is not None:
                fds[proc.pidfd] = (proc, True)
            if proc.watch_fd is not None:
                fds[proc.watch_fd] = (proc, False)
        for fd in fds:
            poller.register(fd, select.POLLIN)
        # At least once a second with a real clock: a request queued by a
        # call interrupted before its wake-up is still taken within a second.
        # A fake clock wakes us when it moves.
        timeout = IDLE_TURN_MS if self.clock.real else None
        if deadline is not None and (self.clock.real or deadline <= now):
            wait = max(0, int((deadline - now) * 1000) + 1) if deadline > now else 0
            timeout = wait if timeout is None else min(timeout, wait)
        ready = poller.poll(timeout)
        with self.cond:
            now = self.clock.monotonic()
            exited = []
            for fd, _ in ready:
                if fd == self._wake_r:
                    _drain(fd)
                    continue
                proc, is_pidfd = fds[fd]
                if is_pidfd:
                    exited.append(proc)
                elif not proc.closed:
                    proc.read(now, self.progress)
            for proc in exited:  # after their last output
                self._exited(proc, now)
            self._turned()

    # -- when our own code fails -----------------------------------------------------------------

    def _broke(self, exc: BaseException) -> None:
        log.critical("the supervising thread failed; killing its members", exc_info=exc)
        with self.cond:
            self.phase = "broken"
            self.error = f"{type(exc).__name__}: {exc}"
            for proc in all_procs(self.slots, self.retiring):
                proc.signal(signal.SIGKILL)
                pidfd, proc.child._pidfd = proc.child._pidfd, None
                if pidfd is not None:
                    reaper.adopt(proc.pid, pidfd)
                proc.close()
            for slot in self.slots:
                slot.proc = None
            self.retiring.clear()
            self._close_wake()
            err = BrokenSupervisorError(f"the supervising thread failed: {self.error}")
            err.__cause__ = exc
            for req in ([self.active] if self.active else []) + list(self.requests):
                req.finish(err)
            if self._stop_request is not None:
                self._stop_request.finish()
            self._dirty = True
            self._publish()


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass
