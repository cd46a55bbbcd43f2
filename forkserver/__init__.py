"""forkserver: cheap, safe child processes for big, multithreaded Python programs.

A small, freshly exec'd *template* interpreter receives commands and file
descriptors over an AF_UNIX socket and forks children on demand; every child
is a direct child of your process.  See README.md.
"""
from ._errors import (
    BrokenChannelError,
    BrokenTemplateError,
    ClosedError,
    FdTableFullError,
    ForkserverError,
    PidfdUnavailableError,
    ProtocolError,
    RemoteError,
    RemoteTraceback,
    ThreadedTemplateError,
)
from ._process import Child
from ._template import Template, early

__version__ = "0.1.0.dev0"

__all__ = [
    "BrokenChannelError",
    "BrokenTemplateError",
    "Child",
    "ClosedError",
    "FdTableFullError",
    "ForkserverError",
    "PidfdUnavailableError",
    "ProtocolError",
    "RemoteError",
    "RemoteTraceback",
    "Template",
    "ThreadedTemplateError",
    "__version__",
    "early",
]
