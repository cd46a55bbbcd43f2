"""asyncio faces of templates and children (parent side; ``forkserver.aio`` re-exports them).

Waiting uses no threads: a child's exit is awaited on its pidfd, template
replies on their socket, with ``loop.add_reader``/``add_writer``.  The
programs' asyncio versions (``aio.spawn``, ``aio.stream``) live in
``_programs/_astream.py`` and use the helpers here.

Cancellation (``asyncio.wait_for``, ``task.cancel()``) can only strike at an
``await``, and every ``await`` here is at a consistent point: the command is
sent, its reply not yet read.  What is left behind is what a Ctrl-C leaves
in the blocking calls (``_template.py``): a cancelled ``eval``/``require``
still runs in the template and the next call drops its reply; a cancelled
``run`` SIGKILLs and reaps the worker it was starting.  The synchronous
steps between the awaits defer ``KeyboardInterrupt`` like the blocking
calls do.
"""
from __future__ import annotations

import asyncio
import signal
import subprocess
import weakref
from typing import TYPE_CHECKING, Any, Optional, Sequence, Tuple, Union

from . import _protocol as P
from ._errors import BrokenChannelError
from ._interrupts import deferred
from ._process import Child
from ._template import _AGAIN, _WAIT, Target, Template, _ids

if TYPE_CHECKING:  # pragma: no cover
    from ._fds import FdChannel

__all__ = ["require", "eval", "run", "wait", "AsyncChild"]

_locks: "weakref.WeakKeyDictionary[Template, tuple]" = weakref.WeakKeyDictionary()


def _lock_for(tpl: Template) -> asyncio.Lock:
    """The template's asyncio lock for the running loop.

    One per loop: a loop stopped by a ``KeyboardInterrupt`` may leave its
    coroutines suspended, holding the lock, forever; the template itself is
    consistent (see the module docs), so the next loop starts with a new one.
    """
    loop = asyncio.get_running_loop()
    entry = _locks.get(tpl)
    if entry is None or entry[0]() is not loop:
        entry = _locks[tpl] = (weakref.ref(loop), asyncio.Lock())
    return entry[1]


async def _fd_ready(fd: int, write: bool = False, delay: Optional[float] = None) -> None:
    """Resolve when ``fd`` is readable (or writable, with ``write``), or after ``delay``."""
    await _any_ready([(fd, False)] + ([(fd, True)] if write else []), delay)


async def _any_ready(fds: Sequence[Tuple[int, bool]], delay: Optional[float] = None) -> bool:
    """When one of the (fd, for writing) pairs is ready (True), or after ``delay`` (False)."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def wake(ready: bool) -> None:
        if not fut.done():
            fut.set_result(ready)

    readers = [fd for fd, write in fds if not write]
    writers = [fd for fd, write in fds if write]
    for fd in readers:
        loop.add_reader(fd, wake, True)
    for fd in writers:
        loop.add_writer(fd, wake, True)
    timer = loop.call_later(delay, wake, False) if delay is not None else None
    try:
        return await fut
    finally:
        for fd in readers:
            loop.remove_reader(fd)
        for fd in writers:
            loop.remove_writer(fd)
        if timer is not None:
            timer.cancel()


async def _next_frame(tpl: Template, what: str, call_id: int = 0) -> Any:
    while True:
        with tpl._lock:
            frame = tpl._step(what, call_id)
        if frame is _AGAIN:
            continue
        if frame is not _WAIT:
            return frame
        chan: FdChannel = tpl._chan  # type: ignore[assignment]  # _WAIT: it has a channel to wait on
        delay = None
        if chan.stalled_until is not None:
            delay = max(0.0, chan.stalled_until - asyncio.get_running_loop().time())
        await _fd_ready(chan.fileno(), chan.pending_output, delay)


async def _flushed(tpl: Template) -> None:
    """Until everything queued for ``tpl`` is in its socket.

    A fork sends ``FORK`` to the template it comes from and then must wait,
    in the sync code, for whatever is queued before it (a ``send_arg`` bigger
    than the socket buffer) to get there; flushing first, awaiting
    writability, keeps that wait out of the event loop.
    """
    while True:
        with tpl._lock:
            chan = tpl._chan
            if chan is None or chan.closed or not chan.pending_output:
                return
            try:
                if chan.flush():
                    return
            except (BrokenChannelError, OSError):
                return  # the template is gone: the next step raises BrokenTemplateError
        await _any_ready([(chan.fileno(), True)])


async def _call(tpl: Template, kind: int, payload: bytes) -> Any:
    call_id = next(_ids)
    async with _lock_for(tpl):
        tpl._send(kind, P.with_call(call_id, payload))
        return await _next_frame(tpl, P.NAMES[kind], call_id)


async def require(tpl: Template, *modules: str) -> Template:
    """``tpl.require(*modules)`` without blocking the loop. Returns ``tpl``."""
    for name in modules:
        if not isinstance(name, str) or not name:
            raise TypeError(f"require({name!r}): module names are non-empty strings")
    await _call(tpl, P.REQUIRE, P.dumps(modules))
    return tpl


async def eval(tpl: Template, source: str, *args: Any) -> Template:  # noqa: A001 - mirrors Template.eval
    """``tpl.eval(source, *args)`` without blocking the loop. Returns ``tpl``."""
    if not isinstance(source, str):
        raise TypeError(f"eval(): source must be a str, got {type(source).__name__}")
    await _call(tpl, P.EVAL, P.dumps((source, args)))
    return tpl


async def run(
    tpl: Template,
    target: Target,
    *,
    check: bool = False,
    timeout: Optional[float] = None,
    die_with_parent: Union[bool, int] = False,
) -> "AsyncChild":
    """``tpl.run(target)`` without blocking the loop; returns an ``AsyncChild``.

    Cancelled before it returns, it SIGKILLs and reaps the worker it was
    starting (as ``Template.run`` does on Ctrl-C).
    """
    spec = tpl._run_spec(target, die_with_parent)
    call_id = next(_ids)
    async with _lock_for(tpl):
        child = None
        refilled = False
        try:
            base = tpl._base if tpl._status == "pending" else None
            if base is not None:
                await _flushed(base)
            with deferred(), tpl._lock:
                tpl._start_run(spec, call_id)
            frame = await _next_frame(tpl, "run", call_id)
            with deferred(), tpl._lock:
                child = tpl._finish_run(frame, f"{spec[0]}:{spec[1]}", check, timeout)
                refilled = True
                tpl._refill_base(child)
                tpl._child = None  # it is the caller's now
                return AsyncChild(child)
        except BaseException:
            with tpl._lock:
                tpl._run_interrupted(child)
                if not refilled:
                    tpl._refill_base(None)
            raise


async def wait(child: Child, timeout: Optional[float] = None) -> int:
    """Await the exit of ``child`` (a ``Child``) and return its returncode.

    Raises ``subprocess.TimeoutExpired`` after ``timeout`` seconds (the
    child keeps running).  As ``Child.wait``: with ``check``, a non-zero
    returncode raises ``CalledProcessError``.
    """
    code = await _wait(child, timeout)
    child._check_status(code)
    return code


async def _wait(child: Child, timeout: Optional[float] = None) -> int:
    """``wait`` without ``check``."""
    with child._waiting() as pidfd:
        if pidfd is not None:
            try:
                await asyncio.wait_for(_fd_ready(pidfd), timeout)
            except asyncio.TimeoutError:
                raise child._timeout(timeout) from None
    return child._reap_after_wait()


class AsyncChild:
    """A ``Child`` with awaitable ``wait``/``stop`` and ``async with``.

    Everything else (``pid``, ``control``, ``args``, ``stdin``/``stdout``/
    ``stderr``, ``returncode``, ``poll``, ``send_signal``, ``terminate``,
    ``kill``) is the wrapped child's.
    ``async with`` waits for the exit when the block ends normally (raising
    ``CalledProcessError`` with ``check``) and stops the child when it raises.
    """

    def __init__(self, child: Child) -> None:
        self.child = child

    def __getattr__(self, name: str) -> Any:
        return getattr(self.child, name)

    def __repr__(self) -> str:
        return repr(self.child).replace("forkserver.Child", "forkserver.aio.AsyncChild")

    async def wait(self, timeout: Optional[float] = None) -> int:
        """Await the exit; see ``forkserver.aio.wait``."""
        return await wait(self.child, timeout)

    async def stop(self, grace: float = 5.0, signals: Sequence[int] = (signal.SIGTERM,)) -> int:
        """The stop ladder of ``Child.stop``, awaited."""
        for sig in signals:
            if self.child.poll() is not None:
                return self.child.returncode  # type: ignore[return-value]
            self.child.send_signal(sig)
            try:
                return await _wait(self.child, grace)
            except subprocess.TimeoutExpired:
                continue
        self.child.kill()
        return await _wait(self.child)

    async def __aenter__(self) -> "AsyncChild":
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        child = self.child
        try:
            if exc_type is not None:
                await self.stop()
                return
            try:
                code = await _wait(child, child.exit_timeout)
            except subprocess.TimeoutExpired:
                await self.stop()
                raise
            child._check_status(code)
        finally:
            child.close()
