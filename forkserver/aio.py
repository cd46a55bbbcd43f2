"""asyncio support: await templates and children without blocking the event loop.

    import forkserver.aio as aio

    tpl = await aio.require(forkserver.Template(), "mymod")
    async with await aio.run(tpl.fork(), "mymod:work", check=True) as child:
        ...                                   # the block ends: await its exit
    code = child.returncode

    child = await aio.spawn(["convert", "in.png", "out.jpg"])   # an AsyncChild
    async for chunk in aio.stream(["gzip", "-c"], input=data):   # back-pressured
        ...

Waiting uses no threads: a child's exit is awaited on its pidfd, template
replies on their socket or reply pipe, and stream pipes, all with
``loop.add_reader``/``add_writer``.  ``Template()`` and ``fork()`` themselves
do not wait on anything long and stay synchronous.  Use one template either
from coroutines or from threads, not both at once.
"""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import weakref
from typing import Any, List, Optional, Sequence, Tuple, Union

from . import _protocol as P
from ._errors import BrokenTemplateError
from ._process import Child
from ._spawn import CalledProcessError
from ._template import _HELLO_READ, _WAIT, Target, Template

__all__ = ["require", "eval", "run", "wait", "spawn", "stream", "AsyncChild", "AsyncStream"]

_locks: "weakref.WeakKeyDictionary[Template, asyncio.Lock]" = weakref.WeakKeyDictionary()


def _lock_for(tpl: Template) -> asyncio.Lock:
    lock = _locks.get(tpl)
    if lock is None:
        lock = _locks[tpl] = asyncio.Lock()
    return lock


async def _fd_ready(fd: int, write: bool = False, delay: Optional[float] = None) -> None:
    """Resolve when ``fd`` is readable (or writable, with ``write``), or after ``delay``."""
    await _any_ready([(fd, False)] + ([(fd, True)] if write else []), delay)


async def _any_ready(fds: Sequence[Tuple[int, bool]], delay: Optional[float] = None) -> bool:
    """Resolve when one of the (fd, for writing) pairs is ready (True) or after ``delay`` (False)."""
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


async def _next_frame(tpl: Template, what: str) -> Any:
    while True:
        with tpl._lock:
            frame = tpl._step(what)
        if frame is _HELLO_READ:
            continue
        if frame is not _WAIT:
            return frame
        chan = tpl._chan
        delay = None
        if chan.stalled_until is not None:
            delay = max(0.0, chan.stalled_until - asyncio.get_running_loop().time())
        await _fd_ready(chan.fileno(), chan.pending_output, delay)


async def _call(tpl: Template, kind: int, payload: bytes) -> Any:
    async with _lock_for(tpl):
        tpl._send(kind, payload)
        return await _next_frame(tpl, P.NAMES[kind])


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
    """``tpl.run(target)`` without blocking the loop; returns an ``AsyncChild``."""
    async with _lock_for(tpl):
        with tpl._lock:
            name = tpl._start_run(target, die_with_parent)
        frame = await _next_frame(tpl, "run")
        with tpl._lock:
            return AsyncChild(tpl._finish_run(frame, name, check, timeout))


async def wait(child: Child, timeout: Optional[float] = None) -> int:
    """Await the exit of ``child`` (a ``Child``) and return its returncode.

    Raises ``subprocess.TimeoutExpired`` after ``timeout`` seconds (the
    child keeps running).
    """
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
                return await self.wait(grace)
            except subprocess.TimeoutExpired:
                continue
        self.child.kill()
        return await self.wait()

    async def __aenter__(self) -> "AsyncChild":
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        child = self.child
        try:
            if exc_type is not None:
                await self.stop()
                return
            try:
                code = await self.wait(child.exit_timeout)
            except subprocess.TimeoutExpired:
                await self.stop()
                raise
            if child.check and code != 0:
                raise CalledProcessError(code, child._cmd())
        finally:
            child.close()


# -- programs ------------------------------------------------------------------------


async def spawn(argv: Any, **kwargs: Any) -> AsyncChild:
    """``forkserver.spawn`` without blocking the loop on the template's reply."""
    from . import _spawn
    from ._template import default_template

    plan = _spawn.prepare(argv, **kwargs)
    try:
        tpl = default_template()
        try:
            r = _spawn.send(tpl, plan)
        except BrokenTemplateError:  # it had died; nothing reached it
            tpl = default_template()
            r = _spawn.send(tpl, plan)
        for fd in plan.close_after_send:
            os.close(fd)
        plan.close_after_send = []
        try:
            await _fd_ready(r)  # then the whole reply follows at once
        except BaseException:
            _spawn.abandon(tpl, r)  # cancelled: end what it started
            os.close(r)
            raise
        kind, payload = _spawn.read_reply(tpl, r)
        return AsyncChild(_spawn.finish(plan, kind, payload))
    finally:
        plan.discard()


class AsyncStream:
    """``forkserver.Stream`` for ``async for``; see ``forkserver.aio.stream``.

    The program starts at the first ``__anext__`` (or ``async with``), so an
    exec error is raised there.  ``pid``, ``args``, ``returncode``,
    ``stderr`` and ``child`` as on ``Stream``; ``aclose()`` stops a program
    whose output was not read to the end.
    """

    def __init__(self, argv: Any, input: Any = None, *, chunk_size: int = 65536, stderr: str = "inherit",
                 timeout: Optional[float] = None, **spawn_kwargs: Any) -> None:
        from ._stream import input_source, spawn_args

        if chunk_size <= 0:
            raise ValueError(f"stream(): chunk_size={chunk_size!r} must be positive")
        self._spawn_kwargs = dict(spawn_args(input, stderr), **spawn_kwargs)
        self._argv = argv
        self._async_input = None
        if hasattr(input, "__aiter__") and not hasattr(input, "__iter__"):
            self._async_input = input.__aiter__()
            self._first: Tuple[Optional[memoryview], Any] = (None, None)
        else:
            self._first = input_source(input, chunk_size)
        self._chunk_size = chunk_size
        self.timeout = timeout
        self.stderr: Optional[bytes] = None
        self._piped_err = stderr == "pipe"
        self.child: Optional[Child] = None
        self._pump: Any = None
        self._closed = False

    pid = property(lambda self: self.child.pid if self.child else None, doc="The program's pid once started.")
    args = property(lambda self: self.child.args if self.child else self._argv, doc="The argument list.")
    returncode = property(lambda self: self.child.returncode if self.child else None, doc="Exit status once reaped.")

    def __repr__(self) -> str:
        state = self.child._state() if self.child else "not started"
        return f"<forkserver.aio.AsyncStream {self.args!r} pid={self.pid} {state}>"

    async def _start(self) -> None:
        from ._stream import _Pump

        self.child = (await spawn(self._argv, **self._spawn_kwargs)).child
        pending, source = self._first
        self._pump = _Pump(self.child, pending, source, self._chunk_size,
                           fed_from_outside=self._async_input is not None)

    def __aiter__(self) -> "AsyncStream":
        return self

    async def __anext__(self) -> bytes:
        if self._closed:
            raise StopAsyncIteration
        if self.child is None:
            await self._start()
        pump = self._pump
        try:
            while True:
                data = pump.read_out()
                if data:
                    return data
                if data is not None:
                    await self._finish()
                    raise StopAsyncIteration
                await self._wait(pump.interest(with_out=True))
                await self._feed()
                pump.drain_err()
        except (StopAsyncIteration, CalledProcessError):
            raise
        except BaseException as exc:
            await self.aclose(stop_now=isinstance(exc, (subprocess.TimeoutExpired, asyncio.CancelledError)))
            raise

    async def _feed(self) -> None:
        pump, source = self._pump, self._async_input
        if source is None:
            pump.write_in()
            return
        while pump.write_in(refill=False):  # the pipe takes more than we have
            try:
                chunk = await source.__anext__()
            except StopAsyncIteration:
                pump.close_input()
                return
            pump.take(chunk)

    async def _wait(self, fds: List[Tuple[int, bool]], pidfd: Optional[int] = None) -> None:
        if pidfd is not None:
            fds = fds + [(pidfd, False)]
        if not await _any_ready(fds, self.timeout):
            raise subprocess.TimeoutExpired(self.args, self.timeout)  # type: ignore[arg-type]

    async def _finish(self) -> None:
        pump, child = self._pump, self.child
        assert child is not None
        with child._waiting() as pidfd:
            while pidfd is not None and child.poll() is None:
                await self._wait(pump.interest(with_out=False), pidfd)
                await self._feed()
                pump.drain_err()
        pump.drain_err()
        self._end()
        if child.returncode:
            raise CalledProcessError(child.returncode, self.args, None, self.stderr)

    def _end(self) -> None:
        self._closed = True
        if self._pump is not None:
            self._pump.close_all()
            if self._piped_err:
                self.stderr = self._pump.stderr_bytes()

    async def aclose(self, stop_now: bool = False) -> None:
        """``Stream.close``, awaited: stop an unfinished program, reap it.  Idempotent."""
        from ._stream import CLOSE_GRACE, STOP_GRACE

        if self._closed:
            return
        if self.child is None:
            self._closed = True
            return
        child = AsyncChild(self.child)
        try:
            if stop_now:
                self._end()
                await child.stop(STOP_GRACE)
            elif self._pump.eof:
                self._pump.drain_err()
                self._pump.close_input()
                await child.wait(self.timeout)
            else:
                self._end()
                try:
                    await child.wait(CLOSE_GRACE)
                except subprocess.TimeoutExpired:
                    await child.stop(STOP_GRACE)
        except subprocess.TimeoutExpired:
            await child.stop(STOP_GRACE)
        finally:
            self._end()

    async def __aenter__(self) -> "AsyncStream":
        if self.child is None:
            await self._start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __del__(self) -> None:
        # Dropped unfinished without aclose(): no awaiting here, so close our
        # ends, SIGTERM a program whose output had not ended, and let the
        # reaper collect it (Child.__del__).  aclose() does the full ladder.
        try:
            if not self._closed and self.child is not None:
                eof = self._pump.eof
                self._end()
                if not eof:
                    self.child.terminate()
        except Exception:
            pass


def stream(argv: Any, input: Any = None, *, chunk_size: int = 65536, stderr: str = "inherit",
           timeout: Optional[float] = None, **spawn_kwargs: Any) -> AsyncStream:
    """``forkserver.stream`` as an async iterator: ``async for chunk in aio.stream(argv): ...``.

    Same semantics (back-pressure, input, stderr modes, errors, early stop
    with ``aclose()`` or ``async with``); ``input`` may also be an async
    iterable of ``bytes``.  The program starts at the first iteration.
    """
    return AsyncStream(argv, input, chunk_size=chunk_size, stderr=stderr, timeout=timeout, **spawn_kwargs)
