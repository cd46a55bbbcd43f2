"""Reaping what the user dropped: no zombie outlives a forgotten Child or Template.

A ``Child`` or ``Template`` garbage-collected while its process still runs
hands the process here.  One daemon thread (started on first use) polls the
pidfds of those processes and ``waitpid``s each as soon as it exits.  The
parent never forks, so a thread costs nothing in safety; it only ever waits
on pids we own, never ``waitpid(-1)``, so it cannot steal another library's
child.

The thread ends as soon as nothing is left to wait for.

A dropped template whose greeting (with its pid) was not read yet is handed
over as its channel: the thread reads the greeting, then waits for the pid.
"""
from __future__ import annotations

import os
import select
import threading
from typing import Dict, Optional

from . import _protocol as P
from ._errors import BrokenChannelError, ProtocolError
from ._fds import FdChannel
from ._wait import open_pidfd, reaped


class _Reaper:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._pids: Dict[int, int] = {}  # pidfd -> pid
        self._hellos: Dict[int, FdChannel] = {}  # fd -> channel awaiting its greeting
        self._wake_r = self._wake_w = -1
        self._thread: Optional[threading.Thread] = None

    def adopt(self, pid: int, pidfd: Optional[int]) -> None:
        """Reap ``pid`` once it exits (``pidfd`` is taken over, or opened here)."""
        if reaped(pid):
            if pidfd is not None:
                os.close(pidfd)
            return
        with self._lock:
            self._pids[open_pidfd(pid) if pidfd is None else pidfd] = pid
            self._start()

    def adopt_greeting(self, chan: FdChannel) -> None:
        """Read the greeting on ``chan`` (a template's pid), close it, then reap the pid."""
        with self._lock:
            self._hellos[chan.fileno()] = chan
            self._start()

    def pending(self) -> int:
        """How many processes and greetings are still waited for."""
        with self._lock:
            return len(self._pids) + len(self._hellos)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is pending and the thread has ended; False on timeout."""
        with self._idle:
            thread = self._thread
            if not self._idle.wait_for(lambda: not self._pids and not self._hellos, timeout):
                return False
        if thread is not None:
            thread.join(timeout)
            return not thread.is_alive()
        return True

    def standing_fds(self) -> set:
        """The reaper's own long-lived fds (its wake pipe)."""
        return {fd for fd in (self._wake_r, self._wake_w) if fd >= 0}

    def _start(self) -> None:  # lock held
        if self._thread is None:
            if self._wake_r < 0:
                self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            self._thread = threading.Thread(target=self._loop, name="forkserver-reaper", daemon=True)
            self._thread.start()
        else:
            try:
                os.write(self._wake_w, b"x")
            except BlockingIOError:
                pass  # already woken

    def _loop(self) -> None:
        while True:
            poller = select.poll()
            with self._lock:
                wake_r = self._wake_r
                fds = list(self._pids) + list(self._hellos)
            poller.register(wake_r, select.POLLIN)
            for fd in fds:
                poller.register(fd, select.POLLIN)
            for fd, _ in poller.poll():
                if fd == wake_r:
                    try:
                        os.read(wake_r, 4096)
                    except BlockingIOError:
                        pass
                    continue
                with self._lock:
                    self._ready(fd)
                    if not self._pids and not self._hellos:
                        # Nothing left: end the thread, so a program that os.fork()s
                        # later is single-threaded again (3.12+ warns otherwise).
                        self._thread = None
                        self._idle.notify_all()
                        return

    def _ready(self, fd: int) -> None:  # lock held
        if fd in self._pids:
            if reaped(self._pids[fd]):
                del self._pids[fd]
                os.close(fd)
            return
        chan = self._hellos.get(fd)
        if chan is None:
            return
        try:
            frame = chan.receive()
        except (BrokenChannelError, ProtocolError):
            frame = None  # the fork failed: no process to reap
        else:
            if frame is None:
                return  # a partial frame: wait for the rest
        del self._hellos[fd]
        chan.close()  # EOF: the template exits
        if frame is not None and frame.kind in (P.HELLO, P.RUNNING):
            pid = P.HELLO_FORMAT.unpack(frame.payload)[1]
            pidfd = open_pidfd(pid)
            if not reaped(pid):
                self._pids[pidfd] = pid
            else:
                os.close(pidfd)

    def after_fork_child(self) -> None:
        # Those processes are not this child's children; the thread is gone.
        if self._wake_r < 0 and not self._pids and not self._hellos:
            # never used (the case in templates): only the lock, which another
            # thread may have held at the fork, needs renewing
            self._lock = threading.Lock()
            self._idle = threading.Condition(self._lock)
            return
        for fd in self._pids:
            os.close(fd)
        for chan in self._hellos.values():
            chan.close()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self.__init__()  # type: ignore[misc]


reaper = _Reaper()
os.register_at_fork(after_in_child=reaper.after_fork_child)
