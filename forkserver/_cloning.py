"""How a ``Template`` gets its clones: deferred forks and spare clones (parent side).

A mixin of ``Template`` (``_template.py``), kept apart for size: every name
here works on a template's attributes set by ``Template._adopt``.

Interruptions: a clone's template object owns the new socket *before* the
``FORK`` that makes the clone is sent (``_request_fork``), so a fork
interrupted at any point leaves an owner that can hand the clone to the
reaper (``_link.Link._hand_over``).  A failure to make the *next* spare
(``_refill``: ``EMFILE`` at the socketpair, a broken template) never fails
the call that asked for it: the spare is asked for again after the next
run, and a ``fork()`` that finds none makes its clone then.
"""
from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING, Any, Optional, Sequence

from . import _protocol as P
from ._errors import BrokenChannelError, BrokenTemplateError
from ._fds import HEADER, PID_FORMAT, PID_KIND, FdChannel, socketpair
from ._interrupts import allowed, deferred
from ._slots import region
from ._wait import drain

if TYPE_CHECKING:  # pragma: no cover
    import threading
    import weakref
    from typing import List

    from ._process import Child
    from ._template import Template


_PID_FRAME = HEADER.size + PID_FORMAT.size
_HELLO_FRAME = HEADER.size + P.HELLO_FORMAT.size


def _greeted(tpl: Any) -> bool:
    """Whether a spare has greeted us already (its pid frame and its greeting arrived).

    A peek, not a read: on the way to the worker's start one syscall, and the
    frames are read after the RUN is sent, while the worker starts.
    """
    if tpl._status == "ready":
        return True
    chan = tpl._chan
    if chan._cur[0].got:  # a frame half read: read on, then look
        tpl._read_available()
        return tpl._status == "ready"
    try:
        data = chan.sock.recv(_PID_FRAME + _HELLO_FRAME, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except OSError:
        return False  # nothing yet (EAGAIN), or dead: the reads that follow say so
    # A clone without a pid slot writes a PID frame before its greeting.
    first_is_pid = len(data) >= HEADER.size and HEADER.unpack_from(data)[2] == PID_KIND
    return len(data) >= (_PID_FRAME if first_is_pid else 0) + _HELLO_FRAME


class Cloning:
    """Deferred forks (``fork()`` makes the clone when first needed) and spare clones."""

    if TYPE_CHECKING:  # what Template and its other mixin Link provide
        _chan: Optional[FdChannel]
        _status: str
        _run_sent: bool
        _lock: threading.RLock
        _origin: str
        _main_ok: bool
        _keep_spare: bool
        _base: Optional[Template]
        _prelude: List[tuple]
        _pending: weakref.WeakSet[Template]
        _spare: Optional[Template]
        _refill_after_run: Optional[Template]
        _refill_after_exit: bool

        def _take_over(self, other: Any) -> None: ...
        @classmethod
        def _from_channel(cls, chan: Optional[FdChannel], origin: str, pid: Optional[int] = None,
                          pidfd: Optional[int] = None) -> Template: ...
        def _send(self, kind: int, payload: bytes = b"", fds: Sequence[Any] = ()) -> None: ...
        def _broken(self, cause: BaseException, what: str) -> BrokenTemplateError: ...
        def _hand_over(self, kill_after: Optional[float] = None) -> None: ...
        def _abandon(self) -> None: ...

    def _start_pending_forks(self) -> None:
        """Clone this template for each deferred fork() before its state changes."""
        for tpl in list(self._pending):
            # Never wait for a pending template another thread is using: it
            # will start itself (lock order is always pending -> base).
            if tpl._lock.acquire(blocking=False):
                try:
                    if tpl._status == "pending":
                        tpl._materialize(refill=False)
                finally:
                    tpl._lock.release()

    def _materialize(self, run: Optional[tuple] = None, call_id: int = 0, refill: bool = True) -> None:
        """Start the deferred fork (with its prelude, and ``run`` if given); lock held.

        The base's spare clone is used when it has one: the prelude and the
        run are sent to it as ordinary commands.  Else one FORK command
        carries them all.  ``refill``: then ask the base for a new spare, at
        once without a ``run``, else after its reply (see "When the next spare
        is made").
        """
        base = self._base
        assert base is not None and self._status == "pending"
        base._pending.discard(self)
        if run is not None:
            self._run_sent = True  # from here on, a process of ours may be told to run
        try:
            ready = self._start_from_spare(base, run, call_id)
            if ready is None:
                prelude = [(k, p, len(d)) for k, p, d in self._prelude]
                spec = {"prelude": prelude, "run": run, "call": call_id}
                base._request_fork(self, spec, [fd for _, _, d in self._prelude for fd in d])
        except BaseException:
            if self._status == "pending":
                self._status, self._run_sent = "broken", False  # no process was made
            raise
        finally:
            self._close_prelude()  # the channel sent them or holds its own copies
        self._base = None
        if not refill:
            return
        if run is None:
            with base._lock:
                base._refill()
        else:
            self._refill_after_run, self._refill_after_exit = base, bool(ready)

    def _close_prelude(self) -> None:
        """Close the prelude's fds, each in the statement that forgets it."""
        prelude = self._prelude
        while prelude:
            dups = prelude[-1][2]
            while dups:
                os.close(dups.pop())
            prelude.pop()

    def _refill_base(self, child: Optional["Child"]) -> None:
        """After a run (``child``: None if it failed), ask the base for its next spare."""
        base, self._refill_after_run = self._refill_after_run, None
        if base is not None:
            after = child.pid if child is not None and self._refill_after_exit else None
            with base._lock:
                base._refill(after)

    def _start_from_spare(self, base: Any, run: Optional[tuple], call_id: int) -> Optional[bool]:
        """Become ``base``'s spare and send it the prelude and run.

        None if there is no live spare; else whether it had greeted us
        already (it was ready before we needed it).
        """
        with base._lock:
            spare, base._spare = base._spare, None
        if spare is None:
            return None
        if spare._status not in ("starting", "ready"):
            spare._abandon()
            return None
        self._take_over(spare)  # we own its process from here on
        try:
            ready = _greeted(self)
            with deferred():  # all of the prelude and the run, or a Ctrl-C after them
                for kind, payload, dups in self._prelude:
                    self._chan.send(kind, payload, dups)  # type: ignore[union-attr]  # the spare's channel
                if run is not None:
                    self._chan.send(P.RUN, P.with_call(call_id, P.dumps(run)))  # type: ignore[union-attr]
        except (BrokenChannelError, BrokenTemplateError):
            # Killed while it waited: it goes to the reaper, a fresh clone is made.
            run_sent, self._run_sent = self._run_sent, False
            self._hand_over()
            self._status, self._run_sent = "pending", run_sent
            return None
        return ready

    # -- the spare clone ---------------------------------------------------------
    #
    # Making a clone costs a template milliseconds (the clone syscall copies
    # its page tables; the clone then runs the interpreter's after-fork code,
    # which copies-on-write hundreds of pages).  A template that has been
    # forked once keeps one clone ready, made while the caller does other
    # things (typically: while the last worker runs); the next fork() takes it.
    # A spare is a snapshot, so any command that changes the template drops it.
    #
    # When the next spare is made.  It is asked for once the run that took
    # the last one is acknowledged.  Making it costs the template CPU time
    # (the clone syscall copies its page tables, ~0.5 ms for numpy) and the
    # clone more (the interpreter's after-fork work, its greeting, its
    # rehearsal: ~0.4 ms).  With few CPUs that competes with the worker just
    # started -- with its exit above all, when the kernel tears down the
    # worker's page tables while the template's clone is copying the same
    # pages' counts -- and with our wake-up to reap it.  So if the spare we
    # took had greeted us already (there is idle time between forks), the
    # request says "after <worker pid>": the template waits until that worker
    # has been reaped, or until anything arrives on its socket or on the new
    # spare's (a command, our next run), before it clones.  If it had not
    # (forks come back to back), the clone is made at once, while the worker
    # runs.  Measured on 2 vCPUs, numpy, three interleaved runs of 400:
    # start -> reaped p50 0.83-0.85 ms, p90 0.88-0.89 waiting; p50 0.83-0.84,
    # p90 0.91-1.46 not.

    def _clone(self) -> "tuple":
        """(a started clone of this template, whether it was the spare); lock held.

        A new spare is requested afterwards, so the next call finds one ready.
        """
        spare, self._spare = self._spare, None
        if spare is not None:
            if spare._status in ("starting", "ready"):
                self._refill()
                return spare, True
            spare._abandon()
        clone = self._new_clone()
        self._refill()
        return clone, False

    def _new_clone(self, after: Optional[int] = None, spare: bool = False) -> Any:
        """A clone; a ``spare`` one rehearses before it greets (made ``after`` that worker)."""
        spec = {"spare": True, "after": after} if spare else {}
        clone = type(self)._from_channel(None, f"{self._origin}.fork()")
        clone._main_ok, clone._keep_spare = self._main_ok, self._keep_spare
        self._request_fork(clone, spec)
        return clone

    def _refill(self, after: Optional[int] = None) -> None:
        """Ask for a new spare clone, unless one is kept already or spares are off; lock held.

        ``after``: the template makes it once the worker ``after`` is reaped.
        Never fails: a spare that cannot be asked for now (the template is
        broken: its next use says so; ``EMFILE``: no socketpair) is asked for
        again after the next run.
        """
        if not self._keep_spare or self._spare is not None or self._status not in ("starting", "ready"):
            return
        try:
            self._spare = self._new_clone(after, spare=True)
        except Exception:
            pass

    def _drop_spare(self) -> None:
        spare, self._spare = self._spare, None
        if spare is not None:
            spare._abandon()

    def _request_fork(self, target: Any, spec: dict, extra_fds: Sequence[int] = ()) -> None:
        """Send FORK; ``target`` (a template object) owns the new socket before it is sent.

        The new channel takes a pid slot (``_slots``): the kernel writes the
        clone's pid there, so it is known even if the clone is killed before
        it could say it.
        """
        ours, theirs = socketpair()
        try:
            ours.setblocking(False)
            chan = FdChannel(ours)
            chan.slot = region.take()  # the channel owns the slot from here on
            target._own(chan)
            target._status = "starting"
            spec["slot"] = chan.slot
            self._send(P.FORK, P.dumps(spec), [theirs, *extra_fds])
            # The clone greets us on its own socket: whoever waits there
            # never flushes ours, so the FORK (and anything queued before it,
            # say a big send_arg) must be in the template's socket now.
            self._drain("fork")
        except BaseException:
            if target._chan is None:
                ours.close()
            else:
                target._hand_over()  # learns the pid (if a clone was made) and reaps it
            target._status, target._run_sent = "broken", False
            raise
        finally:
            theirs.close()

    def _drain(self, what: str) -> None:
        """Block until every queued command is in the template's socket; lock held."""
        assert self._chan is not None  # called after a _send, which needs it
        try:
            with allowed():
                drain(self._chan)
        except BrokenChannelError as exc:
            raise self._broken(exc, what) from exc

