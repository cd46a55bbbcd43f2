"""Programs for asyncio: ``aio.spawn`` and ``aio.stream`` (re-exported by ``forkserver.aio``).

The same non-blocking steps as ``forkserver.stream`` (``_stream._Pump``),
awaited with ``loop.add_reader``/``add_writer``; no threads.
"""

from __future__ import annotations

import asyncio
import subprocess
from typing import TYPE_CHECKING, Any, List, Optional, Tuple

from .._async import AsyncChild, _any_ready, _fd_ready
from .._errors import BrokenTemplateError, CalledProcessError
from .._interrupts import deferred
from .._process import Child
from .._template import Template, default_template
from . import _spawn
from ._stream import CLOSE_GRACE, STOP_GRACE, _Pump, input_source, spawn_args

if TYPE_CHECKING:  # pragma: no cover
    from .._fds import FdChannel

__all__ = ["AsyncStream", "spawn", "stream"]


async def spawn(argv: Any, *, template: Optional[Template] = None, **kwargs: Any) -> AsyncChild:
    """``forkserver.spawn`` without blocking the loop on the template's reply."""
    plan: Optional[_spawn._Plan]
    reply: Optional[FdChannel]
    plan = reply = None
    tpl = template
    try:
        with deferred():  # Ctrl-C: between the steps, not inside one
            plan = _spawn.prepare(argv, **kwargs)
            if tpl is None:
                tpl = default_template()
            try:
                reply = _spawn.send(tpl, plan)
            except BrokenTemplateError:  # it had died; nothing reached it
                if template is not None:
                    raise
                tpl = default_template()
                reply = _spawn.send(tpl, plan)
        await _fd_ready(reply.fileno())  # the pid, then the whole reply follows at once
        with deferred():
            frame = _spawn.read_reply(tpl, reply)
            _spawn.close_sent(plan)
            return AsyncChild(_spawn.finish(plan, frame, reply))
    except BaseException:
        if reply is not None:
            _spawn.abandon(tpl, reply)  # cancelled: what it started is killed and reaped
        raise
    finally:
        if plan is not None:
            plan.discard()


class AsyncStream:
    """``forkserver.Stream`` for ``async for``; see ``forkserver.aio.stream``.

    The program starts at the first ``__anext__`` (or ``async with``), so an
    exec error is raised there.  ``pid``, ``args``, ``returncode``,
    ``stderr`` and ``child`` as on ``Stream``; ``aclose()`` stops a program
    whose output was not read to the end.
    """

    def __init__(
        self,
        argv: Any,
        input: Any = None,
        *,
        chunk_size: int = 65536,
        stderr: str = "inherit",
        timeout: Optional[float] = None,
        **spawn_kwargs: Any,
    ) -> None:
        if chunk_size <= 0:
            raise ValueError(f"stream(): chunk_size={chunk_size!r} must be positive")
        self._spawn_kwargs = dict(spawn_args(input, stderr, spawn_kwargs), **spawn_kwargs)
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

    pid = property(
        lambda self: self.child.pid if self.child else None, doc="The program's pid once started."
    )
    args = property(
        lambda self: self.child.args if self.child else self._argv, doc="The argument list."
    )
    returncode = property(
        lambda self: self.child.returncode if self.child else None, doc="Exit status once reaped."
    )

    def __repr__(self) -> str:
        state = self.child._state() if self.child else "not started"
        return f"<forkserver.aio.AsyncStream {self.args!r} pid={self.pid} {state}>"

    async def _start(self) -> None:
        self.child = (await spawn(self._argv, **self._spawn_kwargs)).child
        pending, source = self._first
        self._pump = _Pump(
            self.child,
            pending,
            source,
            self._chunk_size,
            fed_from_outside=self._async_input is not None,
        )

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
            await self.aclose(
                stop_now=isinstance(exc, (subprocess.TimeoutExpired, asyncio.CancelledError))
            )
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


def stream(
    argv: Any,
    input: Any = None,
    *,
    chunk_size: int = 65536,
    stderr: str = "inherit",
    timeout: Optional[float] = None,
    **spawn_kwargs: Any,
) -> AsyncStream:
    """``forkserver.stream`` as an async iterator: ``async for chunk in aio.stream(argv): ...``.

    Same semantics (back-pressure, input, stderr modes, errors, early stop
    with ``aclose()`` or ``async with``); ``input`` may also be an async
    iterable of ``bytes``.  The program starts at the first iteration.
    """
    return AsyncStream(
        argv, input, chunk_size=chunk_size, stderr=stderr, timeout=timeout, **spawn_kwargs
    )
