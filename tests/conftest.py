"""Shared fixtures: leak checks on our own descriptors and children."""
from __future__ import annotations

import os
from typing import Set

import psutil
import pytest


def open_fds() -> Set[int]:
    """The fds open in this process, minus forkserver's standing sentinel reserve."""
    from forkserver import _fds

    fds = {int(name) for name in os.listdir("/proc/self/fd")}
    reserved = set(_fds._reserve._spare) | {_fds._reserve._model}
    return fds - reserved


def child_pids() -> Set[int]:
    """Our live (non-zombie) and zombie children."""
    return {p.pid for p in psutil.Process().children()}


@pytest.fixture
def no_leaks():
    """Fail the test if it leaves an fd open or a child process behind (zombies included)."""
    fds_before = open_fds()
    kids_before = child_pids()
    yield
    # listdir itself opens an fd; compare sets, not counts
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
