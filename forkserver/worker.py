"""Helpers for code running inside forkserver workers (imported there: keep it light)."""
from __future__ import annotations

from typing import Any

__all__ = ["event"]


def event(obj: Any) -> None:
    """Send ``obj`` (picklable) to the parent from a task run by ``forkserver.Executor``.

    The executor's ``on_event(future, obj)`` runs in the parent, in the order
    of the calls, before the task's result is set.  Without an ``on_event``
    the call does nothing.  Raises ``RuntimeError`` outside such a task.
    """
    from ._pool._executor_worker import send_event

    send_event(obj)
