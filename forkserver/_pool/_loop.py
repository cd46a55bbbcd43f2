"""The I/O thread of ``forkserver.Executor`` (parent side): a mixin of ``_dispatch.Pool``.

One ``poll`` over every worker's socket and pidfd, the sockets of workers
being forked and a wake-up pipe.  A plain reply takes the fast path: read,
hand the worker its next queued task, complete the future -- outside the
lock, since that runs user code (done callbacks, ``on_event``, a result's
``__setstate__``).  Anything else (a wake-up, an exit, a fork, a deadline)
marks the state dirty, and the loop recomputes what to do from it.

Only this thread reads sockets, closes descriptors and reaps.  A worker is
known dead from its pidfd, never from a closed socket alone (a grandchild
may hold it open); whatever it sent before dying still counts.

Size (~480 lines): the executor's one I/O loop -- poll, read, write, reap, replace --
whose steps share its state; ``_dispatch`` and ``_workers`` hold the rest.
"""
from __future__ import annotations

import logging
import os
import pickle
import select
import threading
import time
from concurrent.futures import InvalidStateError
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from .. import _protocol as P
from .._errors import WorkerDiedError
from .._fds import set_name as set_thread_name
from .._wait import wait_readable
from . import _executor_worker as W
from ._workers import Start, Task, Worker, describe_exit

if TYPE_CHECKING:  # pragma: no cover
    from typing import Callable, Deque

    from .._template import Template

FAST_CALL = 0.001  # seconds: map calls this short stream deeper (see _dispatch.MAP_LOAD)

LOGGER = logging.getLogger("concurrent.futures")
CRASH_LOOP = 5  # workers dying in a row before they finish a task: the pool is broken
START_TIMEOUT = 60.0  # seconds a template may take to fork a worker
EXIT_GRACE = 10.0  # seconds a worker whose socket closed may take to exit before SIGKILL
_IN = select.POLLIN
_OUT = select.POLLOUT

Action = Tuple[int, Task, Any, Any]  # what to do outside the lock: kind, task, payload, buffers


class Loop:
    """The I/O thread's side of ``Pool`` (every attribute is set by ``Pool.__init__``)."""

    FAIL = 100  # an action: fail the task's future with the exception in payload
    FAIL_QUEUED = 101  # the same for a task that never ran (it may have been cancelled)

    if TYPE_CHECKING:  # what Pool (the one user of this mixin) provides
        template: Template
        owned: bool
        config: dict
        min_workers: int
        idle_timeout: Optional[float]
        on_event: Optional[Callable[[Any, Any], Any]]
        lock: threading.Lock
        queue: Deque[Task]
        workers: Dict[int, Worker]
        procs: Dict[int, Worker]
        idle: List[Worker]
        busy: List[Worker]
        starts: Dict[int, Start]
        writing: Optional[Worker]
        broken: Optional[BrokenProcessPool]
        shutdown: bool
        deaths_in_a_row: int
        retry_at: Optional[float]
        finished: threading.Event
        changed: threading.Condition
        _wake_r: int
        _wake_w: int
        _woken: bool
        _dirty: bool
        thread_id: Optional[int]

        def _break(self, reason: str, cause: Optional[BaseException],
                   actions: List[Action]) -> None: ...
        def _dispatch(self, prefer: Optional[Worker] = None) -> None: ...
        def _retire(self, worker: Worker) -> None: ...
        def _poison(self, worker: Worker) -> None: ...
        def _wanted_starts(self) -> int: ...

    def _run(self) -> None:
        self.thread_id = threading.get_ident()
        set_thread_name(b"fs:executor")
        poller = select.poll()
        watched: Dict[int, int] = {}
        deadline: Optional[float] = None
        ready: List[Tuple[int, int]] = []
        try:
            while True:
                actions: List[Action] = []
                workers = self.workers
                for fd, events in ready:
                    worker = workers.get(fd)
                    if worker is not None and events == _IN:
                        self._read(worker, actions)  # the fast path: a reply
                    else:
                        self._dirty = True
                        self._ready(fd, events, actions)
                if actions:
                    self._complete(actions)  # first: wake the waiters
                    actions = []
                if self._dirty or deadline is not None and time.monotonic() >= deadline:
                    self._dirty = False
                    for _ in range(self._housekeeping(actions)):
                        self._start(actions)
                    self._complete(actions)
                    if self._done():
                        return
                    self._watch(poller, watched)
                    deadline = self._next_deadline()
                del actions
                if deadline is None:
                    ready = poller.poll()
                else:
                    ready = poller.poll(int(max(0.0, deadline - time.monotonic()) * 1000) + 1)
        except BaseException as exc:  # a bug of ours: no waiter may hang on it
            LOGGER.critical("forkserver.Executor: the I/O thread failed", exc_info=True)
            actions = []
            with self.lock:
                self._break(f"the executor's I/O thread failed: {exc!r}", exc, actions)
            self._complete(actions)
            raise
        finally:
            self._end()

    def _ready(self, fd: int, events: int, actions: List[Action]) -> None:
        """Anything but a plain reply: the wake-up pipe, an exit, a fork, a writable socket."""
        if fd == self._wake_r:
            try:
                os.read(self._wake_r, 4096)
            except BlockingIOError:
                pass
            self._woken = False  # after the read: a wake-up from now on writes again
            return
        worker = self.procs.get(fd)
        if worker is not None:
            self._died(worker, actions)
            return
        start = self.starts.get(fd)
        if start is not None:
            self._step_start(fd, start, actions)
            return
        worker = self.workers.get(fd)
        if worker is None:
            return
        if events & _OUT:
            with self.lock:
                worker.flush()
        if events & ~_OUT:  # POLLIN, POLLHUP, POLLERR
            self._read(worker, actions)

    # -- replies -------------------------------------------------------------------------

    def _read(self, worker: Worker, actions: List[Action]) -> bool:
        """One read from ``worker``'s socket, its frames handled; False if it had nothing."""
        reader = worker.reader
        try:
            n = reader.fill(worker.sock)
        except BlockingIOError:
            return False
        except OSError:  # ECONNRESET: it died
            n = 0
        frame = reader.next_frame()
        if frame is None and n:
            return True  # part of a frame
        with self.lock:
            while frame is not None:
                if not self._on_frame(worker, frame, actions):
                    break
                frame = reader.next_frame()
            if n == 0:
                self._eof(worker)
            if self.queue:
                self._dispatch(worker)
        return True

    def _on_frame(self, worker: Worker, frame: W.Frame, actions: List[Action]) -> bool:
        """One reply (lock held); False if the stream is out of step (the worker is killed)."""
        kind, task_id, payload, bufs = frame
        inflight = worker.inflight
        if kind >= W.INIT_ERROR or not inflight or inflight[0].task_id != task_id:
            return self._odd_frame(worker, frame, actions)
        if kind == W.EVENT:
            actions.append((kind, inflight[0], payload, bufs))
            return True
        actions.append((kind, inflight.popleft(), payload, bufs))
        worker.done += 1
        self.deaths_in_a_row = 0
        now = time.monotonic()
        # The call's time: since the previous reply, or since the worker got busy.
        worker.fast = now - max(worker.replied_at, worker.idle_since) < FAST_CALL
        worker.replied_at = now
        if not inflight:
            worker.idle_since = now
            if worker.accepting:
                self.busy.remove(worker)
                self.idle.append(worker)
            if not worker.accepting or self.shutdown or self.idle_timeout is not None:
                self._dirty = True  # to stop it, or a deadline to set
        return True

    def _odd_frame(self, worker: Worker, frame: W.Frame, actions: List[Action]) -> bool:
        self._dirty = True
        kind, task_id, payload, _ = frame
        if kind == W.INIT_ERROR:
            cause = P.decode_error(payload)
            self._break(f"the initializer raised {type(cause).__name__}: {cause} in worker "
                        f"{worker.pid} (its traceback is this exception's __cause__)",
                        cause, actions)
            return False
        worker.why_stopped = (f"stopped by forkserver.Executor: it answered task {task_id}, "
                              "which it was not running (a bug: please report it)")
        self._retire(worker)
        worker.kill()
        return False

    def _eof(self, worker: Worker) -> None:  # lock held
        """Its socket closed: it is exiting (its pidfd will say), or must."""
        self._dirty = True
        self._retire(worker)
        self._close_socket(worker)
        if worker.kill_at is None:
            worker.kill_at = time.monotonic() + EXIT_GRACE

    def _died(self, worker: Worker, actions: List[Action]) -> None:
        """``worker``'s pidfd fired: read what it sent before dying, reap it, fail the rest."""
        while worker.sock is not None and self._read(worker, actions):
            pass  # until EAGAIN or EOF: replies it sent before it died count
        with self.lock:
            del self.procs[worker.pidfd]
            code = worker.reap()
            self._retire(worker)
            self._close_socket(worker)
            lost = list(worker.inflight)
            worker.inflight.clear()
            if worker.done == 0 and worker.why_stopped is None:
                self.deaths_in_a_row += 1  # it died before it finished a task: a crash loop?
            why = f"worker {worker.pid} {describe_exit(code)}"
            if worker.why_stopped:
                why += f" ({worker.why_stopped})"
            for task in lost:
                err = WorkerDiedError(f"{why} while it ran {task.name}; forkserver.Executor "
                                      "replaced it and runs the other tasks", worker.pid, code)
                actions.append((self.FAIL, task, err, None))
            if self.deaths_in_a_row >= CRASH_LOOP and self.broken is None:
                self._break(f"{self.deaths_in_a_row} workers in a row died before they finished "
                            f"a task (the last: {why}): a crash loop, so forkserver.Executor "
                            "stopped forking; check the initializer, the template and the tasks",
                            None, actions)

    # -- starting workers ---------------------------------------------------------------

    def _start(self, actions: List[Action]) -> None:
        """Fork one worker (its run is acknowledged later, on its socket)."""
        try:
            start = Start(self.template, self.config, time.monotonic() + START_TIMEOUT)
        except Exception as exc:
            self._start_failed(exc, actions)
            return
        with self.lock:
            self.starts[start.fileno()] = start

    def _step_start(self, fd: int, start: Start, actions: List[Action]) -> None:
        try:
            worker = start.step()
        except Exception as exc:
            with self.lock:
                self.starts.pop(fd, None)
            start.abandon()
            self._start_failed(exc, actions)
            return
        if worker is None:
            return
        with self.lock:
            del self.starts[fd]
            self.workers[worker.fd] = worker
            self.procs[worker.pidfd] = worker
            self.idle.insert(0, worker)  # queued tasks go to it; later ones to warm workers
            if self.broken is not None:
                self._stop(worker, time.monotonic())
            self._dispatch()

    def _start_failed(self, exc: BaseException, actions: List[Action]) -> None:
        with self.lock:
            self._start_failed_locked(exc, actions)

    def _start_failed_locked(self, exc: BaseException, actions: List[Action]) -> None:
        self.deaths_in_a_row += 1
        if self.deaths_in_a_row >= CRASH_LOOP:
            self._break(f"forkserver.Executor could not start a worker "
                        f"({self.deaths_in_a_row} failures in a row): "
                        f"{type(exc).__name__}: {exc}", exc, actions)
        else:  # try again soon, backing off
            self.retry_at = time.monotonic() + 0.01 * 2 ** self.deaths_in_a_row

    # -- the loop's bookkeeping -----------------------------------------------------------

    def _housekeeping(self, actions: List[Action]) -> int:
        """Recompute what to do from the state; returns how many workers to start."""
        now = time.monotonic()
        with self.lock:
            if self.writing is not None:
                self._poison(self.writing)
            if self.retry_at is not None and now >= self.retry_at:
                self.retry_at = None
            if (self.shutdown or self.broken is not None) and self.queue:
                self._drop_cancelled()
            for fd, start in list(self.starts.items()):
                if now >= start.deadline:  # the template does not answer: count it as failed
                    del self.starts[fd]
                    start.abandon()
                    self._start_failed_locked(TimeoutError(
                        f"the template did not fork a worker in {START_TIMEOUT:g} s"), actions)
            self._dispatch()
            for worker in list(self.procs.values()):
                self._tend(worker, now)
            self.changed.notify_all()
            return self._wanted_starts()

    def _drop_cancelled(self) -> None:  # lock held
        """Take cancelled tasks out of the queue (``shutdown(cancel_futures=True)``)."""
        kept = type(self.queue)()
        for task in self.queue:
            if task.future.cancelled():
                task.future.set_running_or_notify_cancel()  # CANCELLED_AND_NOTIFIED: wait() sees it
            else:
                kept.append(task)
        self.queue = kept

    def _tend(self, worker: Worker, now: float) -> None:  # lock held
        if worker.kill_at is not None and now >= worker.kill_at:
            worker.why_stopped = (worker.why_stopped
                                  or "killed: it did not exit after its socket closed")
            worker.kill()
            worker.kill_at = None
            return
        if worker.inflight or worker.sock is None:
            return
        if not worker.accepting or self.broken is not None or self.shutdown and not self.queue:
            self._stop(worker, now)
        elif self.idle_timeout is not None and now - worker.idle_since >= self.idle_timeout:
            if self._live() > self.min_workers:
                self._stop(worker, now)

    def _live(self) -> int:  # lock held
        return sum(1 for w in self.workers.values() if w.accepting) + len(self.starts)

    def _stop(self, worker: Worker, now: float) -> None:  # lock held
        """Close its socket: it exits at EOF (SIGKILL after EXIT_GRACE)."""
        self._retire(worker)
        worker.why_stopped = worker.why_stopped or "stopped by forkserver.Executor"
        self._close_socket(worker)
        if worker.kill_at is None:
            worker.kill_at = now + EXIT_GRACE

    def _close_socket(self, worker: Worker) -> None:  # lock held
        if worker.sock is not None:
            del self.workers[worker.fd]
            worker.close_socket()

    def _next_deadline(self) -> Optional[float]:
        """When the loop must look again without a wake-up (idle timeouts, kills), or None."""
        with self.lock:
            deadlines = [w.kill_at for w in self.procs.values() if w.kill_at is not None]
            deadlines += [s.deadline for s in self.starts.values()]
            if self.retry_at is not None:
                deadlines.append(self.retry_at)
            if self.idle_timeout is not None and self._live() > self.min_workers:
                deadlines += [w.idle_since + self.idle_timeout for w in self.idle]
        return min(deadlines) if deadlines else None

    def _watch(self, poller: Any, watched: Dict[int, int]) -> None:
        """Bring the poll set up to date (only this thread touches it)."""
        wanted = {self._wake_r: _IN}
        with self.lock:
            for fd, start in self.starts.items():
                wanted[fd] = _IN | (_OUT if start.wants_write() else 0)
            for fd, worker in self.workers.items():
                wanted[fd] = _IN | (_OUT if worker.out else 0)
            for fd in self.procs:
                wanted[fd] = _IN
        for fd in [fd for fd in watched if fd not in wanted]:
            poller.unregister(fd)
            del watched[fd]
        for fd, events in wanted.items():
            if watched.get(fd) != events:
                poller.register(fd, events)  # register() also modifies
                watched[fd] = events

    def _done(self) -> bool:
        with self.lock:
            ending = self.shutdown or self.broken is not None
            return ending and not self.queue and not self.procs and not self.starts

    def _end(self) -> None:
        """The loop is over: close what is left (after a bug: kill and reap it too)."""
        with self.lock:
            procs, starts = list(self.procs.values()), list(self.starts.values())
            self.procs.clear()
            self.starts.clear()
            for worker in procs:
                self._close_socket(worker)
                worker.kill()
        for start in starts:
            start.abandon()
        for worker in procs:
            wait_readable(worker.pidfd, EXIT_GRACE)
            worker.reap()
        try:
            if self.owned:
                self.template.close()
        finally:
            with self.lock:
                self._woken = True  # wake() writes no more: the pipe is closed
                os.close(self._wake_r)
                os.close(self._wake_w)
            self.finished.set()

    # -- completing futures (no lock held) ------------------------------------------------

    def _complete(self, actions: List[Action]) -> None:
        """Complete futures and call on_event, in the order the frames came."""
        loads = pickle.loads
        for kind, task, payload, bufs in actions:
            if kind == W.RESULT:
                try:
                    value = loads(payload, buffers=bufs)
                except BaseException as exc:  # SystemExit too: it is the result's doing
                    self._fail(task, BrokenProcessPool(
                        f"the result of {task.name} could not be unpickled here: "
                        f"{type(exc).__name__}: {exc}"), exc)
                else:
                    try:
                        task.future.set_result(value)
                    except InvalidStateError:
                        pass  # completed by someone else (Future.set_result called by the user)
            else:
                self._complete_other(kind, task, payload, bufs)

    def _complete_other(self, kind: int, task: Task, payload: Any, bufs: Any) -> None:
        if kind == W.EVENT:
            if self.on_event is not None:
                try:
                    self.on_event(task.future, pickle.loads(payload, buffers=bufs))
                except Exception:
                    LOGGER.exception("exception calling on_event for %r", task.future)
        elif kind == W.ERROR:
            self._fail(task, P.decode_error(payload))
        elif kind == W.BAD_CALL:
            cause = P.decode_error(payload)
            self._fail(task, BrokenProcessPool(
                f"the worker could not unpickle the call of {task.name}: "
                f"{type(cause).__name__}: {cause}"), cause)
        elif kind == self.FAIL_QUEUED:
            if task.future.set_running_or_notify_cancel():  # False: it was cancelled
                self._fail(task, payload)
        else:
            self._fail(task, payload)

    @staticmethod
    def _fail(task: Task, exc: BaseException, cause: Optional[BaseException] = None) -> None:
        if cause is not None:
            exc.__cause__ = cause
        try:
            task.future.set_exception(exc)
        except InvalidStateError:
            pass
