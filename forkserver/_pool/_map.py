"""``Executor.map`` without a ``Future`` per call (parent side).

``map`` hands out an iterator, never the futures: the standard library's
implementation submits one ``Future`` per call anyway (a condition, two
lists, a lock each, and a notification of the waiting thread per result).
Here each call is a ``MapTask``, its own light stand-in for that future,
and the iterator is woken only for the result it is waiting for.  The
semantics are ``Executor.map``'s: every call submitted at once, results in
order, a call's exception raised at its place, ``timeout`` counted from the
``map`` call, the calls not yet started cancelled when the iterator is
closed or fails.

The calls also *stream*: a worker holds up to ``MAP_LOAD`` (2) of them at
once (or ``load``, if more), so the next call is there when one ends and a
worker never waits a round trip through the parent between small calls;
while its calls take under a millisecond each, up to ``MAP_LOAD_FAST`` (8).
(A call may then wait behind a long one on its worker: ``load`` limits
submitted tasks; map calls are uniform, and a slow one brings the depth back
to 2.)  Measured on 2 vCPUs, two workers, 10,000 tiny calls, one run:
one call at a time ~28k calls/s; 2 at a time ~53k; 4 ~74k; 8 ~85k
(ProcessPoolExecutor, forkserver context: ~13k).
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError, InvalidStateError, TimeoutError as FuturesTimeout
from typing import Any, Iterator, List, Optional

from ._workers import Task

_PENDING, _RUNNING, _DONE, _CANCELLED = 0, 1, 2, 3


class Results:
    """What one map call's tasks share: a condition, and the task its iterator waits for."""

    __slots__ = ("cond", "waiting")

    def __init__(self) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.waiting: Optional["MapTask"] = None


class MapTask(Task):
    """A call of ``map``: a ``Task`` that is its own future (the methods the pool uses)."""

    __slots__ = ("state", "value", "failed", "results")
    streamed = True

    def __init__(self, chunks: List[Any], task_id: int, fn: Any, results: Results) -> None:
        super().__init__(self, chunks, task_id, fn)
        self.state = _PENDING
        self.value: Any = None
        self.failed = False
        self.results = results

    def set_running_or_notify_cancel(self) -> bool:
        with self.results.cond:
            if self.state == _CANCELLED:
                return False
            self.state = _RUNNING
            return True

    def set_result(self, value: Any) -> None:
        self._finish(value, False)

    def set_exception(self, exc: BaseException) -> None:
        self._finish(exc, True)

    def _finish(self, value: Any, failed: bool) -> None:
        results = self.results
        with results.cond:
            if self.state >= _DONE:
                raise InvalidStateError(f"{self!r} is done already")
            self.value, self.failed, self.state = value, failed, _DONE
            if results.waiting is self:
                results.cond.notify()

    def cancel(self) -> bool:
        results = self.results
        with results.cond:
            if self.state == _PENDING:
                self.state = _CANCELLED
                if results.waiting is self:
                    results.cond.notify()
            return self.state == _CANCELLED

    def cancelled(self) -> bool:
        return self.state == _CANCELLED

    def done(self) -> bool:
        return self.state >= _DONE

    def outcome(self, deadline: Optional[float]) -> Any:
        """Wait for this call's result (until ``deadline``); return it or raise its exception."""
        results = self.results
        with results.cond:
            results.waiting = self
            try:
                while self.state < _DONE:
                    if deadline is None:
                        results.cond.wait()
                    elif not results.cond.wait(max(0.0, deadline - time.monotonic())):
                        if self.state < _DONE:
                            raise FuturesTimeout()
            finally:
                results.waiting = None
            if self.state == _CANCELLED:
                raise CancelledError()
        value, self.value = self.value, None  # the iterator's reference is the last one
        if self.failed:
            try:
                raise value
            finally:
                del value
        return value


def iterate(tasks: List[MapTask], deadline: Optional[float]) -> Iterator[Any]:
    """Yield the results of ``tasks`` in order; cancel those not started on the way out."""
    tasks.reverse()  # popped from the end: neither this frame nor the list keeps a yielded result
    try:
        while tasks:
            yield _outcome_or_cancel(tasks.pop(), deadline)
    finally:
        for task in tasks:
            task.cancel()


def _outcome_or_cancel(task: MapTask, deadline: Optional[float]) -> Any:
    try:
        return task.outcome(deadline)
    except BaseException:
        task.cancel()  # a timeout or Ctrl-C: it must not run later for nobody
        raise
