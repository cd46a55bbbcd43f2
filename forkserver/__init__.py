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
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._process import Child
    from ._template import Template, early

__version__ = "0.1.0.dev0"

# The parent-side names load on first use.  Template processes import
# ``forkserver._server``, and with it this package: eager imports here would
# load threading, weakref and the reaper into every template, and every clone
# would then pay for their at-fork hooks (~120 copy-on-write page faults,
# ~0.8 ms per fork measured here).
_LAZY = {"Child": "._process", "Template": "._template", "early": "._template"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'forkserver' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> "list[str]":
    return sorted(set(globals()) | set(_LAZY))

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
