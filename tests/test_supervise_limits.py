"""Supervisor limits: memory and CPU sampled with psutil, kill or throttle, the duration rule.

The throttle test measures the member's CPU time over a window of real time
(psutil), with a wide margin: a paused process cannot run, so its share can
only go *below* the target on a loaded machine, never far above it.
"""

from __future__ import annotations

import os
import select
import time

import psutil
import pytest

from forkserver import Limits, Supervisor, Template

from ._fake_clock import FakeClock, settle

pytestmark = pytest.mark.usefixtures("no_leaks")

S = "tests._supervised"
T = 30
MIB = 1 << 20


@pytest.fixture(scope="module")
def tpl():
    with Template().require(S) as t:
        yield t


def test_a_member_allocating_300_mib_with_a_100_mib_limit_is_stopped(tpl):
    with (
        tpl.fork().send_arg(300) as big,
        Supervisor((big, f"{S}:allocate"), limits=Limits(memory=100 * MIB), restart="never") as sup,
    ):
        st = sup.wait_state("killed", timeout=T)
        m = st.members[0]
        assert m.reason.startswith("memory ") and "over the limit of 100 MiB" in m.reason
        assert m.memory_max is not None and m.memory_max > 100 * MIB
        assert m.gave_up and m.counts["killed"] == 1


def test_a_member_under_its_memory_limit_is_left_alone(tpl):
    clock = FakeClock()
    with (
        tpl.fork().send_arg(10) as small,
        Supervisor((small, f"{S}:allocate"), limits=Limits(memory=200 * MIB), _clock=clock) as sup,
    ):
        pid = sup.wait_state("running", timeout=T).members[0].pid
        for _ in range(3):
            clock.advance(1.0)
            settle(sup)
        m = sup.status().members[0]
        assert m.pid == pid and m.state == "running" and m.memory is not None


def test_a_limit_acts_only_after_its_duration(tpl):
    clock = FakeClock()
    r, w = os.pipe()
    with os.fdopen(w, "wb") as told:
        heavy = tpl.fork().send_arg(150).send_fh(told)
    with (
        heavy,
        Supervisor(
            (heavy, f"{S}:allocate_then_tell"),
            limits=Limits(memory=100 * MIB, duration=5),
            restart="never",
            _clock=clock,
        ) as sup,
    ):
        sup.wait_state("running", timeout=T)
        assert select.select([r], [], [], T)[0] and os.read(r, 1) == b"!"  # it holds 150 MiB now
        for _ in range(5):
            clock.advance(1.0)  # a sample each time: over for 0, 1, .. 4 s
            settle(sup)
            assert sup.status().members[0].state == "running"
        clock.advance(1.0)
        st = sup.wait_state("killed", timeout=T)
        assert st.members[0].reason.endswith("for 5.0 s")
    os.close(r)


def test_memory_counts_private_pages_not_those_shared_with_the_template(tpl):
    clock = FakeClock()
    heavy = tpl.fork()
    heavy.eval("ballast = b'x' * (150 << 20)")  # in every member's RSS, in none's USS
    with (
        heavy,
        Supervisor(
            (heavy, f"{S}:wait_for_eof"), limits=Limits(memory=100 * MIB), _clock=clock
        ) as sup,
    ):
        pid = sup.wait_state("running", timeout=T).members[0].pid
        for _ in range(2):
            clock.advance(1.0)
            settle(sup)
        m = sup.status().members[0]
        assert m.pid == pid and m.state == "running"
        assert m.rss > 150 * MIB > 100 * MIB > m.memory


def test_throttling_holds_a_busy_loop_below_its_cpu_limit(tpl):
    limit = 0.25
    with Supervisor((tpl, f"{S}:busy"), limits=Limits(cpu=limit, mode="throttle")) as sup:
        st = sup.wait_until(lambda s: s.members[0].throttled, timeout=T)
        proc = psutil.Process(st.members[0].pid)
        sup.wait_until(
            lambda s: s.members[0].cpu is not None and s.members[0].cpu < 2 * limit, timeout=T
        )
        t0, c0 = time.monotonic(), sum(proc.cpu_times()[:2])
        time.sleep(3.0)  # the measurement window (not a synchronisation)
        t1, c1 = time.monotonic(), sum(proc.cpu_times()[:2])
        share = (c1 - c0) / (t1 - t0)
        m = sup.status().members[0]
        assert m.state == "running" and m.pid == proc.pid  # throttled, not killed
        # Released only if, on a loaded machine, it got less than its limit anyway.
        assert m.throttled or m.cpu <= limit
        print(f"throttled share {share:.3f} (limit {limit})")
        assert share < limit * 1.5 + 0.05, share


def test_a_cpu_limit_in_kill_mode_stops_a_busy_loop(tpl):
    with Supervisor((tpl, f"{S}:busy"), limits=Limits(cpu=0.05), restart="never") as sup:
        st = sup.wait_state("killed", timeout=T)
        assert (
            st.members[0].reason.startswith("CPU ")
            and "over the limit of 0.05" in st.members[0].reason
        )


def test_a_stopped_throttled_member_is_let_run_and_exits(tpl):
    sup = Supervisor((tpl, f"{S}:busy"), limits=Limits(cpu=0.1, mode="throttle"), grace=5)
    sup.wait_until(lambda s: s.members[0].throttled, timeout=T)
    st = sup.stop()  # SIGCONT with SIGTERM: it ends on SIGTERM, not after the grace
    assert st.members[0].state == "finished" and st.members[0].exit_code == -15
