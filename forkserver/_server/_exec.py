"""SPAWN: start an external program from a template (runs inside template processes).

The parent prepared everything (argv, environment, the PATH candidates, the
fd map); the template only turns it into C arrays and calls
``spawn_sibling``: a vfork-style ``clone(CLONE_VM|CLONE_VFORK|CLONE_PARENT)``
whose child places the fds, changes directory and execs.  Because of
CLONE_VFORK the template knows the outcome when the call returns -- the pid,
or the errno and step where the child failed -- and writes it to the reply
pipe that came with the command.  The program is a child of the template's
parent, which reaps it (also after a failed exec: the child then exited 127).
"""

from __future__ import annotations

import fcntl
import os
from typing import Any, List, Set

from .. import _protocol as P
from .._fds import HEADER, ffi
from .._sibling import spawn_sibling
from .._slots import region


def do_spawn(state, frame) -> None:
    """Serve one SPAWN frame: ``fds[0]`` is the reply pipe, the rest the program's fds."""
    reply, fds = frame.fds[0], frame.fds[1:]
    try:
        if state.broken is not None:  # an earlier pipelined command failed
            kind, payload = P.ERROR, state.broken
        else:
            try:
                slot, spec = P.split_slot(frame.payload)
                ptid = region.address(slot)  # the pid goes there; without one, on the reply socket
                announce = -1 if ptid != ffi.NULL else reply
                kind, payload = P.SPAWNED, _spawn(P.loads(spec), fds, announce, ptid)
            except BaseException as exc:
                kind, payload = P.ERROR, P.encode_error(exc, "spawn()")
        _write_all(reply, HEADER.pack(len(payload), 0, kind) + payload)
    except OSError:
        pass  # the caller stopped waiting (EPIPE); it closed its end
    finally:
        for fd in fds:
            os.close(fd)
        os.close(reply)


def _spawn(spec: tuple, fds: list, reply: int = -1, ptid: Any = ffi.NULL) -> bytes:
    strings, counts, cwd, fd_map, keep, new_session, pgid, dfl_sigs = spec
    targets = {target for _, target in fd_map}
    moved: List[int] = []
    try:
        mapped = []
        for i, target in fd_map:
            src = fds[i] if i >= 0 else -1
            if src in targets:  # placing another fd there first would destroy it
                src = _off_targets(src, targets, moved)
            mapped.append((src, target))
        pid, err, stage = spawn_sibling(
            strings, counts, cwd, mapped, keep, new_session, pgid, dfl_sigs, announce=reply, ptid=ptid
        )
    finally:
        for fd in moved:
            os.close(fd)
    return P.SPAWNED_FORMAT.pack(pid, err, stage)


def _off_targets(fd: int, targets: Set[int], moved: List[int]) -> int:
    """A close-on-exec duplicate of ``fd`` whose number is not a target (kept in ``moved``)."""
    taken = []  # duplicates that landed on targets, held so the next one lands elsewhere
    try:
        while True:
            dup = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
            if dup not in targets:
                moved.append(dup)
                return dup
            taken.append(dup)
    finally:
        for held in taken:
            os.close(held)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
