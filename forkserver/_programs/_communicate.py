"""``Child.communicate`` for programs: feed stdin, collect stdout/stderr, wait.

As ``Popen.communicate``; ``spawn`` attaches it to the ``Child`` it returns
(``_run.py``'s ``run_program`` is ``subprocess.run`` on top of it).

One thread, one ``poll`` loop: input is written in ``PIPE_BUF`` pieces when
stdin is writable (a write of at most ``PIPE_BUF`` bytes to a pipe that
polled writable never blocks), output is read as it comes, so the program
never blocks on a full pipe while we block on another.  The state survives a
``TimeoutExpired``, so a second call goes on where the first stopped; the
exception carries the output read so far (bytes, as ``Popen``'s does).

In text mode (``spawn(text=True)``, an ``encoding``...) ``input`` is a
``str``, encoded with the child's codec, and the output is decoded with it,
newlines translated (``\\r\\n`` and ``\\r`` become ``\\n``), as ``Popen`` does.

It survives a ``KeyboardInterrupt`` the same way: each read is stored, and
each write counted, with Ctrl-C deferred between the syscall and the
statement that records it (``_interrupts``), so the interrupt comes in the
``poll`` wait or between two steps, and a second ``communicate()`` returns
every byte exactly once.  The second call may pass the same input object
again (so ``communicate(data)`` can simply be retried): what was written
already is not written twice.
"""

from __future__ import annotations

import os
import select
import subprocess
import time
from typing import Any, Dict, List, Optional, Tuple

from .._interrupts import deferred

_PIPE_BUF = select.PIPE_BUF
_READ = 32768
_DRAIN_STEPS = 64  # x _READ = 2 MiB


class _State:
    def __init__(self, child: Any, data: Optional[bytes], given: Any = None) -> None:
        self.input = given  # as given: a later call may pass the same object again
        self.view = memoryview(data or b"").cast("B")
        self.offset = 0
        self.fds = [
            None if s is None or s.closed else s.fileno() for s in (child.stdout, child.stderr)
        ]
        self.chunks: Dict[int, List[bytes]] = {fd: [] for fd in self.fds if fd is not None}
        self.streams: Dict[int, Any] = {}  # fd -> file object still open
        for stream in (child.stdout, child.stderr):
            if stream is not None and not stream.closed:
                self.streams[stream.fileno()] = stream
        self.stdin: Any = child.stdin if child.stdin is not None and not child.stdin.closed else None
        if self.stdin is not None:
            try:
                self.stdin.flush()  # what the caller wrote before us goes first
            except BrokenPipeError:
                pass
            if not self.view:
                self._close_stdin()

    def _close_stdin(self) -> None:
        """The program sees the end of its input; stdin is closed and forgotten at once."""
        try:
            self.stdin = self.stdin.close()  # close() returns None
        except BrokenPipeError:  # it exited without reading everything: not an error
            self.stdin = None  # (the file is closed all the same)

    @property
    def pending(self) -> bool:
        """Whether a stream is still open (output to read, input to write)."""
        return bool(self.streams) or self.stdin is not None

    def step(self, timeout: Optional[float]) -> bool:
        """Wait up to ``timeout`` and move whatever is ready; False if nothing moved."""
        if self.stdin is not None and self.stdin.closed:
            self.stdin = None  # an error cut _close_stdin short after the close
        poller = select.poll()
        for fd in self.streams:
            poller.register(fd, select.POLLIN)
        if self.stdin is not None:
            poller.register(self.stdin.fileno(), select.POLLOUT)
        if not self.pending:
            return False
        ms = None if timeout is None else int(timeout * 1000) + 1 if timeout > 0 else 0
        ready = poller.poll(ms)
        for fd, _ in ready:
            with deferred():  # the read and its record, or neither
                if self.stdin is not None and fd == self.stdin.fileno():
                    self._write()
                elif fd in self.streams:
                    self._read(fd)
        return bool(ready)

    def _read(self, fd: int) -> None:
        """One read from ``fd``, kept; at EOF the stream is closed.  Call with Ctrl-C deferred."""
        chunks = self.chunks[fd]
        chunks.append(os.read(fd, _READ))  # read and kept in one statement
        if not chunks[-1]:  # EOF
            chunks.pop()
            self.streams.pop(fd).close()

    def _write(self) -> None:
        piece = self.view[self.offset : self.offset + _PIPE_BUF]
        try:
            self.offset += os.write(self.stdin.fileno(), piece)
        except BrokenPipeError:
            self.offset = len(self.view)  # the program stopped reading: fine
        if self.offset >= len(self.view):
            self._close_stdin()

    def output(self) -> List[Optional[bytes]]:
        """stdout and stderr as read so far (None for a stream that is no pipe)."""
        out: List[Optional[bytes]] = []
        for fd in self.fds:
            if fd is None:
                out.append(None)
                continue
            data = b"".join(self.chunks[fd])
            self.chunks[fd] = [data]  # joined once: asking again costs no copy
            out.append(data)
        return out

    def drain_ready(self) -> None:
        """Read what the pipes hold now, without waiting (a grandchild may keep them open).

        At most ``_DRAIN_STEPS`` reads per pipe: enough to empty the biggest
        pipe buffer Linux allows (1 MiB by default), and a bound when the
        writer is a grandchild still writing as fast as we read.
        """
        if self.stdin is not None:
            self._close_stdin()
        for _ in range(_DRAIN_STEPS):
            if not (self.streams and self.step(0)):
                break


def _input_bytes(child: Any, data: Any) -> Optional[bytes]:
    """``communicate``'s input as bytes: encoded in text mode, checked in both."""
    if data is None:
        return None
    if child.text_mode:
        if not isinstance(data, str):
            raise TypeError(
                f"communicate() on {child!r}: in text mode input is a str, got "
                f"{type(data).__name__}; decode it, or spawn without text=/encoding="
            )
        return data.encode(child.encoding, child.errors or "strict")
    if isinstance(data, str):
        raise TypeError(
            f"communicate() on {child!r}: input is bytes unless the program was spawned in "
            "text mode; encode the str, or spawn with text=True (or an encoding)"
        )
    return data


def communicate(
    child: Any, data: Any, timeout: Optional[float]
) -> Tuple[Any, Any]:
    """See ``Child.communicate``."""
    if child._comm is None:
        if data is not None and child.stdin is None:
            raise ValueError(
                f"communicate() on {child!r}: input given but stdin is not a pipe; "
                "spawn with stdin=PIPE"
            )
        state = child._comm = _State(child, _input_bytes(child, data), data)
    else:
        state = child._comm
        if data and data is not state.input:
            raise ValueError(
                f"communicate() on {child!r}: input can only be given on the first call "
                "(or the same object again, after an interruption: it is not written twice)"
            )
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while state.pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            state.step(left)
            if deadline is not None and time.monotonic() >= deadline and state.pending:
                raise child._timeout(timeout)
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        child._wait(left, reported=timeout)  # TimeoutExpired.timeout: the one given
    except subprocess.TimeoutExpired as exc:
        exc.output, exc.stderr = state.output()
        raise
    raw = state.output()
    if child.text_mode:
        return tuple(None if b is None else _decode(child, b) for b in raw)  # type: ignore
    return raw[0], raw[1]


def _decode(child: Any, data: bytes) -> str:
    text = data.decode(child.encoding, child.errors or "strict")
    return text.replace("\r\n", "\n").replace("\r", "\n")
