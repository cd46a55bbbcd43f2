"""The worker side of a supervised member (runs INSIDE templates and workers).

The supervisor loads this module into the member's template once, and runs
every member as ``serve(control, *sent, (module, qualname))``: it keeps the
control socket where ``forkserver.worker.heartbeat()`` finds it, then calls
the user's target as ``target(control, *sent)``.  Keep it lean: it is in
every worker (no threading, nothing parent-side).
"""

from __future__ import annotations

import socket
import sys
import time
from typing import Any, Callable, Optional

from .._errors import BrokenChannelError
from .._server._hygiene import set_title

#: the control socket of this worker, once it runs as a supervised member
control: Optional[Any] = None

HEARTBEAT_EVERY = 0.05  # seconds: calls closer together than this send nothing
_last_beat = -1e9


def heartbeat(sock: Optional[Any] = None) -> None:
    """Tell the supervisor this worker is alive (resets its ``stale_timeout``).

    Sends one byte on the worker's control socket -- the supervisor counts
    any byte there as a heartbeat -- without ever blocking: calls within
    50 ms of the last one send nothing, and a full socket already holds an
    unread heartbeat.  Cheap enough to call once per request.  The first
    heartbeat also says the worker *came up*: if it dies later, the
    supervisor restarts it at once, without the backoff meant for workers
    that fail to boot.

    ``sock`` defaults to this worker's control socket when it runs as a
    member of a ``Supervisor``; pass it (the target's first argument)
    otherwise.  Raises ``BrokenChannelError`` when the supervisor's end is
    closed (the supervisor is gone: a good time to exit).
    """
    global _last_beat
    if sock is None:
        sock = control
        if sock is None:
            raise RuntimeError(
                "forkserver.worker.heartbeat(): this process is not a supervised worker; "
                "pass the control socket (the first argument of the target)"
            )
    now = time.monotonic()
    if now - _last_beat < HEARTBEAT_EVERY:
        return
    try:
        sock.send(b"\0", socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
    except BlockingIOError:
        pass  # the supervisor has unread heartbeats already
    except (BrokenPipeError, ConnectionResetError) as exc:
        raise BrokenChannelError(
            "heartbeat(): the supervisor closed this worker's control socket (it is gone)"
        ) from exc
    _last_beat = now


def resolve(module: str, qualname: str) -> Callable[..., Any]:
    """The target ``module:qualname`` (imported already: ``check`` ran in the template)."""
    obj: Any = sys.modules.get(module)
    if obj is None:
        import importlib

        obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def check(module: str, qualname: str) -> None:
    """In the template, at ``Supervisor()``: import the target and say clearly if it is wrong."""
    import importlib

    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AttributeError(
                f"module {module!r} has no attribute {qualname!r}; "
                "check the target given to Supervisor()"
            ) from None
    if not callable(obj):
        raise TypeError(f"Supervisor(): {module}:{qualname} is {obj!r}, which is not callable")


def serve(sock: Any, *sent: Any) -> Any:
    """Run the member's target; the last sent item names it."""
    global control
    *args, (module, qualname) = sent
    control = sock
    target = resolve(module, qualname)
    set_title("fs:" + getattr(target, "__name__", "member"))  # ps shows the target, not "serve"
    return target(sock, *args)
