"""How a ``Template`` becomes a worker, and what an interrupted run leaves (parent side).

A mixin of ``Template`` (``_template.py``), kept apart for size.  A run is
sent (``_start_run``) with ``_run_sent`` set first: from that statement on,
a process of ours may be told to become a worker, and if ``run()`` does not
return its ``Child`` -- Ctrl-C, a cancelled coroutine, any error -- that
process is *doomed* (``_run_interrupted``): SIGKILLed as soon as its pid is
known, and reaped.  A run whose target fails to resolve (an ``ERROR``
reply) clears the flag: the template is still a template.
"""
from __future__ import annotations

import os
import signal
import weakref
from typing import TYPE_CHECKING, Any, Optional, Union

from . import _protocol as P
from ._errors import ProtocolError
from ._interrupts import deferred
from ._link import held
from ._process import Child
from ._reaper import reaper

if TYPE_CHECKING:  # pragma: no cover
    from typing import Sequence

    from ._errors import BrokenTemplateError
    from ._fds import FdChannel

_kill_on_exit: "weakref.WeakSet[Child]" = weakref.WeakSet()


class Running:
    """The run half of a ``Template``."""

    _child: Optional[Child] = None  # the Child of the run, once made

    if TYPE_CHECKING:  # what Template and its other mixins (Link, Cloning) provide
        _chan: Optional[FdChannel]
        _pidfd: Optional[int]
        _status: str
        _run_sent: bool
        _main_ok: bool

        def _check_open(self, what: str) -> None: ...
        def _materialize(self, run: Optional[tuple] = None, call_id: int = 0,
                         refill: bool = True) -> None: ...
        def _send(self, kind: int, payload: bytes = b"", fds: Sequence[Any] = ()) -> None: ...
        def _broken(self, cause: BaseException, what: str) -> BrokenTemplateError: ...
        def _hand_over(self, kill_after: Optional[float] = None) -> None: ...

    def _run_spec(self, target: Any, die_with_parent: Union[bool, int]) -> tuple:
        """(module, qualname, options) of a run; raises for a bad target before anything is sent."""
        if die_with_parent is True:
            die_with_parent = int(signal.SIGKILL)
        opts = {"die_with_parent": int(die_with_parent), "parent": os.getpid()} if die_with_parent else {}
        module, qualname = P.split_target(target, main_ok=self._main_ok)
        return module, qualname, opts

    def _start_run(self, run: tuple, call_id: int) -> None:
        """Send the run (fused with a deferred fork when there is one); lock held."""
        if self._status == "pending":
            self._check_open("run")
            self._materialize(run=run, call_id=call_id)
        else:
            self._check_open("run")
            self._run_sent = True  # set before the step it records
            self._send(P.RUN, P.with_call(call_id, P.dumps(run)))

    def _finish_run(self, frame: Any, target: str, check: bool, timeout: Optional[float]) -> Child:
        """Turn the RUNNING reply into a Child; lock held."""
        if frame is None or frame.kind != P.RUNNING:
            kind = P.NAMES.get(frame.kind) if frame is not None else None
            raise self._broken(ProtocolError(f"expected the run acknowledgement, got {kind}"), "run")
        chan = self._chan
        assert chan is not None
        if chan.peer_pid is None:  # not a clone (an exec'd template): the pid is known anyway
            chan.peer_pid = P.HELLO_FORMAT.unpack(frame.payload)[1]
        control = chan.sock  # the channel read exactly up to RUNNING
        # Kept on the template in the statement that makes it: an error right
        # after still finds it (_run_interrupted).
        self._child = Child(chan.peer_pid, control, target, self._pidfd, check=check, exit_timeout=timeout)
        self._pidfd, self._status, self._run_sent = None, "running", False  # the Child owns it now
        held.discard(chan)
        return self._child

    def _run_interrupted(self, child: Optional[Child]) -> None:
        """A run that will not return its Child: kill what it started; lock held.

        Never raises: the interrupt (or error) that got us here goes on.
        """
        child = child if child is not None else self._child
        try:
            if child is not None:
                if self._pidfd is not None and self._pidfd == child._pidfd:
                    self._pidfd = None  # interrupted right after the Child took it
                self._status, self._run_sent = "running", False
                held.discard(self._chan)
                _kill_on_exit.discard(child)
                discard_child(child)
            elif self._run_sent:
                self._hand_over()  # doomed: killed once its pid is known, and reaped
                self._status, self._run_sent = "running", False
        except Exception:
            pass



def discard_child(child: Child) -> None:
    """A Child the caller never got: SIGKILL it, close our ends, let the reaper reap it.

    For a worker of ``run`` and a program of ``spawn`` alike (``_programs``).
    """
    try:
        child.kill()
    finally:
        with deferred():
            if child._pidfd is not None:
                # handed over and forgotten at once (adopt returns None)
                child._pidfd = reaper.adopt(child.pid, child._pidfd)  # type: ignore[func-returns-value]
        child.close()  # its control socket, its pipes


