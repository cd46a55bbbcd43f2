"""Pid slots: a page the parent shares with its templates, where the kernel writes new pids.

The parent can only reap a process whose pid it knows.  A clone writes its
pid on its socket first thing (``_fds.fork_sibling``), but a process
SIGKILLed before its first instruction writes nothing -- and on a busy
machine a new process can wait milliseconds for a CPU, long enough for a
kill storm to catch it there, and its template too.  So each ``FORK`` and
``SPAWN`` carries a *slot*, an int in a memfd the parent maps and every
template maps as well, and the template clones with
``CLONE_PARENT_SETTID`` pointing at that slot: the kernel stores the new pid
there before the new process is first woken, and before the template's
``clone`` returns to user space (where its own pending SIGKILL would
strike).  Whatever dies when, the pid is in the parent's memory.

The parent reads a slot only when a clone's channel ends without having
told the pid (``settle``); a slot is free again once its fork's fate is
known: the PID frame came (the kernel wrote the slot long before), or the
channel reached EOF (the template is done with that command, or dead).

Exec'd templates get the memfd as fd 4 (``_boot``); clones inherit the
mapping; ``early()``'s fork shares the parent's.  A forked copy of the
user's program makes a region of its own on first use.
"""
from __future__ import annotations

import _thread
import os
from typing import Any, List, Optional

from ._fds import ffi, lib

__all__ = ["FD", "region", "settle"]

SLOTS = 16384  # outstanding forks and spawns at once; beyond, a fork goes without a slot
FD = 4  # where an exec'd template finds the memfd (its command socket is fd 3)
_SIZE = SLOTS * 4


class _Region:
    def __init__(self) -> None:
        self._lock = _thread.allocate_lock()
        self._fd = -1
        self._base: Any = ffi.NULL  # int * into the mapping
        self._free: List[int] = []
        self._owner: Optional[int] = None  # the parent that made it; None in templates

    # -- the parent --------------------------------------------------------------

    def _ensure(self) -> None:  # lock held
        if self._base != ffi.NULL and self._owner == os.getpid():
            return
        fd = os.memfd_create("forkserver-pids", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, _SIZE)
            base = _map(fd)
        except BaseException:
            os.close(fd)
            raise
        # A forked copy of the parent forgets the region it inherited (its own
        # templates get a new one); the old mapping stays, shared with nobody new.
        self._fd, self._base, self._owner = fd, base, os.getpid()
        self._free = list(range(SLOTS - 1, -1, -1))

    def fileno(self) -> int:
        """The memfd, for an exec'd template (posix_spawn dups it to ``FD``)."""
        with self._lock:
            self._ensure()
            return self._fd

    def standing_fds(self) -> set:
        """The region's own long-lived fd (for leak checks)."""
        return {self._fd} if self._fd >= 0 and self._owner == os.getpid() else set()

    def take(self) -> Optional[int]:
        """A zeroed slot for one fork or spawn, or None if all are in use."""
        with self._lock:
            self._ensure()
            if not self._free:
                return None
            slot = self._free.pop()
            self._base[slot] = 0
            return slot

    def give(self, slot: int) -> None:
        """The slot is free again.  Returns None (``chan.slot = region.give(slot)``)."""
        with self._lock:
            if self._owner == os.getpid():
                self._free.append(slot)

    def pid_at(self, slot: int) -> int:
        """The pid the kernel wrote in ``slot`` (0: no process was made)."""
        return int(self._base[slot])

    # -- a template ------------------------------------------------------------------

    def attach(self, fd: int) -> None:
        """In an exec'd template: map the parent's memfd (``fd`` is closed)."""
        try:
            self._base, self._owner = _map(fd), None
        finally:
            os.close(fd)

    def address(self, slot: Optional[int]) -> Any:
        """Where the kernel should store the new pid (``int *``), or NULL."""
        if slot is None or self._base == ffi.NULL or not 0 <= slot < SLOTS:
            return ffi.NULL
        return self._base + slot


def _map(fd: int) -> Any:
    """``int *`` to the slots of memfd ``fd``, mapped shared (no fd kept: see fdp_map_shared)."""
    base = lib.fdp_map_shared(fd, _SIZE)
    if base == ffi.NULL:
        err = ffi.errno
        raise OSError(err, f"mmap of the pid slots: {os.strerror(err)}")
    return ffi.cast("int *", base)


region = _Region()


def settle(chan: Any, ended: bool) -> None:
    """Learn a clone's (or a program's) pid from its slot, and free the slot once it is known.

    A memory read, no syscall: called whenever a channel is read.  The pid
    is there from the moment the process exists, so a process with a slot
    writes no ``PID`` frame at all (the parent would wake up for it while
    the process starts).  ``ended``: the channel reached EOF (or broke):
    then a slot still at 0 means no process was made, and is freed too.
    """
    slot = chan.slot
    if slot is None:
        return
    if chan.peer_pid is None:
        pid = region.pid_at(slot)
        if pid > 0:
            chan.peer_pid = pid
        elif not ended:
            return  # not made yet
    chan.slot = region.give(slot)  # type: ignore[func-returns-value]  # None: freed and forgotten at once
