"""Issue 11: no lost pid, no zombie, no reply out of step -- one test per numbered item.

Each test here failed before the fix (checked against the base commit): the
item it guards is in its name.  The systematic versions -- an interrupt at
every line of every call -- are in test_interrupts.py; the kill storm is in
test_storm.py; protocol fuzzing in test_fuzz.py.
"""
from __future__ import annotations

import asyncio
import gc
import json
import os
import resource
import signal
import subprocess
import sys

import psutil
import pytest

import forkserver
import forkserver.aio as aio
from forkserver import BrokenTemplateError, Template
from forkserver._reaper import reaper

from ._workers import recv_obj

pytestmark = pytest.mark.usefixtures("no_leaks")

W = "tests._workers"


def _zombies():
    return [p.pid for p in psutil.Process().children() if p.status() == psutil.STATUS_ZOMBIE]


def _in_step(tpl):
    """The template answers in step: its own error, then its own result."""
    with pytest.raises(ZeroDivisionError):
        tpl.eval("1/0")
    tpl.eval("x = 41")
    tpl.eval("assert x == 41")


# -- 1. pids the parent never learned ----------------------------------------------


def test_item1_a_clone_killed_before_its_greeting_is_reaped():
    with Template(spare=False) as tpl:
        tpl.eval("import os; os.register_at_fork(after_in_child=lambda: os.kill(os.getpid(), 9))")
        with pytest.raises(BrokenTemplateError):
            tpl.fork().pid
        assert reaper.wait_idle(10)
        assert _zombies() == []
        tpl.eval("x = 1")  # the template itself is fine


def test_item1_a_program_whose_template_died_before_the_spawn_reply_is_killed_and_reaped():
    with Template() as tpl:
        # The template dies right after starting the program, before it replies.
        tpl.eval("import os, forkserver._server._exec as e; e._write_all = lambda fd, data: os.kill(os.getpid(), 9)")
        with pytest.raises(BrokenTemplateError):
            forkserver.spawn(["sleep", "30"], template=tpl)
    assert reaper.wait_idle(10)
    assert _zombies() == []


# -- 2. the reaper survives anything ----------------------------------------------------


def test_item2_a_template_in_a_reference_cycle_with_an_ungreeted_spare_is_reaped():
    errors = getattr(reaper, "errors", 0)
    tpl = Template().require(W)
    first = tpl.fork().run(f"{W}:return_quietly")
    assert first.wait(20) == 0
    first.control.close()
    tpl._spare.pid  # it greeted: the next spare is asked for "after" the next worker
    child = tpl.fork().run(f"{W}:wait_for_eof")  # the next spare waits for this one's exit
    tpl.cycle = tpl  # any stored traceback makes such a cycle
    del tpl
    gc.collect()
    child.control.close()
    assert child.wait(20) == 0
    assert reaper.wait_idle(10) and getattr(reaper, "errors", 0) == errors
    assert _zombies() == []
    tpl2 = Template().require(W)
    tpl2.fork().run(f"{W}:return_quietly").control.close()  # dropped: the reaper still works
    del tpl2
    gc.collect()
    assert reaper.wait_idle(10)


class _BadEntry:
    kill_at = None

    def fileno(self):
        return -1

    def step(self):
        raise RuntimeError("a broken entry")

    def drop(self):
        raise RuntimeError("and it cannot even be dropped")


def test_item2_an_entry_that_fails_is_dropped_and_the_reaper_goes_on():
    errors = reaper.errors
    reaper._hand(_BadEntry())
    with Template().require(W) as tpl:
        # dropped while it runs (its control closed, so it ends): the thread must reap it
        tpl.fork().run(f"{W}:wait_for_eof").control.close()
        gc.collect()
        assert reaper.wait_idle(10)
    assert reaper.errors == errors + 1


def test_item2_an_error_in_the_reaper_loop_does_not_end_it(monkeypatch):
    real = type(reaper)._round
    failures = []

    def flaky(self):
        if len(failures) < 2:
            failures.append(1)
            raise OSError("poll failed")
        return real(self)

    monkeypatch.setattr(type(reaper), "_round", flaky)
    with Template().require(W) as tpl:
        # dropped while it runs (its control closed, so it ends): the thread must reap it
        tpl.fork().run(f"{W}:wait_for_eof").control.close()
        gc.collect()
        assert reaper.wait_idle(10)
    assert len(failures) == 2


# -- 3. KeyboardInterrupt must not shift replies ----------------------------------------


def test_item3_ctrl_c_during_eval_leaves_replies_in_step():
    with Template() as tpl:
        with pytest.raises(KeyboardInterrupt):
            tpl.eval("import os, signal, time; os.kill(os.getppid(), signal.SIGINT); time.sleep(0.3)")
        _in_step(tpl)


def test_item3_a_cancelled_aio_eval_leaves_replies_in_step():
    async def main(tpl):
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(
            aio.eval(tpl, "import os, signal, time; os.kill(os.getppid(), signal.SIGUSR1); time.sleep(0.3)")
        )
        loop.add_signal_handler(signal.SIGUSR1, task.cancel)
        try:
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            loop.remove_signal_handler(signal.SIGUSR1)
        with pytest.raises(ZeroDivisionError):
            await aio.eval(tpl, "1/0")
        await aio.eval(tpl, "x = 41")

    with Template() as tpl:
        asyncio.run(main(tpl))
        _in_step(tpl)


# -- 4. KeyboardInterrupt elsewhere -----------------------------------------------------


def test_item4_ctrl_c_while_the_target_imports_kills_and_reaps_the_worker(monkeypatch):
    monkeypatch.setenv("FORKSERVER_TEST_PARENT", str(os.getpid()))
    with Template(spare=False).require(W) as tpl:
        with pytest.raises(KeyboardInterrupt):
            tpl.fork().run("tests._interrupting:wait_for_eof")
        assert reaper.wait_idle(10)
        assert _zombies() == []
        child = tpl.fork().run(f"{W}:return_quietly")  # the template goes on
        assert child.wait(20) == 0
        child.control.close()


def test_item4_ctrl_c_while_a_spare_imports_the_target_kills_and_reaps_the_worker(monkeypatch):
    monkeypatch.setenv("FORKSERVER_TEST_PARENT", str(os.getpid()))
    with Template().require(W) as tpl:
        first = tpl.fork().run(f"{W}:return_quietly")
        assert first.wait(20) == 0
        first.control.close()
        with pytest.raises(KeyboardInterrupt):
            tpl.fork().run("tests._interrupting:wait_for_eof")  # on the spare
        assert reaper.wait_idle(10)
        assert _zombies() == []


def test_item4_ctrl_c_during_close_still_closes_and_reaps(monkeypatch):
    from forkserver._link import Link

    from ._workers import InterruptWhenReleased

    monkeypatch.setenv("FORKSERVER_TEST_PARENT", str(os.getpid()))
    r, w = os.pipe()
    tpl = Template().require(W)
    # A pipelined argument whose unpickling in the template waits for a byte on
    # the pipe, then Ctrl-C's us and keeps the template busy; the byte is
    # written as close() begins ending the process, which close() then waits
    # for, and is interrupted there.
    tpl.send_fh(r).send_arg(InterruptWhenReleased(r, 0.5))
    os.close(r)
    real = Link._end_process

    def release_then_end(self, waited):
        if self is tpl:
            os.write(w, b"x")
        return real(self, waited)

    monkeypatch.setattr(Link, "_end_process", release_then_end)
    try:
        with pytest.raises(KeyboardInterrupt):
            tpl.close()
    finally:
        os.close(w)
    assert "closed" in repr(tpl)
    tpl.close()  # nothing left to do
    assert reaper.wait_idle(20)


# -- 5. EMFILE after the worker started must not lose it ----------------------------------


def _limit_leaving(room):
    """An RLIMIT_NOFILE that leaves exactly ``room`` free descriptor slots (fds go lowest first)."""
    used = {int(n) for n in os.listdir("/proc/self/fd")}
    used = {fd for fd in used if _is_open(fd)}
    free = (fd for fd in range(1 << 20) if fd not in used)
    for _ in range(room):
        next(free)
    return next(free)


def _is_open(fd):
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.mark.parametrize("room", [0, 1, 2, 3])
def test_item5_a_spare_that_cannot_be_made_does_not_fail_the_run(room):
    with Template().require(W) as tpl:
        first = tpl.fork().run(f"{W}:return_quietly")
        assert first.wait(20) == 0
        first.control.close()
        tpl._spare.pid  # its pidfd is open: the run itself needs no new fd
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (_limit_leaving(room), hard))
        try:
            child = tpl.fork().send_arg(7).run(f"{W}:exit_with")
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert child.wait(20) == 7  # the worker and its exit status are ours
        child.control.close()
        second = tpl.fork().run(f"{W}:return_quietly")  # the spare is made again
        assert second.wait(20) == 0
        second.control.close()


# -- 6. the sentinel reserve never starves a template -------------------------------------


def _report_table(tpl):
    """(free descriptor slots, sentinels held) in the template, after its last receive."""
    child = tpl.fork().run(f"{W}:report_fd_table")
    got = recv_obj_blocking(child)
    assert child.wait(20) == 0
    child.control.close()
    return got


def recv_obj_blocking(child):
    child.control.setblocking(True)
    child.control.settimeout(20)
    return recv_obj(child.control)


def test_item6_a_template_sent_most_of_its_fd_table_can_still_eval_and_fork():
    pipes = [os.pipe() for _ in range(500)]
    fds = [fd for pair in pipes for fd in pair]
    try:
        with Template(spare=False).require(W) as tpl:
            tpl.eval(_LIMIT_TO, len(fds) + 100)  # room for the fds, and 100 more
            tpl.send_fh(*fds)
            tpl.eval("pass")
            child = tpl.fork().run(f"{W}:arg_sizes")
            assert child.wait(20) == 1  # it cannot len() a pipe fd: the run itself worked
            child.control.close()
    finally:
        for fd in fds:
            os.close(fd)


_LIMIT_TO = (
    "import os, resource\n"
    "from forkserver._fds import _reserve\n"
    "used = len(os.listdir('/proc/self/fd')) - 1 - _reserve._count\n"  # minus listdir's own fd
    "resource.setrlimit(resource.RLIMIT_NOFILE, (used + args[0], resource.getrlimit(resource.RLIMIT_NOFILE)[1]))\n"
)


@pytest.mark.parametrize("extra", [-1, 0, 1, 5])
def test_item6_the_standing_reserve_leaves_exactly_its_headroom_free(extra):
    from forkserver._fds import _Reserve

    headroom = getattr(_Reserve, "HEADROOM", 16)
    pipes = [os.pipe() for _ in range(500)]
    fds = [fd for pair in pipes for fd in pair]
    try:
        with Template(spare=False).require(W) as tpl:
            # After the 1000 fds arrive, headroom + extra slots are left: the
            # reserve may hold only what is above the headroom.
            tpl.eval(_LIMIT_TO, len(fds) + headroom + extra)
            tpl.send_fh(*fds)
            tpl.eval(
                "import os, resource\n"
                "from forkserver._fds import _reserve\n"
                "import tests._workers as w\n"
                "w.TABLE = (resource.getrlimit(resource.RLIMIT_NOFILE)[0] - (len(os.listdir('/proc/self/fd')) - 1), _reserve._count)\n"
            )
            free, held = _report_table(tpl)
            assert held == max(0, extra)
            assert free == headroom + min(0, extra)
    finally:
        for fd in fds:
            os.close(fd)


# -- 7. a template whose parent died exits quietly -------------------------------------------

_ORPHAN = """
import os, sys, forkserver
t = forkserver.Template()
print(t.pid, flush=True)
t.eval(sys.argv[1])
"""


def _set_subreaper(on):
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(36, int(on), 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER


@pytest.mark.parametrize("source", [
    "import os; os.kill(os.getppid(), 9); import time; time.sleep(0.2)",  # then RESULT: EPIPE
    "import os; os.kill(os.getppid(), 9); import time; time.sleep(0.2); 1/0",  # then ERROR: EPIPE
])
def test_item7_a_template_whose_parent_died_exits_without_a_traceback(source):
    _set_subreaper(True)  # the orphans come to us, so the test can reap them
    ours_before = {p.pid for p in psutil.Process().children()}
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", _ORPHAN, source], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        tpl_pid = int(proc.stdout.readline())
        err = proc.stderr.read()  # EOF once every writer -- the templates too -- exited
        assert proc.wait(20) == -signal.SIGKILL
        proc.stdout.close()
        proc.stderr.close()
        assert b"Traceback" not in err, err.decode()
        for pid in {p.pid for p in psutil.Process().children()} - ours_before:
            os.waitpid(pid, 0)  # reparented to us: the template, the default template
        assert not psutil.pid_exists(tpl_pid) or psutil.Process(tpl_pid).status() == psutil.STATUS_ZOMBIE
    finally:
        _set_subreaper(False)


# -- a failure to prepare the next spare never fails the current call ----------------------


def test_a_failed_refill_is_retried_after_the_next_run(monkeypatch):
    from forkserver import _cloning

    with Template().require(W) as tpl:
        real = _cloning.socketpair
        calls = []

        def failing():
            calls.append(1)
            if len(calls) == 2:  # 1: the run's own fork; 2: the next spare
                raise OSError(24, "Too many open files")
            return real()

        monkeypatch.setattr(_cloning, "socketpair", failing)
        first = tpl.fork().run(f"{W}:return_quietly")  # fused: its spare cannot be made
        assert first.wait(20) == 0
        first.control.close()
        assert tpl._spare is None
        second = tpl.fork().run(f"{W}:return_quietly")  # a clone, and the next spare asked for
        assert second.wait(20) == 0
        second.control.close()
        assert tpl._spare is not None and tpl._spare.pid


def test_json_of_reaper_state_is_sane():
    # A cheap check that the inspection helpers the suite relies on work.
    assert json.dumps({"pending": reaper.pending(), "running": reaper.running})
