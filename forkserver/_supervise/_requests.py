"""Requests to a supervisor's thread: resize, reload, stop (parent side).

A public method queues a request and waits for it to be done; the waiting
is all the calling thread does, so a KeyboardInterrupt (or a cancelled
coroutine) there leaves the request to finish in the supervising thread,
and every member stays reachable through the supervisor.  Requests run one
at a time, in order; ``stop`` goes first and ends the others.
"""

from __future__ import annotations

from typing import Any, List, Optional


class Request:
    """One queued operation; ``done`` once carried out (``error`` if it could not be)."""

    kind = "request"

    def __init__(self) -> None:
        self.done = False
        self.error: Optional[BaseException] = None

    def finish(self, error: Optional[BaseException] = None) -> None:
        if not self.done:
            self.done, self.error = True, error


class Resize(Request):
    kind = "resize"

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.new_slots: List[Any] = []  # slots it added: done once each had its first start


class Reload(Request):
    kind = "reload"

    def __init__(self, spec: Any) -> None:
        super().__init__()
        self.spec = spec
        self.generation = -1  # set when it begins
        self.target = -1  # the generation the slots are being moved to
        self.old_spec: Any = None
        self.old_generation = -1
        self.cause: Optional[BaseException] = None  # why it rolls back


class Stop(Request):
    kind = "stop"

    def __init__(self, grace: float) -> None:
        super().__init__()
        self.grace = grace
