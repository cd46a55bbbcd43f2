"""forkserver: cheap, safe child processes for big, multithreaded Python programs.

A small, freshly exec'd *template* interpreter receives commands and file
descriptors over an AF_UNIX socket and forks children on demand; every child
is a direct child of your process.  See README.md and docs/.
"""
from typing import TYPE_CHECKING, Any

from ._errors import (
    BrokenChannelError,
    BrokenSupervisorError,
    BrokenTemplateError,
    ClosedError,
    FdTableFullError,
    ForkserverError,
    MemberFailedError,
    PidfdUnavailableError,
    ProtocolError,
    ReapedElsewhereError,
    ReloadError,
    RemoteError,
    RemoteTraceback,
    ThreadedTemplateError,
)

if TYPE_CHECKING:
    from ._errors import CalledProcessError, WorkerDiedError
    from ._pool._executor import Executor
    from ._pool._mp import mp_context
    from ._process import Child
    from ._programs._run import run_program
    from ._programs._spawn import spawn
    from ._programs._stream import Stream, stream
    from ._supervise._limits import Limits
    from ._supervise._status import MemberStatus, SupervisorStatus
    from ._supervise._supervisor import Supervisor
    from ._template import Template, early

__version__ = "0.1.0.dev0"

# Loaded on first use.  Template processes import ``forkserver._server``,
# and with it this package: eager imports here would load threading, weakref,
# subprocess and the reaper into every template, and every clone would pay
# for their at-fork hooks (threading's alone: ~120 copy-on-write page faults,
# ~0.8 ms per fork measured here; subprocess: ~3.5 ms of import time).
_LAZY = {
    "CalledProcessError": "._errors",
    "Child": "._process",
    "Executor": "._pool._executor",
    "Limits": "._supervise._limits",
    "MemberStatus": "._supervise._status",
    "Stream": "._programs._stream",
    "Supervisor": "._supervise._supervisor",
    "SupervisorStatus": "._supervise._status",
    "Template": "._template",
    "early": "._template",
    "mp_context": "._pool._mp",
    "run_program": "._programs._run",
    "spawn": "._programs._spawn",
    "stream": "._programs._stream",
    "WorkerDiedError": "._errors",
}


def __getattr__(name: str) -> Any:  # PEP 562
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
    "BrokenSupervisorError",
    "BrokenTemplateError",
    "CalledProcessError",
    "Child",
    "ClosedError",
    "Executor",
    "FdTableFullError",
    "ForkserverError",
    "Limits",
    "MemberFailedError",
    "MemberStatus",
    "PidfdUnavailableError",
    "ProtocolError",
    "ReapedElsewhereError",
    "ReloadError",
    "RemoteError",
    "RemoteTraceback",
    "Stream",
    "Supervisor",
    "SupervisorStatus",
    "Template",
    "ThreadedTemplateError",
    "WorkerDiedError",
    "__version__",
    "early",
    "mp_context",
    "run_program",
    "spawn",
    "stream",
]
