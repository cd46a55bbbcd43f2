"""Helpers for code running inside a forkserver worker (imported in workers: kept light).

``heartbeat()`` tells a ``Supervisor`` that this worker came up and is
making progress (its ``stale_timeout``).
"""

from __future__ import annotations

from ._supervise._member_worker import heartbeat

__all__ = ["heartbeat"]

heartbeat.__module__ = __name__  # documented (and shown) as forkserver.worker.heartbeat
