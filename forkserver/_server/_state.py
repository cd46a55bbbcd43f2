"""A template's state and the steps its commands share (runs inside template processes)."""
from __future__ import annotations

import importlib
import os
import sys
from typing import Any, Callable, List, Optional, Tuple

from .. import _protocol as P
from .._fds import FdChannel, Frame
from ._hygiene import thread_count, thread_limits
from ._namespace import install

Work = Tuple[Callable[..., Any], List[Any], dict]  # func, sent items, run options


class State:
    """Everything a template has; a clone inherits all of it."""

    def __init__(self, chan: FdChannel) -> None:
        self.chan = chan
        self.sent: List[Any] = []  # send_arg/send_fh items, in call order
        self.namespace: dict = install()  # forkserver.template's globals (_namespace.py)
        self.broken: Optional[bytes] = None  # encoded first error of a pipelined command
        self.culprits: List[str] = []  # require/eval calls that started threads
        self.gc_freeze = True
        self.set_up = False  # True once a SETUP gave it a caller's context (_setup.py)
        # True from a thread check that found one thread until the next
        # command other than a bare FORK: nothing else runs code that could
        # start a thread, so the spare clones asked for in a row skip it.
        self.single_threaded = False

    def reply_error(self, exc: BaseException, context: str) -> None:
        self.chan.send(P.ERROR, P.encode_error(exc, context))


def greet(chan: FdChannel) -> None:
    chan.send(P.HELLO, P.HELLO_FORMAT.pack(P.VERSION, os.getpid()))


def import_checked(state: State, what: str, func: Callable[[], Any]) -> Any:
    """Run an import/eval under thread-pool limits; remember it if it started threads."""
    before = thread_count()
    with thread_limits():
        result = func()
    if thread_count() > before:
        state.culprits.append(what)
    return result


def resolve(state: State, frame: Frame) -> Tuple[Callable[..., Any], dict]:
    module_name, qualname, opts = P.loads(frame.payload)
    return resolve_target(state, module_name, qualname), opts


def resolve_target(state: State, module_name: str, qualname: str) -> Callable[..., Any]:
    obj: Any = sys.modules.get(module_name)
    if obj is None:  # the hot path (module preloaded) touches nothing else
        obj = import_checked(
            state, f"run({module_name!r})", lambda: _import_target(module_name, qualname)
        )
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AttributeError(_missing(module_name, qualname)) from None
    if not callable(obj):
        raise TypeError(f"{module_name}:{qualname} is {obj!r}, which is not callable")
    return obj


def _import_target(module_name: str, qualname: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not (module_name + ".").startswith(exc.name + "."):
            raise  # the target module exists but imports something missing: its own error
        raise ModuleNotFoundError(
            f"run('{module_name}:{qualname}'): no module named {exc.name!r} in the template. "
            "Check the name; the template searched the sys.path your process had when "
            f"Template() was called: {sys.path}",
            name=exc.name,
        ) from None


def _missing(module_name: str, qualname: str) -> str:
    """The message for a run() target that is not there, with what to do instead."""
    if module_name == P.NAMESPACE:
        return (
            f"run({qualname!r}): the template's namespace ({P.NAMESPACE}) has no {qualname!r}; "
            f"define it first with eval('def {qualname}(control, *args): ...'), or name a "
            "module's function, as 'pkg.mod:func'"
        )
    if module_name == "__main__":
        return (
            f"run('__main__:{qualname}'): this template's __main__ is not your program's "
            f"main script, so it has no {qualname!r}. Call forkserver.early() at the top of "
            "your program (templates then clone it, __main__ included), move the function "
            f"into a module, or define it with eval() and run({qualname!r})"
        )
    return f"module {module_name!r} has no attribute {qualname!r}; check the name passed to run()"


def flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
