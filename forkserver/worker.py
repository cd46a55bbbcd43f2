"""Helpers for code running inside a forkserver worker (imported in workers: kept light).

* ``event(obj)`` sends a progress report from a task of ``forkserver.Executor``
  to its ``on_event`` callback in the parent.
* ``heartbeat()`` tells a ``Supervisor`` that this worker came up and is
  making progress (its ``stale_timeout``).
"""
from __future__ import annotations

from typing import Any

from ._supervise._member_worker import heartbeat

__all__ = ["event", "heartbeat"]

heartbeat.__module__ = __name__  # documented (and shown) as forkserver.worker.heartbeat


def event(obj: Any) -> None:
    """Send ``obj`` (picklable) to the parent from a task run by ``forkserver.Executor``.

    The executor's ``on_event(future, obj)`` runs in the parent, in the order
    of the calls, before the task's result is set.  Without an ``on_event``
    the call does nothing.  Raises ``RuntimeError`` outside such a task.
    """
    from ._pool._executor_worker import send_event

    send_event(obj)
