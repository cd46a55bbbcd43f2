"""Exceptions shared by the parent and the template processes.

Every class here is picklable (plain ``args``), because errors cross process
boundaries: a template reports a failure by pickling it back to the parent.
Names say the situation: *Broken* means the other side died or broke the
channel; *Closed* means you closed it yourself.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = [
    "ForkserverError",
    "ProtocolError",
    "BrokenChannelError",
    "ClosedError",
    "FdTableFullError",
    "BrokenTemplateError",
    "RemoteError",
    "RemoteTraceback",
    "ThreadedTemplateError",
    "PidfdUnavailableError",
    "ReapedElsewhereError",
    "CalledProcessError",
    "ReloadError",
    "MemberFailedError",
    "BrokenSupervisorError",
    "WorkerDiedError",
]


class ForkserverError(Exception):
    """Base class of every error raised by forkserver itself."""


class ProtocolError(ForkserverError):
    """The peer broke the wire format (bad frame, unexpected or missing fds).

    The channel is unusable afterwards; any fds that did arrive were closed.
    """


class BrokenChannelError(ForkserverError):
    """The other end of a channel closed it or died; nothing more can be read or sent."""


class ClosedError(ForkserverError):
    """The object was closed by its owner; create a new one instead."""


class FdTableFullError(ForkserverError):
    """A blocking receive could not reserve descriptor slots for incoming fds.

    Nothing was lost: the fds are still queued in the kernel. Close some
    descriptors (or raise ``RLIMIT_NOFILE``) and call ``receive()`` again.
    """


class BrokenTemplateError(BrokenChannelError):
    """A template process died or its socket broke; ``__cause__`` says how.

    The default template is restarted on next use; a ``Template`` you created
    is gone: make a new one.
    """


class RemoteError(ForkserverError):
    """An exception raised in another process that could not be rebuilt here.

    ``remote_type`` names its class; ``__cause__`` carries the remote traceback.
    """


class RemoteTraceback(Exception):
    """Carries the formatted traceback of a remote exception (set as ``__cause__``)."""


class ThreadedTemplateError(ForkserverError):
    """A template refused to fork because it runs more than one OS thread.

    Forking a multithreaded process leaves the child with locks held by
    threads that do not exist there (children hang).  The message names the
    threads and the ``require``/``eval`` that started them.
    """


class PidfdUnavailableError(ForkserverError):
    """This kernel or Python has no pidfd_open: forkserver needs Linux 5.3 or newer."""


class ReapedElsewhereError(ForkserverError):
    """A child's exit status is lost: something other than forkserver reaped it first.

    forkserver waits for each of its children by pid (``waitpid(pid)``).
    If your process reaps children itself -- a ``waitpid(-1)``/``os.wait()``
    loop, a SIGCHLD handler that does so -- or has **SIGCHLD set to
    SIG_IGN** (the kernel then reaps every child the moment it exits and
    keeps no status), a child can be gone before ``wait()``/``poll()`` asks,
    and its status with it.  They raise this rather than make a status up
    (``subprocess`` reports 0 there).  Leave forkserver's children to it, or
    restore the default with ``signal.signal(signal.SIGCHLD, signal.SIG_DFL)``.
    """


class ReloadError(ForkserverError):
    """A ``Supervisor.reload()`` stopped: a member of the new start could not be started.

    The members already replaced were rolled back to the old start, so the
    supervisor runs what it ran before; ``__cause__`` is the start's error
    (an ``ImportError`` from the new code, say).
    """


class MemberFailedError(ForkserverError):
    """A supervised slot gave up (crash loop, or a restart policy that says no more).

    Raised by a wait that cannot be satisfied any more; the message names
    the slot and its reason.  ``Supervisor.reload()`` or ``resize()`` start
    failed slots again.
    """


class BrokenSupervisorError(ForkserverError):
    """A supervisor's thread failed unexpectedly; its members were killed and reaped.

    ``__cause__`` is the error.  Make a new ``Supervisor``.
    """


# ``CalledProcessError`` subclasses ``subprocess.CalledProcessError``, and
# importing ``subprocess`` costs ~3.5 ms and brings ``threading`` (whose
# at-fork hook every template clone would then run).  Templates import this
# module, so the class is made on first use (PEP 562).

if TYPE_CHECKING:  # pragma: no cover
    import subprocess
    from concurrent.futures.process import BrokenProcessPool

    class CalledProcessError(subprocess.CalledProcessError, ForkserverError):
        pass

    class WorkerDiedError(BrokenProcessPool, ForkserverError):
        pid: Any
        returncode: Any


def _make_called_process_error() -> type:
    import subprocess

    class CalledProcessError(subprocess.CalledProcessError, ForkserverError):
        """A program exited with a non-zero status; ``except`` it as either base class.

        ``returncode`` (negative: killed by that signal), ``cmd``, and the
        captured ``output``/``stderr`` when there were any.
        """

    CalledProcessError.__module__ = __name__
    CalledProcessError.__qualname__ = "CalledProcessError"  # what pickle looks up
    return CalledProcessError


# ``WorkerDiedError`` subclasses ``concurrent.futures.process.BrokenProcessPool``;
# that module imports ``threading`` and ``multiprocessing`` (~20 ms), which
# templates and workers must not load: made on first use too.


def _make_worker_died_error() -> type:
    from concurrent.futures.process import BrokenProcessPool

    class WorkerDiedError(BrokenProcessPool, ForkserverError):
        """A worker of ``forkserver.Executor`` died while it ran this task.

        Only the task(s) that worker was running fail with it; the executor
        replaces the worker and runs every other task.  ``pid`` is the
        worker's, ``returncode`` its exit status as ``subprocess`` has it
        (negative: killed by that signal; None: the status was lost, a
        ``waitpid`` of someone else reaped it); ``signal`` names the signal.
        ``except BrokenProcessPool`` catches it, as code written for
        ``ProcessPoolExecutor`` expects.
        """

        def __init__(self, message: str, pid: Any = None, returncode: Any = None) -> None:
            super().__init__(message)
            self.pid = pid
            self.returncode = returncode

        @property
        def signal(self) -> Any:
            """The signal that killed the worker (a ``signal.Signals``), or None."""
            import signal

            code = self.returncode
            if code is None or code >= 0:
                return None
            try:
                return signal.Signals(-code)
            except ValueError:
                return -code

        def __reduce__(self) -> Any:
            return type(self), (self.args[0] if self.args else "", self.pid, self.returncode)

    WorkerDiedError.__module__ = __name__
    WorkerDiedError.__qualname__ = "WorkerDiedError"
    return WorkerDiedError


_LAZY = {"CalledProcessError": _make_called_process_error, "WorkerDiedError": _make_worker_died_error}


def __getattr__(name: str) -> Any:  # PEP 562
    make = _LAZY.get(name)
    if make is not None:
        cls = globals()[name] = make()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
