"""How a ``Template`` gets its clones: deferred forks and spare clones (parent side).

A mixin of ``Template`` (``_template.py``), kept apart for size: every name
here works on a template's attributes set by ``Template._adopt``.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, List, Optional, Sequence

from . import _protocol as P
from ._errors import BrokenChannelError, ForkserverError
from ._fds import FdChannel, socketpair
from ._wait import drain, wait_readable

if TYPE_CHECKING:  # pragma: no cover
    from ._process import Child


class Cloning:
    """Deferred forks (``fork()`` makes the clone when first needed) and spare clones."""

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

    def _materialize(self, run: Optional[tuple] = None, refill: bool = True) -> None:
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
        prelude, self._prelude = self._prelude, []
        fds = [fd for _, _, dups in prelude for fd in dups]
        try:
            ready = self._start_from_spare(base, prelude, run)
            if ready is None:
                payload = P.dumps({"prelude": [(k, p, len(d)) for k, p, d in prelude], "run": run})
                self._chan = base._request_fork(payload, fds)
                self._status = "starting"
        except BaseException:
            self._status = "broken"
            raise
        finally:
            for fd in fds:
                os.close(fd)
        self._base = None
        if not refill:
            return
        if run is None:
            with base._lock:
                base._refill()
        else:
            self._refill_after_run, self._refill_after_exit = base, bool(ready)

    def _refill_base(self, child: Optional[Child]) -> None:
        """After a run (``child``: None if it failed), ask the base for its next spare."""
        base, self._refill_after_run = self._refill_after_run, None
        if base is not None:
            after = child.pid if child is not None and self._refill_after_exit else None
            with base._lock:
                base._refill(after)

    def _start_from_spare(self, base: Any, prelude: List[tuple], run: Optional[tuple]) -> Optional[bool]:
        """Become ``base``'s spare and send it the prelude and run.

        None if there is no spare; else whether it had greeted us already
        (it was ready before we needed it).
        """
        with base._lock:
            spare, base._spare = base._spare, None
            if spare is None or spare._status not in ("starting", "ready"):
                return None
        ready = spare._status == "ready" or wait_readable(spare._chan.fileno(), 0)
        try:
            for kind, payload, dups in prelude:
                spare._chan.send(kind, payload, dups)
            if run is not None:
                spare._chan.send(P.RUN, P.dumps(run))
        except BrokenChannelError:
            spare._abandon()  # killed while it waited: it is reaped, a fresh clone is made
            return None
        self._take_over(spare)
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
        if spare is not None and spare._status in ("starting", "ready"):
            self._refill()
            return spare, True
        clone = self._new_clone()
        self._refill()
        return clone, False

    def _new_clone(self, after: Optional[int] = None, spare: bool = False) -> Any:
        """A clone; a ``spare`` one rehearses before it greets (made ``after`` that worker)."""
        payload = P.dumps({"spare": True, "after": after}) if spare else b""
        clone = type(self)._from_channel(self._request_fork(payload), f"{self._origin}.fork()")
        clone._main_ok, clone._keep_spare = self._main_ok, self._keep_spare
        return clone

    def _refill(self, after: Optional[int] = None) -> None:
        """Ask for a new spare clone, unless one is kept already or spares are off; lock held.

        ``after``: the template makes it once the worker ``after`` is reaped.
        """
        if not self._keep_spare or self._spare is not None or self._status not in ("starting", "ready"):
            return
        try:
            self._spare = self._new_clone(after, spare=True)
        except ForkserverError:
            pass  # this template is broken: its next use says so

    def _drop_spare(self) -> None:
        spare, self._spare = self._spare, None
        if spare is not None:
            spare._abandon()

    def _request_fork(self, payload: bytes = b"", extra_fds: Sequence[int] = ()) -> FdChannel:
        ours, theirs = socketpair()
        ours.setblocking(False)
        try:
            self._send(P.FORK, payload, [theirs, *extra_fds])
            # The clone greets us on its own socket: whoever waits there
            # never flushes ours, so the FORK (and anything queued before it,
            # say a big send_arg) must be in the template's socket now.
            self._drain("fork")
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return FdChannel(ours)

    def _drain(self, what: str) -> None:
        """Block until every queued command is in the template's socket; lock held."""
        try:
            drain(self._chan)
        except BrokenChannelError as exc:
            raise self._broken(exc, what) from exc
