"""The engine of ``forkserver.Executor``: its state and the callers' side (parent side).

Threads.  A caller's ``submit`` writes the pickled call straight to an idle
worker's socket, under the pool lock: no thread hop on the way out.
Everything else happens in one I/O thread (``_loop.py``) that polls every
worker's socket and pidfd, the sockets of workers being forked, and a
wake-up pipe.  Only that thread reads sockets, closes descriptors and
reaps, so a caller interrupted by KeyboardInterrupt can tear nothing but a
frame it was writing (see ``_poison``).  Callers wait on the futures' own
conditions.

State changes are level-triggered: whenever it is woken, the loop
recomputes what to do from the queue and the workers, so a wake-up lost to
an interrupted caller only delays work, never loses it.
"""
from __future__ import annotations

import _thread
import logging
import os
import threading
from collections import deque
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, List, Optional

from .._template import Template
from ._loop import Action, Loop
from ._workers import Start, Task, Worker

if TYPE_CHECKING:  # pragma: no cover
    from typing import Sequence

LOGGER = logging.getLogger("concurrent.futures")  # where Future logs its callbacks' errors
# Calls of map() a worker holds at once (see _map.py): MAP_LOAD, or MAP_LOAD_FAST while its
# calls take less than _loop.FAST_CALL seconds each (at least ``load``).
MAP_LOAD, MAP_LOAD_FAST = 2, 8


class Pool(Loop):
    """The workers, the queue and the I/O thread of one executor."""

    def __init__(self, template: Template, owned: bool, config: dict, *, max_workers: int,
                 min_workers: int,
                 idle_timeout: Optional[float], load: int, max_tasks: Optional[int],
                 on_event: Optional[Callable[[Any, Any], Any]]) -> None:
        self.template = template  # workers are its forks
        self.owned = owned  # ours to close at the end
        self.config = config
        self.max_workers, self.min_workers = max_workers, min_workers
        self.idle_timeout, self.load, self.max_tasks = idle_timeout, load, max_tasks
        self.map_load = max(load, MAP_LOAD)  # map()'s calls stream: see _map.py
        self.map_load_fast = max(load, MAP_LOAD_FAST)
        self.on_event = on_event
        self.owner = os.getpid()
        self.lock = threading.Lock()
        self.queue: Deque[Task] = deque()  # FIFO; cancelled futures are dropped when reached
        self.workers: Dict[int, Worker] = {}  # socket fd -> worker whose socket is open
        self.procs: Dict[int, Worker] = {}  # pidfd -> every worker not reaped yet
        self.idle: List[Worker] = []  # accepting workers with nothing in flight, last used last
        self.busy: List[Worker] = []  # accepting workers with tasks in flight
        self.starts: Dict[int, Start] = {}  # socket fd -> a worker being forked
        self.writing: Optional[Worker] = None  # a caller writes to it (see _poison)
        self.broken: Optional[BrokenProcessPool] = None
        self.shutdown = False
        self.deaths_in_a_row = 0  # workers that died before they finished a task, in a row
        self.retry_at: Optional[float] = None  # after a failed start: when to try again
        self.finished = threading.Event()  # set once the I/O thread has cleaned up
        self.changed = threading.Condition(self.lock)  # notified when workers come and go
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._woken = False
        self._dirty = True  # the loop must recompute its state (I/O thread only)
        # A bare thread: Thread.start() would wait until the new thread runs,
        # which on a busy machine can take milliseconds of a fresh
        # executor's first result; nothing here needs to wait for it.
        self.thread_id: Optional[int] = None  # set by the thread itself
        _thread.start_new_thread(self._run, ())

    # -- the callers' side -----------------------------------------------------------

    def submit(self, task: Task) -> None:
        """Give ``task`` to an idle worker now, or queue it (the loop may start a worker)."""
        with self.lock:
            if self.writing is not None:
                self._poison(self.writing)
            if self.broken is not None or self.shutdown:
                self._check_open()
            worker = None if self.queue else self._worker_for(task)
            if worker is None:
                self.queue.append(task)
                if self.idle or len(self.workers) + len(self.starts) < self.max_workers:
                    self.wake()  # the loop decides whether to fork a worker
                return
            task.future.set_running_or_notify_cancel()
            # From here to the end of the write a KeyboardInterrupt would tear
            # the worker's stream: whoever takes the lock next sees `writing`.
            self.writing = worker
            self._assign(worker, task)
            worker.write(task.chunks)
            self.writing = None
            if worker.out:
                self.wake()  # the loop waits for the socket to take the rest

    def submit_many(self, tasks: Sequence[Task]) -> None:
        """``submit`` for many tasks under one lock (``Executor.map``)."""
        if not tasks:
            return
        with self.lock:
            if self.writing is not None:
                self._poison(self.writing)
            if self.broken is not None or self.shutdown:
                self._check_open()
            start = 0
            if not self.queue:
                while start < len(tasks):
                    task = tasks[start]
                    worker = self._worker_for(task)
                    if worker is None:
                        break
                    start += 1
                    task.future.set_running_or_notify_cancel()
                    self.writing = worker  # see submit()
                    self._assign(worker, task)
                    worker.write(task.chunks)
                    self.writing = None
                    if worker.out:
                        self.wake()
            if start < len(tasks):
                self.queue.extend(tasks[start:] if start else tasks)
                if self.idle or len(self.workers) + len(self.starts) < self.max_workers:
                    self.wake()

    def _check_open(self) -> None:  # lock held
        if self.broken is not None:
            raise BrokenProcessPool(self.broken.args[0]) from self.broken.__cause__
        if self.shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")

    def begin_shutdown(self, cancel_futures: bool) -> None:
        """No more submits; with ``cancel_futures``, cancel the queued tasks.  Never blocks long."""
        with self.lock:
            self.shutdown = True
            queued = list(self.queue) if cancel_futures else []
        for task in queued:  # they stay queued: the loop drops cancelled ones
            task.future.cancel()
        with self.lock:
            self.wake()

    def wait_finished(self, timeout: Optional[float] = None) -> bool:
        """Wait until every task is done and every worker reaped (False on timeout)."""
        if threading.get_ident() == self.thread_id:
            return False  # a callback or on_event of ours: waiting here would never end
        return self.finished.wait(timeout)

    def wait_until(self, predicate: Callable[["Pool"], bool], timeout: float) -> bool:
        """Wait until ``predicate(pool)`` holds (checked whenever workers come or go)."""
        with self.changed:
            return self.changed.wait_for(lambda: predicate(self), timeout)

    def kill_all(self) -> None:
        """Break the pool now: tasks fail, workers are killed (Ctrl-C at interpreter exit)."""
        actions: List[Action] = []
        with self.lock:
            self._break("the executor was stopped: KeyboardInterrupt at interpreter exit",
                        None, actions)
        self._complete(actions)

    def wake(self) -> None:
        """Make the I/O thread look at the state again.  Lock held (the pipe closes under it)."""
        if not self._woken:
            self._woken = True
            try:
                os.write(self._wake_w, b"w")
            except BlockingIOError:
                pass  # it has bytes to read already

    # -- scheduling (lock held) ---------------------------------------------------

    def _worker_for(self, task: Task, prefer: Optional[Worker] = None) -> Optional[Worker]:
        """The least-loaded worker that may take ``task`` now, or None.

        An idle one first (the last one used: its caches are warm), then,
        up to the task's limit (``load``; for map calls see MAP_LOAD), the
        busy one with the fewest tasks -- ``prefer`` (the worker that just
        answered) if it has room.
        """
        if self.idle:
            return self.idle[-1]
        if not self.busy or self.load == 1 and not task.streamed:
            return None
        if (prefer is not None and prefer.accepting
                and len(prefer.inflight) < self._limit(prefer, task)):
            return prefer
        best = min(self.busy, key=lambda w: len(w.inflight))
        return best if len(best.inflight) < self._limit(best, task) else None

    def _limit(self, worker: Worker, task: Task) -> int:
        if not task.streamed:
            return self.load
        return self.map_load_fast if worker.fast else self.map_load

    def _assign(self, worker: Worker, task: Task) -> None:
        inflight = worker.inflight
        if not inflight:
            idle = self.idle
            if idle[-1] is worker:
                idle.pop()
            else:
                idle.remove(worker)
            self.busy.append(worker)
        inflight.append(task)
        worker.sent += 1
        if self.max_tasks is not None and worker.sent >= self.max_tasks:
            self._retire(worker)  # it finishes what it has, then exits

    def _retire(self, worker: Worker) -> None:
        """No new tasks for ``worker``."""
        worker.accepting = False
        if worker in self.idle:
            self.idle.remove(worker)
        if worker in self.busy:
            self.busy.remove(worker)

    def _dispatch(self, prefer: Optional[Worker] = None) -> None:
        """Give queued tasks to the workers that may take them (``prefer``: see _worker_for)."""
        queue = self.queue
        while queue:
            worker = self._worker_for(queue[0], prefer)
            if worker is None:
                return
            task = queue.popleft()
            if not task.future.set_running_or_notify_cancel():
                continue  # cancelled while it waited
            self._assign(worker, task)
            worker.write(task.chunks)
            if worker.out:
                self._dirty = True  # the loop waits for the socket to take the rest

    def _wanted_starts(self) -> int:
        """How many more workers to fork now."""
        if self.broken is not None or self.retry_at is not None:
            return 0
        live = len(self.starts) + sum(1 for w in self.workers.values() if w.accepting)
        room = self.max_workers - live
        if room <= 0:
            return 0
        load = self.load
        free = len(self.idle) * load + sum(load - len(w.inflight) for w in self.busy)
        coming = len(self.starts) * load
        wanted = -(-(len(self.queue) - free - coming) // load)  # ceil
        if not self.shutdown:
            wanted = max(wanted, self.min_workers - live)
        return max(0, min(room, wanted))

    def _poison(self, worker: Worker) -> None:
        """A caller was interrupted while it wrote to ``worker``: its stream may hold half a frame.

        The worker is killed; its tasks fail with ``WorkerDiedError`` once
        the loop reaps it.  With ``load=1`` it had no task but the
        interrupted caller's own, whose future nobody holds.
        """
        worker.why_stopped = ("stopped by forkserver.Executor: a KeyboardInterrupt came while a "
                              "task was being written to it")
        self._retire(worker)
        worker.kill()
        self.wake()
        self.writing = None  # last: interrupted before it, the next lock holder does it all again

    def _break(self, reason: str, cause: Optional[BaseException], actions: List[Action]) -> None:
        """Break the pool: every queued and running task fails, workers are killed.  Lock held."""
        if self.broken is not None:
            return
        broken = BrokenProcessPool(reason)
        broken.__cause__ = cause
        self.broken = broken
        queued, self.queue = list(self.queue), deque()
        for task in queued:
            actions.append((self.FAIL_QUEUED, task, broken, None))
        for worker in self.procs.values():
            for task in worker.inflight:
                actions.append((self.FAIL, task, broken, None))
            worker.inflight.clear()
            worker.why_stopped = worker.why_stopped or "stopped: the executor is broken"
            self._retire(worker)
            worker.kill()
        for start in self.starts.values():
            start.abandon()
        self.starts.clear()
        self.wake()

    # -- a forked copy of the parent --------------------------------------------------------

    def after_fork_child(self) -> None:
        """In an ``os.fork()`` child: the I/O thread is gone; close our copies of the fds."""
        self.lock = threading.Lock()  # another thread may have held it at the fork
        self.changed = threading.Condition(self.lock)
        if not self.finished.is_set():
            for worker in self.procs.values():
                if worker.sock is not None:
                    worker.sock.close()
                    worker.sock = None  # type: ignore[assignment]  # see Worker.close_socket
                if worker.pidfd is not None:
                    os.close(worker.pidfd)
                    worker.pidfd = None  # type: ignore[assignment]  # see Worker.reap
            for collection in (self.workers, self.procs, self.starts):
                collection.clear()
            self.idle.clear()
            self.busy.clear()
            self._woken = True  # never write to the pipe closed here
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)
            self.finished = threading.Event()
            self.finished.set()
        self.broken = BrokenProcessPool(
            f"this executor belongs to process {self.owner}; os.fork() does not copy its workers: "
            "create a new Executor in this process")
