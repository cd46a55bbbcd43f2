"""``Child.communicate`` for programs: feed stdin, collect stdout/stderr, wait.

As ``Popen.communicate``; ``spawn`` attaches it to the ``Child`` it returns
(``_run.py``'s ``run_program`` is ``subprocess.run`` on top of it).

One thread, one ``poll`` loop: input is written in ``PIPE_BUF`` pieces when
stdin is writable (a write of at most ``PIPE_BUF`` bytes to a pipe that
polled writable never blocks), output is read as it comes, so the program
never blocks on a full pipe while we block on another.  The state survives a
``TimeoutExpired``, so a second call goes on where the first stopped.

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


class _State:
    def __init__(self, child: Any, data: Optional[bytes]) -> None:
        self.input = data  # as given: a later call may pass the same object again
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
        self.stdin = child.stdin if child.stdin is not None and not child.stdin.closed else None
        if self.stdin is not None:
            try:
                self.stdin.flush()  # what the caller wrote before us goes first
            except BrokenPipeError:
                pass
            if not self.view:
                self._close_stdin()

    def _close_stdin(self) -> None:
        try:
            self.stdin.close()  # the program sees the end of its input
        except BrokenPipeError:
            pass  # it exited without reading everything: not an error
        self.stdin = None

    def step(self, timeout: Optional[float]) -> bool:
        """Wait up to ``timeout`` and move whatever is ready; False if nothing is left to move."""
        poller = select.poll()
        for fd in self.streams:
            poller.register(fd, select.POLLIN)
        if self.stdin is not None:
            poller.register(self.stdin.fileno(), select.POLLOUT)
        if not self.streams and self.stdin is None:
            return False
        ms = None if timeout is None else int(timeout * 1000) + 1
        for fd, _ in poller.poll(ms):
            with deferred():  # the read and its record, or neither
                if self.stdin is not None and fd == self.stdin.fileno():
                    self._write()
                elif fd in self.streams:
                    chunks = self.chunks[fd]
                    chunks.append(os.read(fd, _READ))  # read and kept in one statement
                    if not chunks[-1]:  # EOF
                        chunks.pop()
                        self.streams.pop(fd).close()
        return True

    def _write(self) -> None:
        piece = self.view[self.offset : self.offset + _PIPE_BUF]
        try:
            self.offset += os.write(self.stdin.fileno(), piece)
        except BrokenPipeError:
            self.offset = len(self.view)  # the program stopped reading: fine
        if self.offset >= len(self.view):
            self._close_stdin()


def communicate(
    child: Any, data: Optional[bytes], timeout: Optional[float]
) -> Tuple[Optional[bytes], Optional[bytes]]:
    """See ``Child.communicate``."""
    if child._comm is None:
        if data is not None and child.stdin is None:
            raise ValueError(
                f"communicate() on {child!r}: input given but stdin is not a pipe; "
                "spawn with stdin=PIPE"
            )
        state = child._comm = _State(child, data)
    else:
        state = child._comm
        if data and data is not state.input:
            raise ValueError(
                f"communicate() on {child!r}: input can only be given on the first call "
                "(or the same object again, after an interruption: it is not written twice)"
            )
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not state.step(left):
            break
        if deadline is not None and time.monotonic() >= deadline and (state.streams or state.stdin):
            raise child._timeout(timeout)
    child.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
    out = [None if fd is None else b"".join(state.chunks[fd]) for fd in state.fds]
    return out[0], out[1]
