"""Making processes that are our parent's children: ``fork_sibling``, ``spawn_sibling``.

Template processes clone themselves and start programs with these; the new
process is a child of the template's parent -- the user's process -- which
reaps it (DESIGN rule 2).  Both announce the new pid to the parent before
anything can lose it: the new process writes a ``PID`` frame first thing
(before any Python code runs in it), and the kernel stores the pid in the
parent's pid slot (``_slots``) before the new process first runs.  The C
side is in ``_fdpass/fdpass.c``; this module only marshals arguments.
"""
from __future__ import annotations

import os
from typing import Any, List, Optional, Tuple

from ._fds import _PID_PREFIX, _reserve, ffi, lib

__all__ = ["fork_sibling", "spawn_sibling", "STAGE_SESSION", "STAGE_FDS", "STAGE_CWD", "STAGE_EXEC"]


def fork_sibling(announce: int = -1, ptid: Any = ffi.NULL) -> int:
    """Create a process whose parent is our parent (``clone(CLONE_PARENT)``).

    Returns the new pid in the caller and 0 in the new process, like
    ``os.fork()``.  Only safe in a single-threaded process: the caller checks.
    ``announce``: a socket to our parent on which the new process, before it
    runs any Python code, writes a ``PID`` frame with its own pid -- so the
    parent learns the pid even if we or the new process die right after.
    ``ptid`` (an ``int *`` into the parent's pid slots, ``_slots``): where
    the kernel stores the new pid before the new process first runs.
    """
    _reserve.inherit = True
    try:
        pid = lib.fdp_fork_sibling(announce, _PID_PREFIX, len(_PID_PREFIX), ptid)
    finally:
        _reserve.inherit = False
    if pid < 0:
        err = ffi.errno
        raise OSError(err, f"clone(CLONE_PARENT) failed: {os.strerror(err)}")
    return pid


#: where a failed spawn stopped (``spawn_sibling``'s third result)
STAGE_SESSION: int = lib.FDP_STAGE_SESSION
STAGE_FDS: int = lib.FDP_STAGE_FDS
STAGE_CWD: int = lib.FDP_STAGE_CWD
STAGE_EXEC: int = lib.FDP_STAGE_EXEC


def spawn_sibling(
    strings: bytes,
    counts: Tuple[int, int, int],
    cwd: Optional[bytes],
    fd_map: List[Tuple[int, int]],
    keep: List[int],
    new_session: bool,
    pgid: int,
    dfl_sigs: int,
    announce: int = -1,
    ptid: Any = ffi.NULL,
) -> Tuple[int, int, int]:
    """Start a program as a child of our parent, vfork-style: ``(pid, errno, stage)``.

    ``strings`` holds the candidate paths, the argv and the environment,
    each string NUL-terminated, back to back; ``counts`` says how many of
    each.  The paths are tried in turn like ``execvpe``.  ``fd_map`` lists
    ``(source fd, target fd)`` pairs (source -1: the target is closed; no
    source may also be a target); ``keep`` the targets above 2, ascending;
    every other fd is closed at exec.  If the child failed before or in
    ``execve``, errno is non-zero and the pid is still that of an exited
    child the caller's parent must reap.  ``announce``: an fd the child
    writes a ``PID`` frame with its pid to, first of all, and ``ptid``
    where the kernel stores it (see ``fork_sibling``).
    Raises ``OSError`` only if the clone itself failed.
    """
    nfd = len(fd_map)
    a = ffi.new("struct fdp_spawn_args *")
    # A struct field does not keep its cdata alive: these locals do, until we return.
    buf = ffi.from_buffer(strings)
    ptrs = ffi.new("char *[]", sum(counts) + 3)
    a.strings, a.ptrs = buf, ptrs
    a.npaths, a.nargv, a.nenv = counts
    cwd_c = ffi.new("char[]", cwd) if cwd is not None else ffi.NULL
    a.cwd = cwd_c
    src = ffi.new("int[]", [s for s, _ in fd_map] or [0])
    dst = ffi.new("int[]", [d for _, d in fd_map] or [0])
    keep_c = ffi.new("int[]", keep or [0])
    a.src, a.dst, a.nfd = src, dst, nfd
    a.keep, a.nkeep = keep_c, len(keep)
    a.new_session = bool(new_session)
    a.pgid = pgid
    a.dfl_sigs = dfl_sigs
    a.announce_fd, a.announce, a.announce_len = announce, _PID_PREFIX_C, len(_PID_PREFIX)
    a.ptid = ptid
    pid = lib.fdp_spawn_sibling(a)
    if pid < 0:
        err = ffi.errno
        raise OSError(err, f"clone(CLONE_VM|CLONE_VFORK|CLONE_PARENT) failed: {os.strerror(err)}")
    return pid, a.err, a.stage


_PID_PREFIX_C = ffi.new("char[]", _PID_PREFIX)  # kept alive for spawn_sibling's struct


