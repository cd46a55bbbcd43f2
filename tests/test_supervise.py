"""forkserver.Supervisor: states, restarts, backoff, crash loops, health, resize, reload, stop.

Timing rules are checked on a fake clock (``tests/_fake_clock.py``): the
supervising loop then waits for events only and sees time move when the
test says so.  Real-clock tests wait on the supervisor's own condition with
deadlines, never with sleeps.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import threading

import psutil
import pytest

import forkserver
from forkserver import (
    ClosedError,
    Limits,
    MemberFailedError,
    ReloadError,
    Supervisor,
    SupervisorStatus,
    Template,
)

from ._fake_clock import FakeClock, settle

pytestmark = pytest.mark.usefixtures("no_leaks")

S = "tests._supervised"
T = 30  # seconds: the deadline of every wait here


@pytest.fixture(scope="module")
def tpl():
    with Template().require(S) as t:
        yield t


@pytest.fixture
def sups():
    """Supervisors made by a test: stopped at its end even if it fails."""
    made = []
    yield made
    for sup in made:
        sup.stop(grace=1)


@pytest.fixture
def fork(tpl):
    """``fork(*args)``: a fork of the module's template with ``args`` sent; closed at the end."""
    made = []

    def make(*args):
        t = tpl.fork().send_arg(*args)
        made.append(t)
        return t

    yield make
    for t in made:
        t.close()


def sv(sups, *args, **kwargs) -> Supervisor:
    sup = Supervisor(*args, **kwargs)
    sups.append(sup)
    return sup


# -- states and status -----------------------------------------------------------------------------


def test_members_start_running_and_status_is_json_friendly(tpl, sups):
    sup = sv(sups, (tpl, f"{S}:wait_for_eof"), size=3)
    st = sup.wait_state("running", timeout=T)
    assert isinstance(st, SupervisorStatus) and st.state == "running" and st.size == 3
    pids = [m.pid for m in st.members]
    assert len(set(pids)) == 3 and all(psutil.Process(p).ppid() == os.getpid() for p in pids)
    m = st.members[0]
    assert m.counts["starting"] == 1 and m.counts["running"] == 1 and m.restarts == 0
    assert m.exit_code is None and m.generation == 0 and not m.gave_up
    back = json.loads(json.dumps(st.to_dict()))
    assert back["members"][2]["pid"] == pids[2] and back["size"] == 3
    assert set(st.pids) == set(pids)


def test_one_thread_supervises_every_member(tpl, sups):
    before = {t.name for t in threading.enumerate()}
    sup = sv(sups, (tpl, f"{S}:wait_for_eof"), size=6)
    sup.wait_state("running", timeout=T)
    names = [t.name for t in threading.enumerate() if t.name not in before]
    assert names.count("forkserver-supervisor") == 1
    assert len([n for n in names if n != "forkserver-reaper"]) == 1


def test_a_killed_member_is_replaced_at_once_in_its_slot(tpl, sups):
    sup = sv(sups, (tpl, f"{S}:wait_for_eof"), size=2)
    old = sup.wait_state("running", timeout=T).members[1].pid
    os.kill(old, signal.SIGKILL)
    st = sup.wait_until(lambda s: s.members[1].pid not in (None, old), timeout=T)
    m = st.members[1]
    assert m.exit_code == -signal.SIGKILL and m.reason == "killed by SIGKILL"
    assert m.counts["killed"] == 1 and m.restarts == 1
    assert st.members[0].restarts == 0  # the other slot was left alone


def test_exit_statuses_map_to_finished_failed_and_killed(tpl, fork, sups):
    states = {}
    for code, expected in ((0, "finished"), (3, "failed")):
        t = fork(code)
        sup = sv(sups, (t, f"{S}:exit_now"), restart="never")
        st = sup.wait_state(expected, timeout=T)
        states[code] = (st.members[0].exit_code, st.members[0].reason, st.members[0].gave_up)
        sup.stop()
    assert states[0] == (0, None, True)
    assert states[3] == (3, "exited with status 3", True)


def test_restart_on_failure_restarts_a_crash_but_not_a_clean_exit(tpl, fork, sups):
    clean = fork(0)
    crash = fork(1)
    a = sv(sups, (clean, f"{S}:exit_now"), restart="on-failure")
    b = sv(sups, (crash, f"{S}:exit_now"), restart="on-failure", backoff=(0, 0), crash_loop=(3, 60))
    assert a.wait_state("finished", timeout=T).members[0].gave_up
    st = b.wait_until(lambda s: s.members[0].gave_up, timeout=T)
    assert st.members[0].counts["starting"] == 3 and st.members[0].state == "failed"
    assert a.status().members[0].counts["starting"] == 1
    for s in (a, b):
        s.stop()


def test_callbacks_run_in_the_parent_in_order_and_a_raising_one_is_ignored(tpl, sups, caplog):
    events = []

    def on_start(m):
        events.append(("start", m.pid, os.getpid(), threading.current_thread().name))

    def on_exit(m):
        events.append(("exit", m.pid, m.exit_code))
        raise RuntimeError("a broken callback")

    def on_state_change(m, old):
        events.append(("state", old, m.state))

    caplog.set_level(logging.ERROR, "forkserver.supervise")
    sup = sv(
        sups,
        (tpl, f"{S}:wait_for_eof"),
        on_start=on_start,
        on_exit=on_exit,
        on_state_change=on_state_change,
    )
    pid = sup.wait_state("running", timeout=T).members[0].pid
    os.kill(pid, signal.SIGKILL)
    sup.wait_until(
        lambda s: s.members[0].restarts == 1 and s.members[0].state == "running", timeout=T
    )
    sup.stop()
    starts = [e for e in events if e[0] == "start"]
    assert starts[0][2] == os.getpid() and starts[0][3] == "forkserver-supervisor"
    assert ("exit", pid, -signal.SIGKILL) in events
    states = [e[1:] for e in events if e[0] == "state"]
    assert states[:4] == [
        ("starting", "running"),
        ("running", "killed"),
        ("killed", "starting"),
        ("starting", "running"),
    ]
    assert states[-2:] == [("running", "finishing"), ("finishing", "finished")]
    assert "a broken callback" in caplog.text  # logged, and supervision went on


# -- restarts: backoff and crash loops (fake clock) ------------------------------------------------


def test_backoff_doubles_from_the_second_restart_up_to_its_cap(tpl, fork, sups):
    clock = FakeClock()
    crash = fork(1)
    sup = sv(
        sups, (crash, f"{S}:exit_now"), backoff=(0.1, 0.8), jitter=0, crash_loop=None, _clock=clock
    )
    delays = []
    for n in range(2, 8):  # the n-th exit; the first restart came without the clock moving
        st = sup.wait_until(
            lambda s, n=n: (
                s.members[0].counts["failed"] == n and s.members[0].next_start_in is not None
            ),
            timeout=T,
        )
        delays.append(round(st.members[0].next_start_in, 6))
        assert st.members[0].counts["starting"] == n  # nothing starts before the clock moves
        clock.advance(delays[-1])
    assert delays == [0.1, 0.2, 0.4, 0.8, 0.8, 0.8]
    sup.stop()


def test_jitter_scales_each_delay_within_its_bounds():
    from forkserver._supervise._policy import Policy

    low = Policy("always", (1.0, 100.0), 0.25, None, rng=lambda: 0.0)
    high = Policy("always", (1.0, 100.0), 0.25, None, rng=lambda: 0.999999)
    assert low.delay(1) == high.delay(1) == 0.0
    assert low.delay(3) == pytest.approx(2 * 0.75) and high.delay(3) == pytest.approx(
        2 * 1.25, rel=1e-5
    )


def test_a_member_that_stays_up_for_the_window_resets_the_backoff(tpl, sups):
    clock = FakeClock()
    sup = sv(
        sups,
        (tpl, f"{S}:wait_for_eof"),
        backoff=(1, 8),
        jitter=0,
        crash_loop=(10, 30),
        _clock=clock,
    )
    pid = sup.wait_state("running", timeout=T).members[0].pid
    os.kill(pid, signal.SIGKILL)  # 1st exit in a row: at once
    pid = sup.wait_until(lambda s: s.members[0].pid not in (None, pid), timeout=T).members[0].pid
    os.kill(pid, signal.SIGKILL)  # 2nd: waits 1 s
    st = sup.wait_until(lambda s: s.members[0].next_start_in is not None, timeout=T)
    assert st.members[0].next_start_in == 1
    clock.advance(1)
    pid = sup.wait_state("running", timeout=T).members[0].pid
    clock.advance(30)  # up for the whole window
    settle(sup)
    os.kill(pid, signal.SIGKILL)  # counts as a first exit again: at once
    st = sup.wait_until(
        lambda s: s.members[0].pid not in (None, pid) and s.members[0].state == "running", timeout=T
    )
    assert st.members[0].counts["killed"] == 3


def test_a_crash_loop_marks_the_slot_failed_with_the_reason(tpl, fork, sups):
    clock = FakeClock()
    crash = fork(7)
    sup = sv(
        sups, (crash, f"{S}:exit_now"), backoff=(0.5, 5), jitter=0, crash_loop=(3, 10), _clock=clock
    )
    sup.wait_until(lambda s: s.members[0].next_start_in == 0.5, timeout=T)  # 2 exits so far
    clock.advance(0.5)
    st = sup.wait_until(lambda s: s.members[0].gave_up, timeout=T)
    m = st.members[0]
    assert m.state == "failed" and m.counts["starting"] == 3 and m.next_start_in is None
    assert (
        m.reason.startswith("crash loop: 3 exits within 10 s")
        and "exited with status 7" in m.reason
    )
    with pytest.raises(MemberFailedError, match="slot 0 gave up"):
        sup.wait_state("running", timeout=T)
    clock.advance(100)
    settle(sup)
    assert sup.status().members[0].counts["starting"] == 3  # no more starts, ever
    sup.stop()


def test_exits_further_apart_than_the_window_are_no_crash_loop(tpl, sups):
    clock = FakeClock()
    sup = sv(
        sups,
        (tpl, f"{S}:wait_for_eof"),
        backoff=(0.1, 1),
        jitter=0,
        crash_loop=(2, 10),
        _clock=clock,
    )
    for n in range(1, 5):
        pid = sup.wait_state("running", timeout=T).members[0].pid
        clock.advance(11)
        settle(sup)
        os.kill(pid, signal.SIGKILL)
        sup.wait_until(lambda s, n=n: s.members[0].counts["killed"] == n, timeout=T)
    assert not sup.status().members[0].gave_up


def test_default_settings_never_make_a_hot_fork_loop(tpl, fork, sups):
    crash = fork(1)
    sup = sv(sups, (crash, f"{S}:exit_now"))  # real clock: 0, 0.1, 0.2, 0.4 s, then give up
    st = sup.wait_until(lambda s: s.members[0].gave_up, timeout=T)
    assert st.members[0].counts["starting"] == 5 and "crash loop" in st.members[0].reason
    sup.stop()


def test_a_start_that_fails_counts_separately_from_crashes(tpl, sups, tmp_path):
    prog = tmp_path / "prog"
    prog.write_text("#!/bin/sh\nexit 0\n")
    prog.chmod(0o755)
    sup = sv(sups, [str(prog)], restart="always", backoff=(0, 0), crash_loop=(3, 60))
    prog.unlink()  # it was there at Supervisor(); gone when the members start
    st = sup.wait_until(lambda s: s.members[0].gave_up, timeout=T)
    m = st.members[0]
    assert m.start_failures >= 1 and m.state == "failed" and "FileNotFoundError" in m.reason


# -- health: heartbeats and progress lines (fake clock) --------------------------------------------


def test_a_worker_that_sends_heartbeats_is_never_stale(tpl, sups):
    clock = FakeClock()
    sup = sv(sups, (tpl, f"{S}:beat"), stale_timeout=5, _clock=clock)
    pid = sup.wait_state("running", timeout=T).members[0].pid
    for _ in range(4):  # 12 s in all, more than the timeout
        clock.advance(3)
        st = sup.wait_until(lambda s: s.members[0].idle == 0, timeout=T)  # a heartbeat arrived
        assert st.members[0].pid == pid and st.members[0].state == "running"


def test_a_silent_worker_is_stopped_as_stale_and_restarted(tpl, sups):
    clock = FakeClock()
    sup = sv(sups, (tpl, f"{S}:wait_for_eof"), stale_timeout=5, _clock=clock)
    pid = sup.wait_state("running", timeout=T).members[0].pid
    clock.advance(4.9)
    settle(sup)
    assert sup.status().members[0].state == "running"
    clock.advance(0.2)
    st = sup.wait_until(
        lambda s: s.members[0].pid not in (None, pid) and s.members[0].counts["killed"], timeout=T
    )
    m = st.members[0]
    assert m.reason.startswith("stale: no heartbeat or progress for 5.1 s")
    assert m.exit_code == -signal.SIGTERM and m.restarts == 1


def progress_program(tmp_path, good: int, then: str = "junk"):
    """An ffmpeg-like program: ``good`` progress lines ending in \\r, then other lines forever."""
    path = tmp_path / "encoder.py"
    path.write_text(
        "import sys, time\n"
        f"for i in range({good}):\n"
        "    sys.stdout.write(f'frame={i} fps=25 time=00:00:{i:02d}\\r'); sys.stdout.flush()\n"
        "    time.sleep(0.01)\n"
        "while True:\n"
        f"    print({then!r}, flush=True); time.sleep(0.05)\n"
    )
    return [sys.executable, str(path)]


def test_a_program_stays_up_while_its_parser_accepts_progress_lines(tmp_path, sups):
    clock = FakeClock()
    seen = []

    def progress(line):
        seen.append(line)
        return line.startswith("frame=")

    argv = progress_program(tmp_path, 0, then="frame=1 fps=25")
    sup = sv(sups, argv, stale_timeout=5, progress=progress, _clock=clock)
    pid = sup.wait_state("running", timeout=T).members[0].pid
    for _ in range(3):
        clock.advance(3)
        st = sup.wait_until(lambda s: s.members[0].idle == 0, timeout=T)
        assert st.members[0].pid == pid
    assert seen[0] == "frame=1 fps=25"


def test_a_program_whose_lines_are_not_progress_is_stopped_as_stale(tmp_path, sups):
    clock = FakeClock()
    seen = []

    def progress(line):
        seen.append(line)
        return line.startswith("frame=")

    sup = sv(
        sups,
        progress_program(tmp_path, 3),
        stale_timeout=5,
        progress=progress,
        restart="never",
        _clock=clock,
    )
    sup.wait_until(lambda s: "junk" in seen, timeout=T)  # every progress line is in
    assert seen[:3] == [
        "frame=0 fps=25 time=00:00:00",
        "frame=1 fps=25 time=00:00:01",
        "frame=2 fps=25 time=00:00:02",
    ]  # \r ends a line, as ffmpeg uses it
    clock.advance(4)
    settle(sup)
    assert sup.status().members[0].state == "running"  # junk lines do not count, 4 s < 5 s
    clock.advance(1)
    st = sup.wait_state("killed", timeout=T)
    assert st.members[0].reason.startswith("stale") and st.members[0].gave_up


def test_a_progress_parser_that_raises_does_not_count_the_line(tmp_path, sups, caplog):
    clock = FakeClock()
    calls = []

    def progress(line):
        calls.append(line)
        return 1 / 0

    sup = sv(
        sups,
        progress_program(tmp_path, 0, then="x"),
        stale_timeout=5,
        _clock=clock,
        progress=progress,
        restart="never",
    )
    sup.wait_until(lambda s: calls, timeout=T)
    clock.advance(6)
    assert sup.wait_state("killed", timeout=T).members[0].reason.startswith("stale")
    assert "ZeroDivisionError" in caplog.text


def test_heartbeat_needs_a_socket_outside_a_supervisor_and_fails_once_it_is_gone(tpl):
    child = tpl.fork().run(f"{S}:heartbeat_outside_a_supervisor")
    assert child.wait(T) == 4
    child.close()
    child = tpl.fork().run(f"{S}:heartbeat_after_eof")
    child.control.close()
    assert child.wait(T) == 5


def test_a_supervised_member_imports_nothing_more_than_a_plain_worker(sups, tmp_path):
    def modules(path):
        with open(path) as f:
            return set(f.read().split())

    fresh = Template().require(S)
    plain = fresh.fork().send_arg(str(tmp_path / "plain")).run(f"{S}:write_modules")
    assert plain.wait(T) == 0
    plain.close()
    member = fresh.fork().send_arg(str(tmp_path / "member"))
    sup = sv(sups, (member, f"{S}:write_modules"), restart="never")
    sup.wait_state("finished", timeout=T)
    added = modules(tmp_path / "member") - modules(tmp_path / "plain")
    # The worker-side module came with forkserver.worker, which tests._supervised imports:
    # a supervised member has nothing more than a plain worker of the same template.
    assert "forkserver._supervise._member_worker" in modules(tmp_path / "plain")
    assert added == set()
    sup.stop()
    member.close()
    fresh.close()


# -- resize, reload, stop --------------------------------------------------------------------------


def test_resize_grows_and_shrinks_with_the_stop_ladder(tpl, sups):
    sup = sv(sups, (tpl, f"{S}:wait_for_eof"), size=2)
    first = sup.wait_state("running", timeout=T).pids
    st = sup.resize(4)
    assert st.size == 4 and st.count("running") == 4 and set(first) < set(st.pids)
    grown = st.pids
    st = sup.resize(1)
    assert st.size == 1 and len(st.members) == 1 and st.pids == (first[0],)
    for pid in grown[1:]:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    st = sup.resize(0)
    assert st.members == () and st.pids == ()
    assert sup.resize(2).count("running") == 2


def test_resize_restarts_nothing_it_removed(tpl, sups):
    exits = []
    sup = sv(sups, (tpl, f"{S}:wait_for_eof"), size=3, on_exit=lambda m: exits.append(m))
    sup.wait_state("running", timeout=T)
    sup.resize(1)
    assert sorted(m.slot for m in exits) == [1, 2]
    assert all(m.state == "finished" and m.reason == "removed by resize()" for m in exits)
    assert sup.status().members[0].restarts == 0


def test_reload_replaces_each_member_only_once_its_successor_runs(tpl, sups):
    log = []
    holder = {}

    def record(kind):
        def callback(m, *rest):
            st = holder["sup"].status()  # consistent: callbacks run between the loop's turns
            log.append(
                (kind, m.slot, m.pid, m.generation, st.count("running"), m.state, m.exit_code)
            )

        return callback

    sup = sv(
        sups,
        (tpl, f"{S}:wait_for_eof"),
        size=3,
        on_start=record("start"),
        on_exit=record("exit"),
        on_state_change=record("state"),
    )
    holder["sup"] = sup
    old = sup.wait_state("running", timeout=T).pids
    new_tpl = Template().require(S)
    log.clear()
    st = sup.reload(new_tpl)
    assert st.generation == 1 and st.reloads == 1 and st.retiring == ()
    assert all(m.generation == 1 and m.state == "running" for m in st.members)
    assert not set(st.pids) & set(old)
    assert [e for e in log if e[0] == "state"] == []  # no slot ever left "running"
    assert all(e[4] == 3 for e in log)  # three running at every step
    for slot in range(3):  # the successor started before its predecessor ended
        order = [e[0] for e in log if e[1] == slot]
        assert order == ["start", "exit"], order
    exits = [e for e in log if e[0] == "exit"]
    assert {e[2] for e in exits} == set(old)  # the old members, each ended as asked
    assert all(e[3] == 0 and e[5] == "finished" and e[6] == -signal.SIGTERM for e in exits)
    sup.stop()
    new_tpl.close()


def test_a_reload_whose_new_members_cannot_start_rolls_back(tmp_path, sups):
    def prog(name):
        path = tmp_path / name
        path.write_text("#!/bin/sh\nexec sleep 600\n")
        path.chmod(0o755)
        return str(path)

    old, new = prog("old"), prog("new")

    def lose_new(m):
        if m.generation == 1 and os.path.exists(new):
            os.unlink(new)  # the next new member cannot exec

    sup = sv(sups, [old], size=3, on_start=lose_new)
    before = sup.wait_state("running", timeout=T)
    with pytest.raises(ReloadError) as err:
        sup.reload([new])
    assert isinstance(err.value.__cause__, FileNotFoundError)
    st = sup.status()
    assert st.generation == 0 and all(
        m.generation == 0 and m.state == "running" for m in st.members
    )
    assert st.members[0].pid != before.members[0].pid  # replaced, then replaced back
    assert st.members[1:] and [m.pid for m in st.members[1:]] == [m.pid for m in before.members[1:]]


def test_a_reload_onto_a_target_that_does_not_import_raises_at_once(tpl, sups):
    sup = sv(sups, (tpl, f"{S}:wait_for_eof"), size=2)
    pids = sup.wait_state("running", timeout=T).pids
    with pytest.raises(ModuleNotFoundError):
        sup.reload((tpl, "tests.no_such_module:serve"))
    assert sup.status().pids == pids


def test_reload_gives_a_failed_slot_another_chance(tpl, fork, sups):
    crash = fork(1)
    sup = sv(sups, (crash, f"{S}:exit_now"), backoff=(0, 0), crash_loop=(2, 60))
    sup.wait_until(lambda s: s.members[0].gave_up, timeout=T)
    st = sup.reload((tpl, f"{S}:wait_for_eof"))
    assert st.members[0].state == "running" and st.members[0].generation == 1


def test_stop_escalates_to_sigkill_after_the_grace(tpl, sups):
    sup = sv(sups, (tpl, f"{S}:ignore_sigterm"), size=2, grace=0.2)
    sup.wait_until(lambda s: all(m.up for m in s.members), timeout=T)
    st = sup.stop()
    assert st.state == "stopped"
    for m in st.members:
        assert m.state == "killed" and m.exit_code == -signal.SIGKILL
        assert "still running 0.2 s after SIGTERM: SIGKILLed" in m.reason


def test_stop_is_idempotent_and_the_stopped_supervisor_refuses_work(tpl, sups):
    sup = sv(sups, (tpl, f"{S}:wait_for_eof"), size=2)
    sup.wait_state("running", timeout=T)
    st = sup.stop()
    assert [m.state for m in st.members] == ["finished", "finished"]
    assert sup.stop().state == "stopped"
    with pytest.raises(ClosedError):
        sup.resize(3)
    with pytest.raises(ClosedError):
        sup.wait_state("running", timeout=T)


def test_with_block_stops_the_members(tpl):
    with Supervisor((tpl, f"{S}:wait_for_eof"), size=2) as sup:
        pids = sup.wait_state("running", timeout=T).pids
    assert sup.status().state == "stopped"
    assert not any(psutil.pid_exists(p) for p in pids)


def test_a_supervisor_left_running_is_stopped_at_interpreter_exit(tmp_path):
    import subprocess

    script = (
        "import forkserver\n"
        f"t = forkserver.Template().require({S!r})\n"
        f"sup = forkserver.Supervisor((t, '{S}:pause_forever'), size=3)\n"
        "print(*sup.wait_state('running', timeout=30).pids, flush=True)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=T, cwd=root
    )
    assert done.returncode == 0, done.stderr
    pids = [int(p) for p in done.stdout.split()]
    assert len(pids) == 3
    # Deaf to the EOF of their control sockets: gone only because they were stopped.
    assert not any(psutil.pid_exists(p) for p in pids)


def test_two_hundred_restarts_leave_no_zombie_and_no_fd(tpl, fork, sups):
    quick = fork(0)
    sup = sv(sups, (quick, f"{S}:exit_now"), size=2, backoff=(0, 0), crash_loop=None)
    sup.wait_until(lambda s: sum(m.restarts for m in s.members) >= 200, timeout=120)
    zombies = []
    for p in psutil.Process().children():
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                zombies.append(p)
        except psutil.NoSuchProcess:
            pass  # reaped meanwhile
    assert len(zombies) <= 2  # at most the two that just exited, not yet reaped
    sup.stop()


def test_two_hundred_program_restarts_leave_no_zombie_and_no_fd(tmp_path, sups):
    clock = FakeClock()  # restart at once, no backoff in real time; lines read and closed each time
    sup = sv(
        sups,
        [sys.executable, "-c", "print('frame=1')"],
        backoff=(0, 0),
        crash_loop=None,
        progress=lambda line: True,
        _clock=clock,
    )
    sup.wait_until(lambda s: s.members[0].restarts >= 200, timeout=120)
    sup.stop()


# -- asyncio ---------------------------------------------------------------------------------------


def test_asyncio_waits_and_requests_do_not_block_the_loop(tpl, sups):
    sup = sv(sups, (tpl, f"{S}:ignore_sigterm"), size=1, grace=0.5)

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.ensure_future(ticker())
        await sup.await_until(lambda s: s.members[0].up, timeout=T)
        st = await sup.aresize(2)
        assert st.count("running") == 2
        await sup.await_state("running", count=2, timeout=T)
        with pytest.raises(TimeoutError):
            await sup.await_state("failed", timeout=0.05)
        before = ticks
        st = await sup.areload(tpl)  # the old members ignore SIGTERM: each is SIGKILLed
        assert st.generation == 1 and [m.generation for m in st.members] == [1, 1]
        reload_ticks = ticks - before
        await sup.await_until(lambda s: all(m.up for m in s.members), timeout=T)
        before = ticks
        st = await sup.astop()  # member 0 ignores SIGTERM: 0.5 s of grace, then SIGKILL
        task.cancel()
        return st, reload_ticks, ticks - before

    st, reload_ticks, stop_ticks = asyncio.run(main())
    assert st.state == "stopped" and [m.state for m in st.members] == ["killed", "killed"]
    assert reload_ticks >= 5 and stop_ticks >= 5  # the loop ran while they waited


def test_many_threads_may_call_one_supervisor_at_once(tpl, sups):
    sup = sv(sups, (tpl, f"{S}:wait_for_eof"), size=1)
    errors = []

    def hammer(k):
        try:
            for i in range(5):
                sup.resize(1 + (k + i) % 3, timeout=T)
                assert sup.status().state == "running"
                sup.wait_state("running", slot=0, timeout=T)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(T)
    assert not errors
    st = sup.resize(2)
    assert st.count("running") == 2 and len(st.members) == 2


def test_a_member_that_outlives_sigkill_is_left_to_the_reaper(tpl, sups, monkeypatch):
    from forkserver._reaper import reaper
    from forkserver._supervise._member import KILL_WAIT, Proc

    real_signal = Proc.signal
    monkeypatch.setattr(
        Proc, "signal", lambda self, sig: sig != signal.SIGKILL and real_signal(self, sig)
    )
    clock = FakeClock()  # SIGKILL never arrives: as for a process stuck in the kernel
    sup = sv(sups, (tpl, f"{S}:deaf"), grace=1, _clock=clock)
    pid = sup.wait_until(lambda s: s.members[0].up, timeout=T).members[0].pid
    done = []
    stopper = threading.Thread(target=lambda: done.append(sup.stop()))
    stopper.start()
    sup.wait_state("finishing", timeout=T)
    clock.advance(1)  # the grace: "SIGKILL"
    settle(sup)
    assert not done
    clock.advance(KILL_WAIT)
    stopper.join(T)
    m = done[0].members[0]
    assert m.state == "killed" and m.reason.endswith("still not gone 5 s after SIGKILL")
    assert psutil.pid_exists(pid) and reaper.pending() >= 1  # handed over, not forgotten
    os.kill(pid, signal.SIGKILL)  # no_leaks waits for the reaper to reap it


def test_a_member_reaped_by_someone_elses_waitpid_is_replaced_and_its_pidfd_closed(tpl, sups):
    sup = sv(sups, (tpl, f"{S}:wait_for_eof"))
    pid = sup.wait_state("running", timeout=T).members[0].pid
    with sup._engine.cond:  # the supervising thread cannot handle the exit meanwhile
        os.kill(pid, signal.SIGKILL)
        assert os.waitpid(pid, 0)[0] == pid  # the application's own waitpid wins the race
    st = sup.wait_until(lambda s: s.members[0].pid not in (None, pid), timeout=T)
    assert st.members[0].counts["failed"] == 1 and "reaped by someone else" in st.members[0].reason


def test_a_failure_of_the_supervising_thread_kills_its_members_and_says_so(tpl, sups, caplog):
    from forkserver import BrokenSupervisorError
    from forkserver._supervise._engine import Engine

    sup = sv(sups, (tpl, f"{S}:wait_for_eof"), size=2)
    pids = sup.wait_state("running", timeout=T).pids

    def broken(self, now):
        raise ZeroDivisionError("a bug")

    sup._engine._timers = broken.__get__(sup._engine, Engine)
    sup._engine.wake()
    with pytest.raises(BrokenSupervisorError, match="ZeroDivisionError: a bug"):
        sup.wait_state("failed", timeout=T)
    st = sup.status()
    assert st.state == "broken" and st.pids == () and "a bug" in st.error
    with pytest.raises(BrokenSupervisorError):
        sup.resize(3)
    assert sup.stop().state == "broken"
    from forkserver._reaper import reaper

    assert reaper.wait_idle(T)  # SIGKILLed and handed to the reaper thread, which reaped them
    assert not any(psutil.pid_exists(pid) for pid in pids)
    assert "the supervising thread failed" in caplog.text


def test_a_cancelled_await_leaves_the_supervisor_consistent(tpl, sups):
    sup = sv(sups, (tpl, f"{S}:wait_for_eof"), size=1)

    async def main():
        task = asyncio.ensure_future(sup.aresize(3))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    st = sup.wait_state("running", count=3, timeout=T)  # the resize went on
    assert st.size == 3


# -- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(restart="sometimes"), ValueError, "restart="),
        (dict(backoff=(5, 1)), ValueError, "first delay <= longest"),
        (dict(backoff=3), TypeError, "backoff="),
        (dict(jitter=1.5), ValueError, "jitter="),
        (dict(crash_loop=(0, 1)), ValueError, "crash_loop="),
        (dict(stale_timeout=0), ValueError, "stale_timeout="),
        (dict(limits={"cpu": 1}), TypeError, "forkserver.Limits"),
        (dict(stop_signals=(signal.SIGKILL,)), ValueError, "SIGKILL always comes last"),
        (dict(stop_signals=("TERM",)), ValueError, "not a signal"),
        (dict(grace=-1), ValueError, "grace="),
        (dict(size=-1), ValueError, "size must be"),
        (dict(on_exit="print"), TypeError, "on_exit="),
        (dict(progress=print), TypeError, "heartbeat"),
    ],
)
def test_bad_arguments_raise_clear_errors(tpl, kwargs, error, words):
    with pytest.raises(error, match=words):
        Supervisor((tpl, f"{S}:wait_for_eof"), **kwargs)


@pytest.mark.parametrize(
    "start, error, words",
    [
        ("sleep 10", TypeError, "a program is a list"),
        (["/no/such/program"], FileNotFoundError, "no program"),
        (["no-such-program-here"], FileNotFoundError, "on PATH"),
        (42, TypeError, "expected"),
    ],
)
def test_bad_starts_raise_clear_errors(start, error, words):
    with pytest.raises(error, match=words):
        Supervisor(start)


def test_a_template_alone_or_a_missing_target_is_refused(tpl):
    with pytest.raises(TypeError, match="say what the members run"):
        Supervisor(tpl)
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        Supervisor((tpl, f"{S}:nope"))
    with pytest.raises(ModuleNotFoundError):
        Supervisor((tpl, "tests.no_such_module:serve"))


def test_limits_check_their_values():
    for kwargs, words in [
        (dict(cpu=0), "CPU share"),
        (dict(memory=1.5), "bytes"),
        (dict(duration=-1), "duration"),
        (dict(mode="pause"), "mode"),
        (dict(mode="throttle", memory=10), "give cpu"),
    ]:
        with pytest.raises(ValueError, match=words):
            Limits(**kwargs)


def test_wait_state_checks_its_arguments(tpl, sups):
    sup = sv(sups, (tpl, f"{S}:wait_for_eof"))
    with pytest.raises(ValueError, match="one of starting"):
        sup.wait_state("asleep")
    with pytest.raises(IndexError, match="has 1 slots"):
        sup.wait_state("running", slot=3, timeout=T)
    with pytest.raises(TimeoutError, match="slots 0: running"):
        sup.wait_state("failed", timeout=0.05)


def test_public_names_are_exported():
    for name in (
        "Supervisor",
        "Limits",
        "SupervisorStatus",
        "MemberStatus",
        "ReloadError",
        "MemberFailedError",
        "BrokenSupervisorError",
    ):
        assert name in forkserver.__all__ and getattr(forkserver, name)
    from forkserver.worker import heartbeat

    assert callable(heartbeat)
