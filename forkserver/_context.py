"""The caller's context a new template adopts (parent side; docs/design.md, "Processes").

``Template()`` takes the caller's *current* environment, working directory,
``sys.path`` and stdio fds 0-2 at the moment it is called; keyword
arguments override each.  This module turns them into the ``SETUP``
command's payload and fds.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Sequence, Tuple

from . import _protocol as P

# subprocess's constants, without importing subprocess into every caller
PIPE, STDOUT, DEVNULL = -1, -2, -3
_NAMES = ("stdin", "stdout", "stderr")


def dup_all(fds: Sequence[Any]) -> List[int]:
    """Duplicates of ``fds`` (ints or objects with fileno()), all or none."""
    dups: List[int] = []
    try:
        for fd in fds:
            dups.append(os.dup(fd if isinstance(fd, int) else fd.fileno()))
    except BaseException:
        for fd in dups:
            os.close(fd)
        raise
    return dups


def caller_context(env, cwd, stdio, sys_path, gc_freeze) -> Tuple[Dict[str, Any], List[Any], List[int]]:
    """(context, fds, opened fds) for SETUP: a template adopting the caller's context.

    ``opened``: fds opened here (``/dev/null`` for ``DEVNULL``), to be closed
    once the command is sent.
    """
    ctx: Dict[str, Any] = {
        "env": dict(os.environ if env is None else env),
        "cwd": os.fspath(cwd) if cwd is not None else os.getcwd(),
        "sys_path": list(sys_path),
        "gc_freeze": gc_freeze,
        "stdio": [],
    }
    fds: List[Any] = []
    opened: List[int] = []
    try:
        for target, handle in enumerate(stdio):
            if handle is None:
                try:
                    os.fstat(target)
                except OSError:
                    continue  # the caller's own fd is closed: the template keeps /dev/null
                handle = target
            elif isinstance(handle, int) and not isinstance(handle, bool) and handle < 0:
                if handle == STDOUT and target == 2:
                    ctx["stderr_to_stdout"] = True  # the template dup2s its fd 1 onto 2
                    continue
                if handle != DEVNULL:
                    raise ValueError(_bad_stdio(target, handle))
                fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
                opened.append(fd)
                handle = fd
            fd, _ = P.describe_handle(handle)
            ctx["stdio"].append(target)
            fds.append(fd)
    except BaseException:
        for fd in opened:
            os.close(fd)
        raise
    return ctx, fds, opened


def _bad_stdio(target: int, handle: int) -> str:
    """Why ``Template(<stream>=handle)`` is refused (a negative int), and what to pass."""
    name = _NAMES[target]
    if handle == PIPE:
        return (
            f"Template({name}=subprocess.PIPE): a template has no pipe to hand back (every "
            "worker it makes inherits its stdio); pass an end of os.pipe(), a file, a socket "
            f"or an fd, or use forkserver.spawn(..., {name}=PIPE) for a program"
        )
    if handle == STDOUT:
        return (f"Template({name}=subprocess.STDOUT): STDOUT is only valid for stderr "
                "(stderr=STDOUT)")
    return f"Template({name}={handle}): not an fd; pass a file, a socket, an fd >= 0 or DEVNULL"
