"""The spare clone: a forked template keeps one clone ready for its next fork()."""
from __future__ import annotations

import contextlib
import os
import signal

import psutil
import pytest

import forkserver
from forkserver import Template
from forkserver._wait import wait_readable

from ._workers import recv_obj
from .conftest import children_but_default

pytestmark = pytest.mark.usefixtures("no_leaks")

W = "tests._workers"


def our_children():
    return {p.pid for p in psutil.Process().children()}


def ours():
    """Our children, minus the shared default template and its spare (never blocks on ours)."""
    return children_but_default()


def talk(child):
    """The one object the worker sends, and its exit status."""
    child.control.setblocking(True)
    child.control.settimeout(20)
    try:
        return recv_obj(child.control), child.wait(20)
    finally:
        child.control.close()


def test_after_its_first_fork_a_template_keeps_one_clone_that_the_next_fork_uses():
    with Template().require(W) as tpl:
        before = ours()
        first = tpl.fork().run(f"{W}:return_quietly")
        assert first.wait(20) == 0
        first.control.close()
        spare_pid = tpl._spare.pid  # made in the background: wait for its greeting
        assert ours() - before == {spare_pid}, "one clone is kept ready, no more"
        second = tpl.fork().send_arg("x").run(f"{W}:echo_args")
        assert second.pid == spare_pid
        assert talk(second) == (("x",), 0)
        new_spare = tpl._spare.pid  # waits for its greeting
        assert ours() - before == {new_spare} != {spare_pid}, "a new one replaces it"


def _ignores_sigint(pid):
    with open(f"/proc/{pid}/status") as f:
        mask = next(line for line in f if line.startswith("SigIgn:")).split()[1]
    return bool(int(mask, 16) & (1 << (signal.SIGINT - 1)))


def test_an_idle_spare_stays_a_template_and_its_worker_gets_ctrl_c_and_its_name():
    with Template().require(W) as tpl:
        first = tpl.fork().run(f"{W}:return_quietly")
        assert first.wait(20) == 0
        first.control.close()
        spare = tpl._spare
        spare.eval("pass")  # answered after the spare's idle-time rehearsal of a worker start
        assert psutil.Process(spare.pid).name() == "fs:template"
        assert _ignores_sigint(spare.pid), "a template must survive Ctrl-C in the terminal"
        got, code = talk(tpl.fork().run(f"{W}:report"))
        assert got["pid"] == spare.pid and code == 0
        assert got["comm"] == "fs:report" and got["sigint"] is True


def _ready_spare(tpl, read_greeting=True):
    """Fork and reap one worker, then (by default) wait until its replacement greeted us."""
    first = tpl.fork().run(f"{W}:return_quietly")
    assert first.wait(20) == 0
    first.control.close()
    if read_greeting:
        tpl._spare.pid  # reads its greeting: it is ready
    return tpl._spare


def test_the_first_fork_has_its_spare_made_while_the_worker_runs():
    with Template().require(W) as tpl:
        child = tpl.fork().run(f"{W}:wait_for_eof")
        assert tpl._spare.pid in ours()  # it greeted us
        assert child.poll() is None
        child.control.close()
        assert child.wait(20) == 0


def test_after_using_a_ready_spare_the_next_is_made_once_the_worker_has_exited():
    with Template().require(W) as tpl:
        spare = _ready_spare(tpl)
        child = tpl.fork().run(f"{W}:wait_for_eof")
        assert child.pid == spare.pid
        assert ours() == {tpl.pid, child.pid}, "no clone competes with the worker"
        child.control.close()
        assert child.wait(20) == 0
        spare_pid = tpl._spare.pid  # made now: it greets us
        assert ours() == {tpl.pid, spare_pid}
        assert talk(tpl.fork().send_arg(1).run(f"{W}:echo_args")) == ((1,), 0)


def test_before_linux_6_9_the_next_spare_is_made_once_the_worker_has_exited():
    # Older kernels do not wake pidfd pollers at the reap: the template waits for the exit.
    with Template().require(W) as tpl:
        tpl.eval("import forkserver._server._fork as fork; fork._HUP_ON_REAP = False")
        spare = _ready_spare(tpl)
        child = tpl.fork().run(f"{W}:wait_for_eof")
        assert child.pid == spare.pid
        assert ours() == {tpl.pid, child.pid}, "no clone competes with the worker"
        child.control.close()
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped
        spare_pid = tpl._spare.pid  # made after the exit, before the reap
        assert child.poll() == 0
        assert ours() == {tpl.pid, spare_pid}


@contextlib.contextmanager
def _next_spare_waiting():
    """(a template, its running worker): the template's next spare waits for that worker."""
    with Template().require(W) as tpl:
        _ready_spare(tpl)
        child = tpl.fork().run(f"{W}:wait_for_eof")
        yield tpl, child
        child.control.close()
        assert child.wait(20) == 0


def test_a_fork_while_the_next_spare_waits_for_a_running_worker_gets_it_at_once():
    with _next_spare_waiting() as (tpl, first):
        assert talk(tpl.fork().send_arg(2).run(f"{W}:echo_args")) == ((2,), 0)
        assert first.poll() is None


def test_a_template_changed_while_its_next_spare_waits_makes_no_clone():
    with _next_spare_waiting() as (tpl, child):
        tpl.send_arg("new").require("json")  # drops the spare it had asked for
        assert ours() == {tpl.pid, child.pid}
        assert talk(tpl.fork().run(f"{W}:echo_args")) == (("new",), 0)


def test_the_pid_of_a_fork_is_known_while_the_next_spare_waits_for_a_running_worker():
    with _next_spare_waiting() as (tpl, child):
        clone = tpl.fork()
        assert clone.pid in ours()  # must not wait for the worker to end
        assert child.poll() is None
        clone.close()


def test_a_program_spawned_while_the_next_spare_waits_does_not_make_it_early():
    with _next_spare_waiting() as (tpl, child):
        assert forkserver.spawn(["true"], template=tpl).wait(20) == 0  # SPAWN leaves the template as it is
        assert ours() == {tpl.pid, child.pid}, "the spare still waits for the worker"


def test_closing_a_template_whose_next_spare_waits_for_a_running_worker_ends_at_once():
    tpl = Template().require(W)
    _ready_spare(tpl)
    child = tpl.fork().run(f"{W}:wait_for_eof")
    tpl.close()  # must not wait for a greeting that would come only after the worker's exit
    assert ours() == {child.pid}
    child.control.close()
    assert child.wait(20) == 0


def test_when_forks_come_faster_than_spares_the_next_is_made_while_the_worker_runs(monkeypatch):
    from forkserver import _cloning

    monkeypatch.setattr(_cloning, "_greeted", lambda tpl: False)  # never greeted yet
    with Template().require(W) as tpl:
        spare = _ready_spare(tpl, read_greeting=False)
        child = tpl.fork().run(f"{W}:wait_for_eof")
        assert tpl._spare is not spare, "it was taken"
        assert tpl._spare.pid in ours() and child.poll() is None
        child.control.close()
        assert child.wait(20) == 0


def test_a_failed_run_on_a_spare_has_the_next_spare_made_at_once():
    with Template().require(W) as tpl:
        _ready_spare(tpl)
        with pytest.raises(AttributeError, match="no_such"):
            tpl.fork().run(f"{W}:no_such")
        assert tpl._spare.pid in ours()
        assert talk(tpl.fork().send_arg(2).run(f"{W}:echo_args")) == ((2,), 0)


def test_a_spare_is_never_used_after_the_template_changed():
    with Template().require(W).send_arg("old") as tpl:
        assert talk(tpl.fork().run(f"{W}:echo_args")) == (("old",), 0)
        tpl.send_arg("new")
        assert talk(tpl.fork().run(f"{W}:echo_args")) == (("old", "new"), 0)
        tpl.eval("import tests._workers as w; w.MARK = 'evaluated'")
        assert talk(tpl.fork().send_arg(1).run(f"{W}:echo_args")) == (("old", "new", 1), 0)
        got, code = talk(tpl.fork().run(f"{W}:mark"))
        assert (got, code) == ("evaluated", 0)


def test_spare_false_keeps_no_clone_ready():
    with Template(spare=False).require(W) as tpl:
        before = our_children()
        for _ in range(3):
            child = tpl.fork().run(f"{W}:return_quietly")
            assert child.wait(20) == 0
            child.control.close()
            assert our_children() == before
        grand = tpl.fork()  # forks inherit the setting
        grand.require("json")
        assert talk(grand.fork().send_arg(2).run(f"{W}:echo_args")) == ((2,), 0)
        assert our_children() - before == {grand.pid}
        grand.close()


def test_closing_a_template_ends_and_reaps_its_spare():
    tpl = Template().require(W)
    child = tpl.fork().run(f"{W}:return_quietly")
    child.wait(20)
    child.control.close()
    spare = tpl._spare
    assert spare is not None and spare.pid in our_children()
    tpl.close()
    assert not psutil.pid_exists(spare.pid)


def test_a_killed_spare_is_replaced_and_the_next_fork_still_runs():
    with Template().require(W) as tpl:
        child = tpl.fork().run(f"{W}:return_quietly")
        child.wait(20)
        child.control.close()
        spare_pid = tpl._spare.pid
        os.kill(spare_pid, signal.SIGKILL)
        pidfd = os.pidfd_open(spare_pid)
        try:
            assert wait_readable(pidfd, 20)  # dead (a zombie until the reaper reaps it)
        finally:
            os.close(pidfd)
        child = tpl.fork().send_arg(7).run(f"{W}:echo_args")
        assert child.pid != spare_pid
        assert talk(child) == ((7,), 0)


def test_a_dead_spare_reaped_by_a_waitpid_of_ours_is_replaced_and_the_next_fork_runs():
    with Template().require(W) as tpl:
        spare = _ready_spare(tpl)
        os.kill(spare.pid, signal.SIGKILL)
        os.waitpid(spare.pid, 0)  # as a waitpid(-1) loop of the application would
        assert talk(tpl.fork().send_arg(3).run(f"{W}:echo_args")) == ((3,), 0)


def test_a_bad_target_sent_to_a_spare_raises_and_the_clone_is_reaped():
    with Template().require(W) as tpl:
        assert talk(tpl.fork().send_arg(0).run(f"{W}:echo_args")) == ((0,), 0)
        with pytest.raises(AttributeError, match="no_such"):
            tpl.fork().send_arg(1).run(f"{W}:no_such")
        assert talk(tpl.fork().send_arg(2).run(f"{W}:echo_args")) == ((2,), 0)


def test_a_template_that_cannot_fork_raises_on_every_fork_and_leaves_nothing_behind():
    from forkserver import ThreadedTemplateError

    with Template().require("tests._threaded_mod", W) as tpl:
        before = our_children()
        for _ in range(3):  # the first fork fails, then the spares asked for fail too
            with pytest.raises(ThreadedTemplateError, match="import-time-poller"):
                tpl.fork().run(f"{W}:return_quietly")
        assert our_children() == before


def test_spawning_a_program_from_a_template_keeps_its_spare():
    with Template().require(W) as tpl:
        assert talk(tpl.fork().send_arg(0).run(f"{W}:echo_args")) == ((0,), 0)
        spare_pid = tpl._spare.pid
        assert forkserver.spawn(["true"], template=tpl).wait(20) == 0
        assert tpl._spare is not None and tpl._spare.pid == spare_pid
        child = tpl.fork().send_arg(1).run(f"{W}:echo_args")
        assert child.pid == spare_pid
        assert talk(child) == ((1,), 0)


@pytest.mark.parametrize("spare", [True, False])
def test_a_big_send_arg_still_queued_reaches_the_template_before_the_next_fork(spare):
    # 64 MiB does not fit in the socket buffer: it is queued here, and the
    # fork's clone greets us on another socket, so nothing else would flush it.
    with Template(spare=spare).require(W) as tpl:
        tpl.send_arg(b"x" * (64 << 20))
        assert talk(tpl.fork().send_arg(b"y").run(f"{W}:arg_sizes")) == ([64 << 20, 1], 0)
        assert talk(tpl.fork().run(f"{W}:arg_sizes")) == ([64 << 20], 0)


def test_8_threads_forking_one_template_at_once_each_get_their_own_clone():
    import threading

    results, errors = {}, []
    with Template().require(W).send_arg("base") as tpl:

        def work(n):
            try:
                for k in range(25):
                    got, code = talk(tpl.fork().send_arg(n, k).run(f"{W}:echo_args"))
                    assert code == 0
                    results[(n, k)] = got
            except BaseException as exc:  # collected and asserted below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads), "deadlock: a thread never finished"
    assert not errors, errors[0]
    assert results == {(n, k): ("base", n, k) for n in range(8) for k in range(25)}
