"""``Child``: a running worker process, in the parent."""
from __future__ import annotations

import os
import signal
import socket
import threading
from typing import Optional

from ._wait import open_pidfd, reap, reap_now


class Child:
    """A process started by ``Template.run``: your direct child.

    ``control`` is the process's end of its command socket turned control
    socket (non-blocking, close-on-exec here; the worker got the other end as
    its first argument).  ``wait``/``poll``/``returncode`` follow
    ``subprocess.Popen``: a negative returncode is the signal that ended it.
    """

    def __init__(
        self, pid: int, control: socket.socket, target: str = "", pidfd: Optional[int] = None
    ) -> None:
        self.pid = pid
        self.control = control
        self.target = target
        self.returncode: Optional[int] = None
        self._pidfd: Optional[int] = open_pidfd(pid) if pidfd is None else pidfd
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<forkserver.Child pid={self.pid} {self._state()}>"

    def _state(self) -> str:
        code = self.returncode
        if code is None:
            return "running"
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exited {code}"

    def _reaped(self, code: Optional[int]) -> Optional[int]:
        if code is not None and self.returncode is None:
            self.returncode = code
            if self._pidfd is not None:
                os.close(self._pidfd)
                self._pidfd = None
        return self.returncode

    def poll(self) -> Optional[int]:
        """The returncode if the process has exited (reaping it), else None."""
        with self._lock:
            if self.returncode is not None:
                return self.returncode
            return self._reaped(reap_now(self.pid))

    def wait(self, timeout: Optional[float] = None) -> int:
        """Wait for the process to exit and return its returncode.

        Raises ``subprocess.TimeoutExpired`` if it is still running after
        ``timeout`` seconds (the process is left running).
        """
        import subprocess

        if self.returncode is not None:
            return self.returncode
        pidfd = self._pidfd
        if pidfd is not None:
            from ._wait import wait_readable

            if not wait_readable(pidfd, timeout):
                raise subprocess.TimeoutExpired(self.target or str(self.pid), timeout)
        code = self.poll()
        assert code is not None
        return code

    def close(self) -> None:
        """Close the parent's end of the control socket (the process keeps running)."""
        self.control.close()
