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

# Loaded on first use: templates import this package too, and these modules
# import subprocess (about 3.5 ms and memory in every template and worker).
_LAZY = {
    "CalledProcessError": "_spawn",
    "run_program": "_communicate",
    "spawn": "_spawn",
    "Stream": "_stream",
    "stream": "_stream",
}


def __getattr__(name: str):  # PEP 562
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'forkserver' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "BrokenChannelError",
    "BrokenTemplateError",
    "CalledProcessError",
    "Child",
    "ClosedError",
    "FdTableFullError",
    "ForkserverError",
    "PidfdUnavailableError",
    "ProtocolError",
    "RemoteError",
    "RemoteTraceback",
    "Stream",
    "Template",
    "ThreadedTemplateError",
    "__version__",
    "early",
    "run_program",
    "spawn",
    "stream",
]
