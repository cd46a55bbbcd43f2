"""A KeyboardInterrupt at any line of ``stop()``, ``resize()`` or ``reload()`` leaves every
member reachable through the supervisor (or reaped), and a later call finishes the job.

Each test runs the call once per line it executes in forkserver's code in
the calling thread (``tests/_kbinterrupt.py``), interrupted at that line.
The supervising thread is not interrupted: Python delivers KeyboardInterrupt
to the main thread only, and the calls are built so that the main thread
only queues a request and waits for it.
"""

from __future__ import annotations

import os

import psutil
import pytest

import forkserver
from forkserver import Supervisor, Template

from ._kbinterrupt import interrupt_at

pytestmark = pytest.mark.usefixtures("no_leaks")

S = "tests._supervised"
T = 30
PACKAGE = os.path.dirname(forkserver.__file__)
ROOM = os.path.join(PACKAGE, "_supervise")


@pytest.fixture(scope="module")
def tpl():
    with Template().require(S) as t:
        yield t


def idle(sup) -> None:
    """Wait until the supervisor has carried out every request queued so far."""
    engine = sup._engine
    engine.wake()  # in case the interrupt came before the call's own wake-up
    with engine.cond:
        assert engine.cond.wait_for(lambda: engine.active is None and not engine.requests, T)
    # Every member has sent its heartbeat: it runs our code, under its own title.
    sup.wait_until(
        lambda s: not s.retiring and all(m.state == "running" and m.up for m in s.members),
        timeout=T,
    )


def members_alive() -> set:
    """Our children that run a supervised member (workers are titled after the target)."""
    found = set()
    for proc in psutil.Process().children():
        try:
            if proc.name() == "fs:ready_then_w":  # "fs:" + the target's name, 15 bytes
                found.add(proc.pid)
        except psutil.NoSuchProcess:
            pass
    return found


def assert_reachable(sup) -> None:
    """Every member process we have is in the supervisor's status, and every one there is ours."""
    assert members_alive() == set(sup.status().pids)


def interrupted_runs(call, under=PACKAGE, limit=400):
    """Run ``call()`` interrupted at line 1, 2, ... until it completes; yields after each."""
    for n in range(1, limit):
        with interrupt_at(n, under) as hook:
            try:
                call()
            except KeyboardInterrupt:
                pass
        yield hook
        if not hook.fired:
            return
    raise AssertionError(f"the call ran more than {limit} lines")


def test_an_interrupted_resize_leaves_every_member_reachable(tpl):
    with Supervisor((tpl, f"{S}:ready_then_wait"), size=1) as sup:
        sup.wait_state("running", timeout=T)
        sizes = iter([3, 1] * 400)
        runs = 0
        for _hook in interrupted_runs(lambda: sup.resize(next(sizes))):
            runs += 1
            idle(sup)
            assert_reachable(sup)
        assert runs > 5  # the call has lines to interrupt
        st = sup.resize(2)
        assert st.count("running") == 2
    assert members_alive() == set()


def test_an_interrupted_stop_can_be_called_again_and_reaps_every_member(tpl):
    runs = 0
    holder = {}

    def make():
        sup = holder["sup"] = Supervisor((tpl, f"{S}:ready_then_wait"), size=2)
        sup.wait_state("running", timeout=T)

    make()
    for hook in interrupted_runs(lambda: holder["sup"].stop(grace=5)):
        runs += 1
        sup = holder["sup"]
        st = sup.stop(grace=5)  # the second call finishes what the first began
        assert st.state == "stopped" and all(m.state == "finished" for m in st.members)
        assert members_alive() == set()
        if hook.fired:
            make()
    assert runs > 5


def test_an_interrupted_reload_leaves_every_member_reachable(tpl):
    with Supervisor((tpl, f"{S}:ready_then_wait"), size=2) as sup:
        sup.wait_state("running", timeout=T)
        runs = 0
        for _hook in interrupted_runs(lambda: sup.reload(tpl), under=ROOM):
            runs += 1
            idle(sup)
            assert_reachable(sup)
            st = sup.status()
            assert st.count("running") == 2
        assert runs > 5
    assert members_alive() == set()
