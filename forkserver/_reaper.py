"""Reaping what nobody waits for any more: no zombie outlives a forgotten Child or Template.

A ``Child`` or ``Template`` garbage-collected while its process still runs,
a call interrupted by Ctrl-C, a template found broken: each hands what it
owned here, and one daemon thread (started on first use, ended when idle)
waits for it.  It only ever waits on pids we own, never ``waitpid(-1)``, so
it cannot steal another library's child.  Three kinds of entries:

* a **pid** (with its pidfd): reaped as soon as it exits; SIGKILLed first
  if a deadline is given and passes (a closed template that did not exit).
* a **channel** whose process's pid may still be unread (a template dropped
  before its greeting, a spawn whose reply never came): its frames are read
  until the ``PID`` frame has told the pid (``FdChannel.peer_pid``), then
  the channel is closed (the template sees EOF and exits) and the pid is
  reaped.  A *doomed* channel's process is SIGKILLed as soon as its pid is
  known: a worker whose ``run()`` was interrupted, a program whose
  ``spawn()`` was -- nobody could reach them, so they must not run on.
  EOF before any pid means no process was made (or one was SIGKILLed
  before its first instruction; see docs/reliability.md).

Surviving anything.  Handing over never blocks and takes no lock a caller
may hold: finalizers hand over, and the garbage collector may run them in
any thread, this one included, at any allocation.  So entries go through a
deque that only the thread drains, and the thread is started with
``_thread.start_new_thread`` (``threading``'s bookkeeping takes locks a
finalizer could deadlock on).  An error on one entry drops that entry,
after one last ``waitpid`` on its pid where there is one, never the thread
(``errors`` counts them); a thread that died anyway is replaced at the next
hand-over.  The thread ends as soon as nothing is left to wait for, so a
program that ``os.fork()``s later is single-threaded again (3.12+ warns
otherwise).
"""
from __future__ import annotations

import _thread
import os
import select
import signal
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Deque, Dict, Optional

from ._errors import BrokenChannelError, ClosedError, ProtocolError
from ._fds import FdChannel, set_name
from ._slots import settle
from ._wait import ReapedElsewhere, is_our_child, open_pidfd, reap_pidfd

if TYPE_CHECKING:  # pragma: no cover
    from typing import Union

__all__ = ["reaper"]

_DONE = object()


class _PidEntry:
    """Reap ``pid`` once it exits; SIGKILL it at ``kill_at`` (monotonic) if given."""

    def __init__(self, pid: int, pidfd: Optional[int], kill_at: Optional[float] = None) -> None:
        self.pid, self.pidfd, self.kill_at = pid, pidfd, kill_at

    def fileno(self) -> int:
        return self.pidfd  # type: ignore[return-value]

    def step(self):
        if self.pidfd is None:  # handed over by pid: open it here, checked (see _pidfd_of_child)
            self.pidfd = _pidfd_of_child(self.pid)
            if self.pidfd is None:
                return _DONE  # gone already
        try:
            done = reap_pidfd(self.pidfd) is not None
        except ReapedElsewhere:
            done = True  # a waitpid(-1) of the caller's, or another entry: gone all the same
        if done:
            self.pidfd = os.close(self.pidfd)  # os.close returns None: closed and forgotten at once
            return _DONE
        return self

    def expire(self) -> None:
        self.kill_at = None
        try:
            if self.pidfd is not None:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass  # it exited meanwhile

    def drop(self) -> None:
        try:
            if self.pidfd is not None:
                reap_pidfd(self.pidfd)
        finally:
            if self.pidfd is not None:
                self.pidfd = os.close(self.pidfd)  # type: ignore[func-returns-value]  # os.close returns None

    def forget(self) -> None:  # in a forked child: not our process
        if self.pidfd is not None:
            self.pidfd = os.close(self.pidfd)  # type: ignore[func-returns-value]  # os.close returns None


class _ChanEntry:
    """Read ``chan`` until its process's pid is known, close it, then reap (SIGKILL if ``doomed``)."""

    def __init__(self, chan: FdChannel, doomed: bool, pidfd: Optional[int], kill_after: Optional[float]) -> None:
        self.chan, self.doomed, self.pidfd, self.kill_after = chan, doomed, pidfd, kill_after
        self.kill_at: Optional[float] = None

    def fileno(self) -> int:
        return self.chan.fileno()

    def step(self):
        chan = self.chan
        ended = chan.closed
        try:
            while not ended and chan.receive() is not None:
                pass  # greetings, replies, RUNNING: nobody wants them now
        except (BrokenChannelError, ProtocolError, ClosedError):
            ended = True
        settle(chan, ended)  # killed before it spoke: the pid slot says who it was
        pid = chan.peer_pid
        if pid is None and not ended:
            return self  # wait for the PID frame, or the end
        chan.close()  # EOF: a template exits
        if pid is None:
            return _DONE  # no process was made
        pidfd, self.pidfd = (self.pidfd if self.pidfd is not None else _pidfd_of_child(pid)), None
        if pidfd is None:
            return _DONE  # reaped by whoever had the pidfd (see _pidfd_of_child)
        entry = _PidEntry(pid, pidfd)
        if self.doomed:
            entry.expire()
        elif self.kill_after is not None:
            entry.kill_at = time.monotonic() + self.kill_after
        return entry.step()

    def expire(self) -> None:
        self.kill_at = None

    def drop(self) -> None:
        try:
            self.chan.close()
            if self.pidfd is not None:
                reap_pidfd(self.pidfd)
        finally:
            if self.pidfd is not None:
                self.pidfd = os.close(self.pidfd)  # type: ignore[func-returns-value]  # os.close returns None

    def forget(self) -> None:
        self.chan.close()
        if self.pidfd is not None:
            self.pidfd = os.close(self.pidfd)  # type: ignore[func-returns-value]  # os.close returns None


def _pidfd_of_child(pid: int) -> Optional[int]:
    """A pidfd for ``pid`` if it is still an unreaped child of ours, else None.

    Only needed when the channel's owner had no pidfd yet: then nobody had
    reaped the pid (every reap of ours goes through a pidfd opened before),
    unless a second owner did so meanwhile -- checked while the pidfd pins
    the process, so a reused pid is never taken for ours.
    """
    try:
        pidfd = open_pidfd(pid)
    except ProcessLookupError:
        return None
    if is_our_child(pidfd):
        return pidfd
    os.close(pidfd)
    return None


class _Reaper:
    def __init__(self) -> None:
        self._lock = threading.Lock()  # held by the thread while it works on its entries
        self._inbox: Deque = deque()  # handed over, not yet taken by the thread
        self._entries: Dict[int, Union[_PidEntry, _ChanEntry]] = {}  # polled fd -> entry
        self._start_lock = threading.RLock()
        self._running = False
        self._idle = threading.Condition(threading.Lock())
        self._wake_r = self._wake_w = -1
        self.errors = 0  # entries dropped after an error

    # -- handing over (never blocks: finalizers call these) ------------------------

    def adopt(self, pid: int, pidfd: Optional[int] = None, kill_after: Optional[float] = None) -> None:
        """Reap ``pid`` once it exits (``pidfd`` is taken over, or opened by the thread).

        ``kill_after``: SIGKILL it if it still runs after that many seconds.
        Returns None: ``x._pidfd = reaper.adopt(pid, x._pidfd)`` hands the
        pidfd over and forgets it in one statement.  It raises only before
        taking anything (so the caller still owns it then), never after.
        """
        kill_at = None if kill_after is None else time.monotonic() + kill_after
        self._hand(_PidEntry(pid, pidfd, kill_at))

    def adopt_channel(
        self,
        chan: FdChannel,
        doomed: bool = False,
        pidfd: Optional[int] = None,
        kill_after: Optional[float] = None,
    ) -> None:
        """Learn the pid of ``chan``'s process, close ``chan``, reap the pid.

        ``doomed``: SIGKILL the process as soon as its pid is known.
        ``pidfd``: its pidfd, if the caller has one (taken over).
        ``kill_after``: SIGKILL it if it has not exited that long after the close.
        Returns None and raises only before taking anything, as ``adopt``.
        """
        self._hand(_ChanEntry(chan, doomed, pidfd, kill_after))

    adopt_greeting = adopt_channel  # the older name

    def _hand(self, entry: object) -> None:
        # One statement: queued and kicked (which never raises), or neither.
        self._inbox.append(entry) or self._kick()  # type: ignore[func-returns-value]

    def _kick(self) -> None:
        """Make sure the thread runs and looks at its inbox.

        The start lock is reentrant and only ever held for a few statements:
        a finalizer that hands over while this thread holds it (the garbage
        collector runs anywhere) goes straight through.  Raises no error: if
        starting the thread fails, the entry stays queued, and the next
        hand-over, ``pending()`` or ``wait_idle()`` tries again.  (Callers
        hand over with Ctrl-C deferred, so no ``KeyboardInterrupt`` comes
        from here either.)
        """
        try:
            with self._start_lock:
                if self._wake_r < 0:
                    self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
                if self._running:
                    self._wake()
                    return
                try:  # _running is True exactly when a thread was started
                    self._running = True
                    _thread.start_new_thread(self._run, ())
                except BaseException:
                    self._running = False
                    raise
        except Exception:
            self.errors += 1  # no thread now (EMFILE, EAGAIN): the entries wait for the next try

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass  # already woken (or being reset)

    # -- inspecting ------------------------------------------------------------------

    def pending(self) -> int:
        """How many processes and channels are still waited for."""
        self._repair()
        return len(self._entries) + len(self._inbox)

    def _repair(self) -> None:
        """Start the thread if a hand-over was cut short (see ``_kick``)."""
        if self._inbox and not self._running:
            self._kick()

    @property
    def running(self) -> bool:
        """Whether the thread runs now."""
        return self._running

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is pending and the thread has ended; False on timeout."""
        self._repair()
        with self._idle:
            return self._idle.wait_for(lambda: not self._running and not self._inbox, timeout)

    def standing_fds(self) -> set:
        """The reaper's own long-lived fds (its wake pipe)."""
        return {fd for fd in (self._wake_r, self._wake_w) if fd >= 0}

    # -- the thread ---------------------------------------------------------------

    def _run(self) -> None:
        set_name(b"forkserver-reap")
        failures = 0
        while True:
            try:
                more = self._round()
                failures = 0
            except BaseException:
                # A bug of ours, or MemoryError: the entries are still there;
                # back off a little (never spin) and go on.
                self.errors += 1
                failures += 1
                more = True
                try:
                    select.select([], [], [], min(1.0, 0.01 * 2**failures))
                except BaseException:
                    pass
            if not more:
                with self._start_lock:  # a hand-over now either sees us running or starts anew
                    if not self._inbox and not self._entries:
                        self._running = False
                        break
        with self._idle:
            self._idle.notify_all()

    def _round(self) -> bool:
        """Wait for and handle what is ready; False once nothing is left."""
        entry: Optional[Union[_PidEntry, _ChanEntry]]
        with self._lock:
            while self._inbox:
                self._admit(self._inbox.popleft())
            if not self._entries:
                return False
            wake_r = self._wake_r
            entries = list(self._entries.items())
        poller = select.poll()
        poller.register(wake_r, select.POLLIN)
        deadlines = []
        for fd, entry in entries:
            poller.register(fd, select.POLLIN)
            if entry.kill_at is not None:
                deadlines.append(entry.kill_at)
        timeout = None
        if deadlines:
            timeout = max(0, int((min(deadlines) - time.monotonic()) * 1000) + 1)
        ready = poller.poll(timeout)
        with self._lock:
            for fd, events in ready:
                if fd == wake_r:
                    try:
                        os.read(wake_r, 4096)
                    except OSError:
                        pass
                    continue
                entry = self._entries.get(fd)
                if entry is not None:
                    self._guarded(fd, entry, "step", bad=bool(events & select.POLLNVAL))
            now = time.monotonic()
            for fd, entry in list(self._entries.items()):
                if entry.kill_at is not None and entry.kill_at <= now:
                    self._guarded(fd, entry, "expire")
        return True

    def _admit(self, entry) -> None:  # lock held
        """Take an entry: step it once at once (a closed channel has no fd to poll), then poll it."""
        while True:
            try:
                result = entry.step()
                if result is _DONE:
                    return
                fd = result.fileno()
                if result is entry:
                    self._entries[fd] = entry
                    return
            except BaseException:
                self._drop(entry)
                return
            entry = result  # a channel became a pid: step that too

    def _guarded(self, fd: int, entry, what: str, bad: bool = False) -> None:
        """Run ``entry.step()`` (or ``expire``); on any error drop the entry, never the thread."""
        try:
            if bad:  # its fd was closed behind our back
                raise OSError(f"fd {fd} of {entry!r} is not open")
            if what == "expire":
                entry.expire()
                result = entry
            else:
                result = entry.step()
        except BaseException:
            del self._entries[fd]
            self._drop(entry)
            return
        if result is entry:
            return
        del self._entries[fd]
        if result is not _DONE:
            self._admit(result)

    def _drop(self, entry) -> None:
        self.errors += 1
        try:
            entry.drop()  # one last waitpid on its pid, and its fds closed
        except BaseException:
            pass

    def after_fork_child(self) -> None:
        # Those processes are not this child's children; the thread is gone.
        self._lock = threading.Lock()
        self._start_lock = threading.RLock()
        self._idle = threading.Condition(threading.Lock())
        self._running = False
        entries = list(self._entries.values()) + list(self._inbox)
        self._entries, self._inbox = {}, deque()
        for entry in entries:
            try:
                entry.forget()
            except OSError:
                pass
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1


reaper = _Reaper()
os.register_at_fork(after_in_child=reaper.after_fork_child)
