"""Exceptions shared by the parent and the template processes.

Every class here is picklable (plain ``args``), because errors cross process
boundaries: a template reports a failure by pickling it back to the parent.
Names say the situation: *Broken* means the other side died or broke the
channel; *Closed* means you closed it yourself.
"""
from __future__ import annotations

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
