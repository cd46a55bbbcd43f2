"""Shared fixtures: leak checks on our own descriptors and children."""
from __future__ import annotations

import os
from typing import Set

import psutil
import pytest


def open_fds() -> Set[int]:
    """The fds open in this process, minus forkserver's standing ones.

    Those are the sentinel reserve and the shared default template's socket
    and pidfd: they live as long as the process, by design.
    """
    from forkserver import _fds, _reaper, _template

    fds = {int(name) for name in os.listdir("/proc/self/fd")}
    fds = {fd for fd in fds if _is_open(fd)}  # drops listdir's own, now closed, fd
    standing = set(_fds._reserve.held()) | _reaper.reaper.standing_fds()
    default = _template._default.template
    if default is not None:
        standing |= {default._chan.fileno(), default._pidfd}
    return fds - standing


def child_pids() -> Set[int]:
    """Our children, zombies included, minus the shared default template."""
    from forkserver import _template

    kids = {p.pid for p in psutil.Process().children()}
    default = _template._default.template
    if default is not None:
        kids.discard(default._pid)
    return kids


@pytest.fixture
def no_leaks():
    """Fail the test if it leaves an fd open or a child process behind (zombies included)."""
    fds_before = open_fds()
    kids_before = child_pids()
    yield
    from forkserver._reaper import reaper

    assert reaper.wait_idle(10), "the reaper still waits for dropped processes"
    leaked_fds = open_fds() - fds_before
    leaked_kids = child_pids() - kids_before
    details = {fd: _describe(fd) for fd in leaked_fds}
    assert not leaked_fds, f"fds leaked: {details}"
    assert not leaked_kids, f"children left behind: {leaked_kids}"


def _describe(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True
