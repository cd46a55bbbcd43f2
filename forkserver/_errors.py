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
