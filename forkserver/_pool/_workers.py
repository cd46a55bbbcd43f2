"""One worker of ``forkserver.Executor`` as the parent sees it, and how one is started.

``Start`` forks a worker from the executor's template without blocking: the
I/O loop (``_dispatch.py``) polls the new process's socket until its run is
acknowledged, then wraps it in a ``Worker``: its control socket (frames of
``_executor_worker``), its pidfd (exit), the tasks it has in flight, oldest
first (a worker answers in order).
"""
from __future__ import annotations

import os
import signal
import socket
import time
from collections import deque
from typing import Any, Deque, List, Optional

from .._interrupts import deferred
from .._template import _AGAIN, _WAIT, Template, _ids
from .._wait import ReapedElsewhere, reap_now
from . import _executor_worker as W

TARGET = "forkserver._pool._executor_worker:serve"
_NOSIGNAL = int(socket.MSG_NOSIGNAL)


class Task:
    """A submitted call: its future, its encoded frame, and the callable (for error messages)."""

    __slots__ = ("future", "chunks", "task_id", "fn")
    streamed = False  # a call of map(): see _map.py

    def __init__(self, future: Any, chunks: List[Any], task_id: int, fn: Any) -> None:
        self.future = future
        self.chunks = chunks
        self.task_id = task_id
        self.fn = fn

    @property
    def name(self) -> str:
        return task_name(self.fn)


class Start:
    """A worker being forked: ``step()`` returns the ``Worker`` once the run is acknowledged.

    The fork and the run are one command (or a run sent to the template's
    spare clone); nothing here blocks but the write of that command.
    """

    def __init__(self, template: Template, config: dict, deadline: float) -> None:
        clone = template.fork().send_arg(config)
        self.clone = clone
        self.deadline = deadline  # a template that does not answer by then is given up
        self.spec = clone._run_spec(TARGET, False)
        self.target = f"{self.spec[0]}:{self.spec[1]}"
        self.call_id = next(_ids)  # the reply to wait for (replies carry call ids)
        with deferred(), clone._lock:
            clone._start_run(self.spec, self.call_id)

    def fileno(self) -> int:
        return self.clone._chan.fileno()  # type: ignore[union-attr]  # the run is sent: it has one

    def wants_write(self) -> bool:
        return self.clone._chan.pending_output  # type: ignore[union-attr]  # as fileno()

    def step(self) -> Optional["Worker"]:
        """Read what the socket has; the Worker once it runs (raises the fork's error).

        As ``Template.run``: an error or a Ctrl-C before the Worker exists
        SIGKILLs (and hands to the reaper) whatever process the run started.
        """
        clone = self.clone
        with deferred(), clone._lock:
            child = None
            refilled = False
            try:
                frame = clone._step("run", self.call_id)
                while frame is _AGAIN:  # a greeting, or a stale reply
                    frame = clone._step("run", self.call_id)
                if frame is _WAIT:
                    return None
                child = clone._finish_run(frame, self.target, False, None)
                refilled = True
                clone._refill_base(child)  # the template makes its next spare clone
                if child._pidfd is None:  # exited and reaped by someone else already
                    raise ReapedElsewhere(
                        f"worker pid {child.pid} exited at once and its exit status was taken "
                        "by someone else (SIGCHLD set to SIG_IGN, or a waitpid(-1) in this "
                        "process): forkserver.Executor needs to reap its own workers"
                    )
                # ours to poll and reap: the Child is a shell (one statement)
                worker, child._pidfd = Worker(child.pid, child.control, child._pidfd), None  # type: ignore[arg-type]  # a fresh run's Child has a control socket
                clone._child = None
                return worker
            except BaseException:
                clone._run_interrupted(child)
                if not refilled:
                    clone._refill_base(None)
                raise

    def abandon(self) -> None:
        """Give up the fork: the process (if any) exits and the reaper reaps it."""
        clone = self.clone
        with deferred(), clone._lock:
            if clone._status in ("starting", "ready"):
                clone._run_interrupted(None)
                clone._abandon()
            clone._refill_base(None)


class Worker:
    """A running worker: its socket, pidfd, reader, unsent output and tasks in flight."""

    def __init__(self, pid: int, sock: socket.socket, pidfd: int) -> None:
        self.pid = pid
        self.sock = sock  # non-blocking, ours; None once closed
        self.fd = sock.fileno()
        self.pidfd = pidfd  # None once reaped
        self.reader = W.Reader()
        self.out: Deque[memoryview] = deque()  # what the socket has not taken yet
        self.inflight: Deque[Task] = deque()
        self.sent = 0  # tasks given to it (max_tasks_per_child)
        self.done = 0  # replies received
        self.idle_since = time.monotonic()
        self.replied_at = 0.0  # when its last reply came
        self.fast = False  # its last call took under FAST_CALL seconds (see _dispatch)
        self.accepting = True  # may get new tasks
        self.kill_at: Optional[float] = None  # SIGKILL if it has not exited by then
        self.why_stopped: Optional[str] = None  # set when we stopped it ourselves

    def __repr__(self) -> str:
        return f"<executor worker pid={self.pid} inflight={len(self.inflight)}>"

    # -- writing (pool lock held) ------------------------------------------------

    def write(self, chunks: List[Any]) -> None:
        """Send a frame, or queue what the socket does not take (``out``)."""
        if self.out:
            self.out.extend(memoryview(c).cast("B") for c in chunks)
            return
        try:
            if len(chunks) == 1:
                data = chunks[0]
                n = self.sock.send(data, _NOSIGNAL)
                if n < len(data):
                    self.out.append(memoryview(data)[n:])
                return
            n = self.sock.sendmsg(chunks, (), _NOSIGNAL)
        except BlockingIOError:
            n = 0
        except (BrokenPipeError, ConnectionResetError):
            self.accepting = False  # it died: its pidfd tells the loop
            return
        self._keep(chunks, n)

    def _keep(self, chunks: List[Any], sent: int) -> None:
        """Queue what is left of ``chunks`` after ``sent`` bytes."""
        for chunk in chunks:
            view = memoryview(chunk).cast("B")
            if sent >= len(view):
                sent -= len(view)
                continue
            self.out.append(view[sent:])
            sent = 0

    def flush(self) -> None:
        """Send what ``out`` holds, as far as the socket takes it."""
        out = self.out
        while out:
            try:
                n = self.sock.sendmsg(list(out)[:64], (), _NOSIGNAL)
            except BlockingIOError:
                return
            except (BrokenPipeError, ConnectionResetError):
                out.clear()
                self.accepting = False
                return
            while out and n >= len(out[0]):
                n -= len(out.popleft())
            if n:
                out[0] = out[0][n:]

    # -- ending (I/O thread) -----------------------------------------------------

    def close_socket(self) -> None:
        """Close our end: the worker reads EOF and exits once its current call is done."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None  # type: ignore[assignment]  # None once closed (see __init__)
            self.out.clear()
        self.accepting = False

    def kill(self) -> None:
        """SIGKILL through the pidfd (never a recycled pid)."""
        if self.pidfd is not None:
            try:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def reap(self) -> Optional[int]:
        """Reap it (it has exited: its pidfd said so); its returncode, None if lost."""
        try:
            code = reap_now(self.pid)
        except ReapedElsewhere:
            code = None
        else:
            if code is None:  # pragma: no cover - the pidfd said it exited
                return None
        os.close(self.pidfd)
        self.pidfd = None  # type: ignore[assignment]  # None once reaped (see __init__)
        return code

    @property
    def reaped(self) -> bool:
        return self.pidfd is None


def describe_exit(returncode: Optional[int]) -> str:
    """"killed by SIGKILL", "exited with status 3", or that the status was lost."""
    if returncode is None:
        return "exited; its exit status was lost (reaped by another waitpid() of this process)"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with status {returncode}"


def task_name(fn: Any) -> str:
    """How errors name a submitted callable: ``module.qualname``, or its repr."""
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if module and qualname:
        return f"{module}.{qualname}"
    return repr(fn)
