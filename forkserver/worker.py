"""Helpers for code running inside a forkserver worker (imported in workers: kept light).

``heartbeat()`` tells a ``Supervisor`` with a ``stale_timeout`` that this
worker is alive and making progress.
"""
from __future__ import annotations

import socket
import time
from typing import Any, Optional

from ._errors import BrokenChannelError

__all__ = ["heartbeat"]

HEARTBEAT_EVERY = 0.05  # seconds: calls closer together than this send nothing
_last_beat = -1e9


def heartbeat(control: Optional[Any] = None) -> None:
    """Tell the supervisor this worker is alive (resets its ``stale_timeout``).

    Sends one byte on the worker's control socket -- the supervisor counts
    any byte there as a heartbeat -- without ever blocking: calls within
    50 ms of the last one send nothing, and a full socket already holds an
    unread heartbeat.  Cheap enough to call once per request.

    ``control`` defaults to this worker's control socket when it runs as a
    member of a ``Supervisor``; pass it (the target's first argument)
    otherwise.  Raises ``BrokenChannelError`` when the supervisor's end is
    closed (the supervisor is gone: a good time to exit).
    """
    global _last_beat
    if control is None:
        from ._supervise import _member_worker

        control = _member_worker.control
        if control is None:
            raise RuntimeError(
                "forkserver.worker.heartbeat(): this process is not a supervised worker; "
                "pass the control socket (the first argument of the target)"
            )
    now = time.monotonic()
    if now - _last_beat < HEARTBEAT_EVERY:
        return
    try:
        control.send(b"\0", socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
    except BlockingIOError:
        pass  # the supervisor has unread heartbeats already
    except (BrokenPipeError, ConnectionResetError) as exc:
        raise BrokenChannelError(
            "heartbeat(): the supervisor closed this worker's control socket (it is gone)"
        ) from exc
    _last_beat = now
