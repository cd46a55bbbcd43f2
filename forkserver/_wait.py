"""Waiting in the parent: for a channel to become readable/writable, for a pid to exit.

Every process forkserver creates is a direct child of the caller, so
``waitpid`` on its pid is ours to call.  A *pidfd* (Linux >= 5.3,
``os.pidfd_open``) becomes readable when the process exits; polling it lets
us wait with a timeout without a SIGCHLD handler or a busy loop, and it
cannot refer to a recycled pid: the kernel holds the pid until we reap it.
"""
from __future__ import annotations

import errno
import os
import select
import signal
import time
from typing import Any, Optional

from ._errors import PidfdUnavailableError, ReapedElsewhereError
from ._fds import FdChannel

MIN_KERNEL = "5.3"


def open_pidfd(pid: int, gone_ok: bool = False) -> Any:
    """A pidfd for our child ``pid`` (close-on-exec).

    Our child exists until *we* reap it (a zombie still has its pid), so
    ESRCH means someone else did -- with SIGCHLD at SIG_IGN the kernel does,
    the moment a child exits.  ``gone_ok``: return None then, and let
    ``wait()`` report the lost status, instead of raising here.
    """
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        if gone_ok:
            return None
        raise
    except AttributeError:  # pragma: no cover - Python built without it
        raise PidfdUnavailableError(
            f"os.pidfd_open is missing; forkserver needs Linux >= {MIN_KERNEL}"
        ) from None
    except OSError as exc:
        if exc.errno == errno.ENOSYS:  # pragma: no cover - old kernel
            raise PidfdUnavailableError(
                f"pidfd_open: {exc.strerror}; forkserver needs Linux >= {MIN_KERNEL}"
            ) from None
        raise


def remaining(deadline: Optional[float]) -> Optional[float]:
    """Seconds left until ``deadline`` (monotonic) or None for no deadline; never negative."""
    if deadline is None:
        return None
    return max(0.0, deadline - time.monotonic())


def wait_readable(fd: int, timeout: Optional[float]) -> bool:
    """Poll ``fd`` for input (or hang-up); True if ready before ``timeout`` (0: now)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    # Rounded up, so a positive timeout never ends early; 0 does not wait.
    ms = None if timeout is None else (int(timeout * 1000) + 1 if timeout > 0 else 0)
    return bool(poller.poll(ms))


def drain(chan: FdChannel) -> None:
    """Block until everything queued on ``chan`` is in its socket (BrokenChannelError if gone).

    Waits for POLLOUT only: a reply waiting to be read must not turn this
    into a busy loop.
    """
    poller = select.poll()
    poller.register(chan.fileno(), select.POLLOUT)
    while chan.pending_output:
        poller.poll()
        chan.flush()


def wait_channel(chan: FdChannel, deadline: Optional[float]) -> None:
    """Block until ``chan`` may make progress: readable, writable if it has output, or unstalled."""
    timeout = remaining(deadline)
    if chan.stalled_until is not None:
        left = max(0.0, chan.stalled_until - time.monotonic())
        timeout = left if timeout is None else min(timeout, left)
    events = select.POLLIN | (select.POLLOUT if chan.pending_output else 0)
    poller = select.poll()
    poller.register(chan.fileno(), events)
    poller.poll(None if timeout is None else int(timeout * 1000) + 1)


def reap(pid: int, pidfd: int, timeout: Optional[float]) -> Optional[int]:
    """Wait up to ``timeout`` for our child to exit; reap it and return its returncode.

    Returns None if it is still running at the deadline.  The returncode is
    negative for a signal, as in ``subprocess``.
    """
    if not wait_readable(pidfd, timeout):
        return None
    return reap_now(pid)


# The name the parent side has used for it (``forkserver.ReapedElsewhereError``).
ReapedElsewhere = ReapedElsewhereError


def reaped(pid: int) -> bool:
    """Reap ``pid`` if it has exited; True once it is gone (reaped now, or elsewhere before).

    For processes whose status nobody asks for (dropped ones, templates,
    spares): a ``waitpid(-1)`` of the user's that got there first is no error.
    """
    try:
        return reap_now(pid) is not None
    except ReapedElsewhere:
        return True


def reap_pidfd(pidfd: int) -> Optional[int]:
    """``waitid(P_PIDFD, WNOHANG)``: reap exactly the process ``pidfd`` names.

    The returncode if it has exited (reaped now), else None.  Raises
    ``ReapedElsewhere`` if it is no longer a child of ours to reap.  Unlike a
    ``waitpid`` by number, this can never reap another process that reuses
    the pid, whoever reaped the first one.
    """
    try:
        info = os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG)
    except ChildProcessError:
        raise ReapedElsewhere(f"the process of pidfd {pidfd} was reaped already") from None
    if info is None:
        return None
    if info.si_code == os.CLD_EXITED:
        return info.si_status
    return -info.si_status  # killed (or dumped core) by that signal


def is_our_child(pidfd: int) -> bool:
    """Whether ``pidfd`` names an unreaped child of ours (nothing is reaped)."""
    try:
        os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    return True


def reap_now(pid: int) -> Optional[int]:
    """``waitpid(WNOHANG)``: the returncode if ``pid`` has exited, else None."""
    while True:
        try:
            got, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            raise ReapedElsewhereError(lost_status(pid)) from None
        except InterruptedError:  # pragma: no cover - PEP 475 retries already
            continue
        if got == 0:
            return None
        return os.waitstatus_to_exitcode(status)


def lost_status(pid: int) -> str:
    """Why the exit status of our child ``pid`` is gone, and what to do about it."""
    if signal.getsignal(signal.SIGCHLD) == signal.SIG_IGN:
        return (
            f"the exit status of pid {pid} is lost: SIGCHLD is SIG_IGN in this process, so "
            "the kernel reaps every child as it exits and keeps no status. Restore it with "
            "signal.signal(signal.SIGCHLD, signal.SIG_DFL) before starting children"
        )
    return (
        f"the exit status of pid {pid} is lost: something else in this process reaped it "
        "(a waitpid(-1) or os.wait() loop, or a SIGCHLD handler that reaps); leave "
        "forkserver's children to forkserver"
    )
