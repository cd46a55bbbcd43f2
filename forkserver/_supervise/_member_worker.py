"""The worker side of a supervised member (runs INSIDE templates and workers).

The supervisor loads this module into the member's template once, and runs
every member as ``serve(control, *sent, (module, qualname))``: it keeps the
control socket where ``forkserver.worker.heartbeat()`` finds it, then calls
the user's target as ``target(control, *sent)``.  Keep it lean: it is in
every worker (no threading, nothing parent-side).
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Optional

from .._server._hygiene import set_title

#: the control socket of this worker, once it runs as a supervised member
control: Optional[Any] = None


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
                f"module {module!r} has no attribute {qualname!r}; check the target given to Supervisor()"
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
