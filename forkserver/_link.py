"""The parent's link to one template process: its socket, pid, status, and replies in step.

A mixin of ``Template`` (``_template.py``), kept apart for size: it works on
the attributes ``Template._adopt`` sets.  Everything here is about staying
consistent whatever interrupts a call (docs/reliability.md):

* **The pid is in the channel.**  A clone writes its pid first thing (a
  ``PID`` frame, see ``_fds.fork_sibling``) and the channel records it
  (``FdChannel.peer_pid``); an exec'd template's pid is stored there at
  birth.  So whoever ends up holding the channel -- this object, the reaper
  thread -- can always reap the process.  A pidfd is opened as soon as the
  pid is known: it names that process even if someone else's
  ``waitpid(-1)`` reaps it and the pid is reused.
* **Replies carry call ids** (``_protocol``): a reply that is not for the
  call reading it belongs to an interrupted call and is dropped.
* **One owner for each process.**  A template object owns its channel and
  pidfd until it gives them away in one statement (``_take_over``, a
  ``Child``, the reaper).  Dropped, closed in a hurry, or found broken, it
  hands them to the reaper thread, which never blocks the caller; a
  process that had been told to ``run`` is *doomed* then: nobody could
  reach the worker, so it is killed.
* **Unexpected exceptions break the template.**  An exception raised while
  a frame is half processed (``MemoryError``, or anything raised between
  two statements) marks the template broken and hands its process over;
  it is never left waiting for a frame it already consumed.  Ctrl-C does
  not get there: the steps run with ``KeyboardInterrupt`` deferred
  (``_interrupts``), and it is taken at the waits between them.
"""
from __future__ import annotations

import os
import signal
import socket
import threading
from typing import TYPE_CHECKING, Any, Optional, Set

from . import _protocol as P
from ._errors import BrokenChannelError, BrokenTemplateError, ClosedError, ProtocolError
from ._fds import FdChannel, Frame
from ._interrupts import allowed, deferred
from ._reaper import reaper
from ._slots import settle
from ._wait import ReapedElsewhere, open_pidfd, reap_pidfd, wait_channel, wait_readable

CLOSE_GRACE = 5.0  # seconds a closed or broken template gets to exit before SIGKILL
WAIT = object()  # _step: nothing complete yet, wait for the socket
AGAIN = object()  # _step: a frame was handled (a greeting, a stale reply): step again

#: The channels of live templates.  Held strongly so that a template caught
#: in a reference cycle is finalised (``__del__``, which hands its process
#: to the reaper) before its socket: the garbage collector finalises the
#: objects of a cycle in no particular order, and a socket finalised first
#: would close the fd the reaper was about to read the pid from.
held: Set[FdChannel] = set()


class _Remote:
    """A remote error to raise once the step is over (it does not break the template)."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class Link:
    """The process half of a ``Template`` (see the module docs)."""

    _chan: Optional[FdChannel]
    _pidfd: Optional[int]
    _status: str
    _run_sent: bool
    _lock: "threading.RLock"
    _owner: Optional[int]  # the process the template belongs to
    _main_ok: bool
    _keep_spare: bool

    if TYPE_CHECKING:  # what the other mixins of Template (Cloning) provide
        def _drop_spare(self) -> None: ...
        def _close_prelude(self) -> None: ...

    _gone_pid: Optional[int] = None  # the pid once the channel was handed over

    @property
    def _pid(self) -> Optional[int]:
        chan = self._chan
        return chan.peer_pid if chan is not None else self._gone_pid

    def _own(self, chan: FdChannel) -> None:
        held.add(chan)
        self._chan = chan

    def _take_over(self, other: "Link") -> None:
        """Take ``other``'s process (socket, pidfd, state); ``other`` is left spent."""
        # One statement: the process is never owned by both, nor by neither.
        (self._chan, self._pidfd, self._status, self._run_sent, other._gone_pid, other._chan,
         other._pidfd, other._status) = (other._chan, other._pidfd, other._status, other._run_sent,
                                         other._pid, None, None, "closed")  # fmt: skip
        self._main_ok, self._keep_spare = other._main_ok, other._keep_spare

    # -- reading -----------------------------------------------------------------

    def _step(self, what: str, call_id: int = 0) -> Any:
        """One non-blocking step of reading: the reply Frame to ``call_id``, WAIT or AGAIN.

        A remote ERROR for ``call_id`` is raised.  Shared by the blocking calls
        and the coroutines of ``forkserver.aio``.
        """
        with deferred():
            try:
                result = self._read_one(what, call_id)
            except BrokenTemplateError:
                raise  # broken already
            except BaseException as exc:
                self._broken(exc, what)  # a frame may be half handled: give the process up
                raise
        if isinstance(result, _Remote):
            try:
                raise result.exc
            finally:
                result = None  # no cycle: exception -> traceback -> this frame -> exception
        return result

    def _read_one(self, what: str, call_id: int) -> Any:
        chan = self._chan
        assert chan is not None
        try:
            chan.flush()
            frame = chan.receive()
        except (BrokenChannelError, ProtocolError) as exc:
            settle(chan, ended=True)  # a clone killed before it spoke: its slot has the pid
            raise self._broken(exc, what) from exc
        if chan.slot is not None:
            settle(chan, ended=False)  # the pid, from the slot the kernel wrote it in
        if chan.peer_pid is not None and self._pidfd is None:
            self._pidfd = _pidfd_or_none(chan.peer_pid)
        if frame is None:
            return WAIT
        kind = frame.kind
        if kind == P.HELLO and self._status == "starting":
            self._hello(frame)
            return AGAIN
        if kind not in P.REPLIES:
            err = ProtocolError(f"{self!r}: unexpected {P.NAMES.get(kind, kind)} frame")
            raise self._broken(err, what) from err
        try:
            cid, body = P.split_call(frame.payload)
        except ValueError as exc:
            raise self._broken(exc, what) from exc
        if kind == P.ERROR and (cid == 0 or self._status == "starting"):
            # The template's last words, or a clone that was never made (the
            # fork failed; for a fused run, maybe its target): no process.
            remote = P.decode_error(body)
            if self._status == "starting":
                self._run_sent = False
                self._broken(remote, what)
                return _Remote(remote)
            raise self._broken(remote, what) from remote
        if cid != call_id:
            return AGAIN  # the reply of an interrupted call: drop it
        if kind == P.ERROR:
            self._run_sent = False  # a RUN that failed leaves a template
            return _Remote(P.decode_error(body))
        return Frame(kind, body, frame.fds)

    def _hello(self, frame: Frame) -> None:
        try:
            version, pid = P.HELLO_FORMAT.unpack(frame.payload)
        except Exception:
            version, pid = None, 0
        if version != P.VERSION:
            err = ProtocolError(
                f"{self!r} speaks protocol {version}, we speak {P.VERSION}: "
                "the template runs another forkserver version; reinstall so both match"
            )
            self._broken(err, "hello")
            raise err
        chan = self._chan
        assert chan is not None
        if chan.peer_pid is None:
            chan.peer_pid = pid
        if self._pidfd is None:
            self._pidfd = _pidfd_or_none(pid)
        self._status = "ready"

    def _next_frame(self, what: str, call_id: int = 0, until_hello: bool = False) -> Optional[Frame]:
        """Block for the reply to ``call_id`` (None once greeted, with ``until_hello``)."""
        while True:
            if until_hello and self._status != "starting":
                return None
            frame = self._step(what, call_id)
            if frame is WAIT:
                with allowed():
                    wait_channel(self._chan, None)  # type: ignore[arg-type]
            elif frame is not AGAIN:
                return frame

    def _read_hello(self) -> None:
        """Wait for the greeting, unless it was read already."""
        self._next_frame("hello", until_hello=True)

    def _read_available(self) -> None:
        """Read what has arrived, without waiting (a spare's pid and greeting)."""
        while self._status == "starting" and self._step("check") is not WAIT:
            pass

    # -- giving the process up -------------------------------------------------------

    def _check_open(self, what: str) -> None:
        if self._owner != os.getpid():
            raise ClosedError(
                f"{what} on {self!r}: it belongs to process {self._owner}, not to this forked "
                "copy; create a new Template in this process"
            )
        if self._status == "running":
            raise ClosedError(f"{what} on {self!r}: run() consumed it; fork() before run() to reuse it")
        if self._status == "closed":
            raise ClosedError(f"{what} on {self!r}: it was closed; create a new Template")
        if self._status == "broken":
            raise BrokenTemplateError(f"{what} on {self!r}: the template process is gone; create a new Template")

    def _broken(self, cause: BaseException, what: str) -> BrokenTemplateError:
        """Mark the template dead and hand its process to the reaper; the error to raise.

        Never blocks, and may be called again: the second call finds nothing
        left to hand over.
        """
        if self._status not in ("closed", "running"):
            self._status = "broken"
        self._drop_spare()
        self._hand_over(kill_after=CLOSE_GRACE)
        err = BrokenTemplateError(
            f"{what} on {self!r}: the template process died or closed its socket; "
            "create a new Template (the default template restarts by itself)"
        )
        err.__cause__ = cause
        return err

    def _hand_over(self, kill_after: Optional[float] = None) -> None:
        """Give the channel and pidfd to the reaper (doomed if a RUN was sent).  Never blocks.

        Idempotent: the reaper takes them and we forget them in one statement
        (``adopt_channel`` returns None once it has them, and raises only
        before), so they are never owned twice, nor by nobody.
        """
        chan = self._chan
        if chan is not None:
            settle(chan, ended=chan.closed)  # the pid may be in its slot only
        if chan is not None and chan.closed and chan.peer_pid is None:
            held.discard(chan)
            self._chan = None  # nothing to learn, nothing to reap
        if self._chan is None:
            if self._pidfd is not None:
                self._pidfd = os.close(self._pidfd)  # type: ignore[func-returns-value]  # os.close returns None
            return
        assert chan is not None  # it is self._chan
        held.discard(chan)
        self._gone_pid = chan.peer_pid
        with deferred():  # a Ctrl-C after the reaper took them, not before we forgot them
            self._chan = self._pidfd = reaper.adopt_channel(  # type: ignore[func-returns-value]
                chan, doomed=self._run_sent, pidfd=self._pidfd, kill_after=kill_after
            )

    def _give_up(self) -> None:
        """Tell a template whose greeting we have not read that we send nothing more.

        A spare asked for "after" a worker may not exist yet: its template
        is waiting, and sees this EOF on the new socket instead of making a
        clone nobody wants (see _server/_fork.py, ``_still_wanted``).  A
        template that exists reads the commands sent so far, then the EOF.
        """
        try:
            self._chan.sock.shutdown(socket.SHUT_WR)  # type: ignore[union-attr]
        except OSError:
            pass  # already gone: the read that follows says so

    def _abandon(self) -> None:
        """Dropped (``__del__``) or replaced: end the process without waiting for it.

        Can be called again after an error cut it short: whatever is still
        attached (a channel, a pidfd) is handed over then, whatever the status.
        """
        status = self._status
        if status != "running":
            self._status = "closed"
        self._drop_spare()
        if status == "pending":
            self._close_prelude()
        elif status != "running" and (self._chan is not None or self._pidfd is not None):
            chan = self._chan
            if status == "starting" and chan is not None and not chan.closed and chan.peer_pid is None:
                self._give_up()
            self._hand_over()

    # -- closing ----------------------------------------------------------------------

    def _end_process(self, waited: bool) -> None:
        """EOF to the template, then wait for its exit (SIGKILL after the grace) and reap it.

        Every resource stays on ``self`` until it is released, and is
        forgotten in the statement that releases it: whatever is left when
        an exception comes through is handed over by the caller.
        """
        chan = self._chan
        if chan is None:  # its fork failed, or it was handed over: nothing to end here
            return
        if waited and chan.peer_pid is None and not chan.closed:
            self._give_up()
            self._wait_for_pid(chan)
        held.discard(chan)
        chan.close()  # EOF: the template's loop ends
        pid = chan.peer_pid
        if pid is None:  # no process was made
            self._chan = None
            return
        if self._pidfd is None:
            self._pidfd = _pidfd_or_none(pid)
        if self._pidfd is None:  # reaped by someone else already (SIGCHLD=SIG_IGN): gone
            self._gone_pid, self._chan = pid, None
            return
        with allowed():
            exited = wait_readable(self._pidfd, CLOSE_GRACE)
        if not exited:
            signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            with allowed():
                wait_readable(self._pidfd, None)
        try:
            reap_pidfd(self._pidfd)
        except ReapedElsewhere:
            pass  # a waitpid(-1) of the caller's got there first: gone all the same
        self._gone_pid, self._chan = pid, None  # reaped: nothing left to hand over but the pidfd
        # os.close returns None: closed and forgotten at once
        self._pidfd = os.close(self._pidfd)  # type: ignore[func-returns-value]

    def _wait_for_pid(self, chan: FdChannel) -> None:
        """Read ``chan`` until its PID frame (or the end) has come."""
        while chan.peer_pid is None:
            settle(chan, ended=False)  # the kernel wrote it in the slot when it was made
            if chan.peer_pid is not None:
                return
            try:
                while chan.receive() is not None:
                    pass
            except (BrokenChannelError, ProtocolError):
                settle(chan, ended=True)  # it failed to start, or died: its slot may say who
                return
            if chan.peer_pid is None:
                with allowed():
                    wait_readable(chan.fileno(), None)


def _pidfd_or_none(pid: int) -> Optional[int]:
    """A pidfd for our child ``pid``; None if it is gone, reaped by someone else.

    Only SIGCHLD=SIG_IGN (the kernel reaps at exit) or the caller's own
    ``waitpid(-1)`` can take our child's status: a worker that exits at once
    may be gone before its RUNNING reply is read.  Its ``Child`` then says so
    (``ReapedElsewhereError``) on ``wait()``.  One statement: the caller's
    assignment owns the pidfd the moment it exists.
    """
    return open_pidfd(pid, gone_ok=True)
