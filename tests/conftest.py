"""Shared fixtures: leak checks on our own descriptors and children."""
from __future__ import annotations

import os
import signal
from typing import Any, List, Set

import psutil
import pytest

# A job started in the background by a shell without job control (`pytest &`
# in a script) begins with SIGINT ignored, and Python then installs no
# KeyboardInterrupt handler.  Many tests deliver a Ctrl-C on purpose (and
# check that programs get SIGINT at its default): give the suite the
# disposition of a terminal's foreground job.  Tests of an ignored SIGINT set
# it themselves.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def open_fds() -> Set[int]:
    """The fds open in this process, minus forkserver's standing ones.

    Those are the sentinel reserve and the shared default template's (and its
    spare clone's) socket and pidfd: they live as long as the process, by design.
    """
    from forkserver import _fds, _reaper, _slots

    fds = {int(name) for name in os.listdir("/proc/self/fd")}
    fds = {fd for fd in fds if _is_open(fd)}  # drops listdir's own, now closed, fd
    standing = set(_fds._reserve.held()) | _reaper.reaper.standing_fds() | _slots.region.standing_fds()
    for tpl in _standing_templates():
        standing |= {tpl._chan.fileno(), tpl._pidfd}
    return fds - standing


def child_pids() -> Set[int]:
    """Our children, zombies included, minus the standing templates."""
    kids = {p.pid for p in psutil.Process().children()}
    for tpl in _standing_templates():
        kids.discard(tpl._pid)
    return kids


def _standing_templates() -> List[Any]:
    """Templates that stand by design: the shared default template and every spare clone.

    A template keeps a spare clone ready once it has been forked (a module
    fixture's template, say); spares end with their template, which the spare
    tests check.  Never blocks: a spare made "after" a running worker does
    not exist before that worker ends, and its pid is unknown until then.
    """
    from forkserver import _default, _template

    standing = []
    default = _default._default.template
    if default is not None:
        standing.append(default)
    for tpl in list(_template._live):
        spare = tpl._spare
        if spare is not None and spare._status in ("starting", "ready"):
            spare._read_available()  # its pid, if it exists (no wait)
            standing.append(spare)
    return standing


def children_but_default() -> Set[int]:
    """Our children (zombies included) minus the shared default template and its spare.

    ``Template()`` takes the default template's spare, which makes the next
    one in the background: a test counting its own processes must not see it.
    """
    from forkserver import _default

    kids = {p.pid for p in psutil.Process().children()}  # first: a spare made later is not in it
    default = _default._default.template
    if default is not None:
        kids.discard(default.pid)
        if default._spare is not None:
            kids.discard(default._spare.pid)  # a plain spare: it greets at once
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
