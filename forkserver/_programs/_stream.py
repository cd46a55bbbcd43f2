"""``forkserver.stream``: a program's stdout as an iterator of chunks, with back-pressure.

No helper threads and no buffering of our own: each ``next()`` runs a small
``poll`` loop that writes pending input while the program's stdin is
writable, drains a piped stderr, and returns as soon as one chunk of stdout
has been read.  Between calls nothing is read, so a fast program fills the
pipe (64 KiB) and then blocks in its ``write``: memory stays flat whatever
it produces.  (Exile's demand-driven I/O.)

The steps are non-blocking calls on ``_Pump``, shared with the asyncio
version in ``forkserver.aio``, which waits with ``loop.add_reader/
add_writer`` instead of ``poll``.
"""

from __future__ import annotations

import os
import select
import subprocess
from subprocess import DEVNULL, PIPE, STDOUT
from typing import Any, Callable, Iterator, List, Optional, Tuple

from .._errors import CalledProcessError
from .._process import Child
from ._spawn import Argv, spawn

__all__ = ["Stream", "stream"]

STDERR_MODES = {"inherit": None, "stdout": STDOUT, "discard": DEVNULL, "pipe": PIPE}
CLOSE_GRACE = 1.0  # seconds an early-stopped program gets to notice its closed pipes
STOP_GRACE = 5.0  # then SIGTERM, and this long before SIGKILL


_TEXT_OPTIONS = ("text", "universal_newlines", "encoding", "errors")


def spawn_args(input: Any, stderr: str, spawn_kwargs: Any = ()) -> dict:
    """The stdio of ``spawn`` for a stream (``spawn_kwargs``: the caller's other options)."""
    text = [name for name in _TEXT_OPTIONS if name in spawn_kwargs and spawn_kwargs[name]]
    if text:
        raise TypeError(
            f"stream(): {text[0]}= is not supported: a stream yields bytes chunks, which may "
            "end inside a character; decode them with codecs.iterdecode(stream, encoding), "
            "or use run_program(..., text=True)"
        )
    if stderr not in STDERR_MODES:
        raise ValueError(
            f"stream(): stderr={stderr!r}; use one of {', '.join(map(repr, STDERR_MODES))}"
        )
    if isinstance(input, str):
        raise TypeError(
            "stream(): input is a str; pass bytes (encode it), an iterable of bytes "
            "or a binary file"
        )
    return {
        "stdin": DEVNULL if input is None else PIPE,
        "stdout": PIPE,
        "stderr": STDERR_MODES[stderr],
    }


def input_source(
    input: Any, chunk_size: int
) -> Tuple[Optional[memoryview], Optional[Callable[[], Optional[bytes]]]]:
    """(first pending bytes, a function giving the next chunk or None at the end)."""
    if input is None:
        return None, None
    if isinstance(input, (bytes, bytearray, memoryview)):
        return memoryview(input).cast("B"), None
    read = getattr(input, "read", None)
    if read is not None:
        return None, lambda: read(chunk_size) or None
    if hasattr(input, "__iter__"):
        it = iter(input)
        return None, lambda: next(it, None)
    if hasattr(input, "__aiter__"):
        raise TypeError("stream(): an async iterable input needs forkserver.aio.stream")
    raise TypeError(
        f"stream(): input={input!r}; pass bytes, an iterable of bytes, a binary file or None"
    )


class _Pump:
    """The non-blocking steps of a stream over a program's pipes."""

    def __init__(
        self,
        child: Child,
        pending: Optional[memoryview],
        source: Any,
        chunk_size: int,
        fed_from_outside: bool = False,
        blocking_out: bool = False,
    ) -> None:
        self.child = child
        self.chunk_size = chunk_size
        self.inp: Optional[int] = _nonblocking(child.stdin)
        self.err: Optional[int] = _nonblocking(child.stderr)
        # Nothing but stdout to service: a blocking read is all next() needs,
        # and saves the EAGAIN + poll when we read faster than the program writes.
        self.blocking = blocking_out and self.inp is None and self.err is None
        self.out: Optional[int] = (  # (a stream always pipes stdout)
            child.stdout.fileno() if self.blocking else _nonblocking(child.stdout)  # type: ignore[union-attr]
        )
        self.pending = pending if pending is not None else memoryview(b"")
        self.source = source  # () -> bytes or None; None: nothing more than pending
        self.err_chunks: List[bytes] = []
        self.eof = False
        if self.inp is not None and not self.pending and source is None and not fed_from_outside:
            self.close_input()

    def read_out(self) -> Optional[bytes]:
        """One chunk of stdout, ``b""`` at its end, None if none is ready."""
        try:
            data = os.read(self.out, self.chunk_size)  # type: ignore[arg-type]
        except BlockingIOError:
            return None
        if not data:
            self.eof = True
            self._close("out", self.child.stdout)
        return data

    def write_in(self, refill: bool = True) -> bool:
        """Write what stdin takes now; True if it could take more than we have.

        With ``refill``, the next chunks come from ``source`` and stdin is
        closed at the end of the input; without, the caller refills with
        ``take`` (the async iterables of ``forkserver.aio``).
        """
        while self.inp is not None:
            if not self.pending:
                if not refill:
                    return True
                if not self._pull():
                    self.close_input()
                    return False
            try:
                written = os.write(self.inp, self.pending)
            except BlockingIOError:
                return False
            except BrokenPipeError:  # it exited or closed stdin without reading all: fine
                self.close_input()
                return False
            self.pending = self.pending[written:]
        return False

    def _pull(self) -> bool:
        while self.source is not None:
            chunk = self.source()
            if chunk is None:
                self.source = None
            elif self.take(chunk):
                return True
        return False

    def take(self, chunk: Any) -> bool:
        """Make ``chunk`` the pending input; False if it is empty."""
        if isinstance(chunk, str) or not isinstance(chunk, (bytes, bytearray, memoryview)):
            raise TypeError(
                f"stream(): an input chunk is {type(chunk).__name__}; chunks must be bytes"
            )
        self.pending = memoryview(chunk).cast("B")
        return bool(self.pending)

    def drain_err(self) -> None:
        """Read what stderr holds now (the program never blocks on a full stderr pipe)."""
        while self.err is not None:
            try:
                data = os.read(self.err, 65536)
            except BlockingIOError:
                return
            if not data:
                self._close("err", self.child.stderr)
                return
            self.err_chunks.append(data)

    def close_input(self) -> None:
        self._close("inp", self.child.stdin)
        self.pending = memoryview(b"")
        self.source = None

    def _close(self, attr: str, stream: Any) -> None:
        setattr(self, attr, None)
        if stream is not None:
            try:
                stream.close()
            except OSError:  # BrokenPipeError from a buffered writer: nothing is buffered
                pass

    def close_all(self) -> None:
        self._close("out", self.child.stdout)
        self.close_input()
        self._close("err", self.child.stderr)

    def interest(self, with_out: bool) -> List[Tuple[int, bool]]:
        """(fd, for writing) pairs to wait on."""
        fds = [(self.inp, True)] if self.inp is not None else []
        if self.err is not None:
            fds.append((self.err, False))
        if with_out and self.out is not None:
            fds.append((self.out, False))
        return fds

    def stderr_bytes(self) -> bytes:
        return b"".join(self.err_chunks)


def _nonblocking(stream: Any) -> Optional[int]:
    if stream is None:
        return None
    fd = stream.fileno()
    os.set_blocking(fd, False)
    return fd


class Stream:
    """The stdout of a program as an iterator of ``bytes`` chunks; see ``forkserver.stream``.

    ``pid``, ``args``, ``returncode`` (None until reaped), ``stderr`` (the
    captured bytes with ``stderr="pipe"``, once the program has ended) and
    ``child`` (its ``Child``).  ``close()``, or leaving a ``with`` block,
    stops a program whose output was not read to the end.
    """

    def __init__(
        self,
        argv: Argv,
        input: Any = None,
        *,
        chunk_size: int = 65536,
        stderr: str = "inherit",
        timeout: Optional[float] = None,
        **spawn_kwargs: Any,
    ) -> None:
        if chunk_size <= 0:
            raise ValueError(f"stream(): chunk_size={chunk_size!r} must be positive")
        kwargs = spawn_args(input, stderr, spawn_kwargs)
        pending, source = input_source(input, chunk_size)
        self.timeout = timeout
        self.stderr: Optional[bytes] = None
        self._piped_err = stderr == "pipe"
        self._closed = False
        self._poller: Any = None
        self._polled: List[Tuple[int, bool]] = []
        self.child = spawn(argv, **kwargs, **spawn_kwargs)
        self._pump = _Pump(self.child, pending, source, chunk_size, blocking_out=timeout is None)

    pid = property(lambda self: self.child.pid, doc="The program's pid.")
    args = property(lambda self: self.child.args, doc="The program's argument list.")
    returncode = property(
        lambda self: self.child.returncode, doc="Its exit status once reaped, else None."
    )

    def __repr__(self) -> str:
        return f"<forkserver.Stream {self.args!r} pid={self.pid} {self.child._state()}>"

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        if self._closed:
            raise StopIteration
        pump = self._pump
        try:
            while True:
                if not pump.blocking:
                    # Poll first: after the last chunk the pipe is usually empty, and
                    # a read that fails with EAGAIN costs more than the poll it saves.
                    self._wait(pump.interest(with_out=True))
                    pump.write_in()
                    pump.drain_err()
                data = pump.read_out()  # blocking: waits for the chunk itself
                if data:
                    return data
                if data is not None:  # end of stdout
                    self._finish()
                    raise StopIteration
        except (StopIteration, CalledProcessError):
            raise
        except BaseException as exc:
            # A timeout, a bad input chunk, Ctrl-C: stop the program (at once on a timeout).
            self.close(stop_now=isinstance(exc, subprocess.TimeoutExpired))
            raise

    def _wait(self, fds: List[Tuple[int, bool]], pidfd: Optional[int] = None) -> None:
        """Wait until one of ``fds`` (or the exit) is ready; TimeoutExpired after ``timeout``."""
        if pidfd is not None:
            fds = fds + [(pidfd, False)]
        if fds != self._polled:  # the poll object is reused while the fds stay the same
            self._poller = select.poll()
            for fd, write in fds:
                self._poller.register(fd, select.POLLOUT if write else select.POLLIN)
            self._polled = fds
        poller = self._poller
        timeout = self.timeout
        if not poller.poll(None if timeout is None else int(timeout * 1000) + 1):
            raise subprocess.TimeoutExpired(self.args, timeout)  # type: ignore[arg-type]

    def _finish(self) -> None:
        """After the end of stdout: feed and drain until the program exits, then judge the exit."""
        pump, child = self._pump, self.child
        with child._waiting() as pidfd:
            while pidfd is not None and child.poll() is None:
                self._wait(pump.interest(with_out=False), pidfd=pidfd)
                pump.write_in()
                pump.drain_err()
        pump.drain_err()  # what it wrote before exiting is all in the pipe now
        self._end()
        code = child.returncode
        if code:
            raise CalledProcessError(code, self.args, None, self.stderr)

    def _end(self) -> None:
        self._closed = True
        self._pump.close_all()
        if self._piped_err:
            self.stderr = self._pump.stderr_bytes()

    def close(self, stop_now: bool = False) -> None:
        """Stop reading: a program that had not finished its output is stopped and reaped.

        Our ends of its pipes are closed first (a writer gets SIGPIPE), then
        it gets a second to exit, then ``Child.stop()`` (SIGTERM, SIGKILL).
        A program whose output had ended is only waited for (``timeout``):
        it is about to exit by itself.  ``stop_now=True`` skips the grace:
        the program is stopped at once, even one whose output had ended.
        Idempotent; never raises for the exit status.
        """
        if self._closed:
            return
        pump, child = self._pump, self.child
        try:
            if stop_now:
                self._end()
                child.stop(STOP_GRACE)
            elif pump.eof:
                pump.drain_err()
                pump.close_input()
                child.wait(self.timeout)
            else:
                self._end()
                try:
                    child.wait(CLOSE_GRACE)
                except subprocess.TimeoutExpired:
                    child.stop(STOP_GRACE)
        except subprocess.TimeoutExpired:
            child.stop(STOP_GRACE)
        finally:
            self._end()

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Dropped mid-way (a `break` out of a for loop over stream(...)): stop it.
        try:
            if not self._closed:
                self.close()
        except Exception:
            pass


def stream(
    argv: Argv,
    input: Any = None,
    *,
    chunk_size: int = 65536,
    stderr: str = "inherit",
    timeout: Optional[float] = None,
    **spawn_kwargs: Any,
) -> Stream:
    """Run ``argv`` and iterate over its stdout in chunks of at most ``chunk_size`` bytes.

    Nothing is read before you ask for the next chunk (back-pressure: a fast
    program waits for a slow consumer, memory stays flat).  ``input`` is
    ``bytes``, an iterable of ``bytes``, a binary file, or None (stdin is
    ``/dev/null``); stdin is closed when the input ends, and a program that
    exits without reading all of it is fine.  ``stderr``: ``"inherit"``,
    ``"stdout"`` (merged into the chunks), ``"discard"`` or ``"pipe"``
    (collected, available as ``.stderr`` at the end).  After the last chunk
    the program's exit is awaited; a non-zero status raises
    ``forkserver.CalledProcessError`` (with ``stderr`` when piped).  Stopping
    early (``break``, an exception, ``close()``) stops and reaps it.
    ``timeout`` bounds each wait for the program (for a chunk, for its exit)
    -- not your time between chunks -- and raises
    ``subprocess.TimeoutExpired`` after stopping it.  ``env``, ``cwd`` and
    other ``spawn`` keywords are passed on.
    """
    return Stream(
        argv, input, chunk_size=chunk_size, stderr=stderr, timeout=timeout, **spawn_kwargs
    )
