"""Child lifecycle: pidfd signals, the stop ladder, wait-on-success, no zombies or leaks."""
from __future__ import annotations

import gc
import os
import signal
import socket
import subprocess
import sys

import psutil
import pytest

from forkserver import Template
from forkserver._reaper import reaper

from ._workers import recv_exact

pytestmark = pytest.mark.usefixtures("no_leaks")

W = "tests._workers"


@pytest.fixture(scope="module")
def tpl():
    with Template().require(W) as t:
        yield t


def started(child):
    """Block until the worker says it runs (its signal handlers are in place)."""
    child.control.setblocking(True)
    child.control.settimeout(20)
    assert recv_exact(child.control, 1) == b"r"
    return child


def test_stop_kills_a_child_that_ignores_sigterm_after_the_grace(tpl):
    child = started(tpl.fork().run(f"{W}:ignore_sigterm"))
    assert child.stop(grace=0.2) == -signal.SIGKILL
    assert repr(child) == f"<forkserver.Child pid={child.pid} killed by SIGKILL>"
    child.control.close()


def test_stop_returns_minus_sigterm_for_a_child_that_exits_on_it(tpl):
    child = started(tpl.fork().run(f"{W}:ready_then_wait"))
    assert child.stop(grace=10) == -signal.SIGTERM
    child.control.close()


def test_stop_with_custom_signals_tries_each_in_turn(tpl):
    child = started(tpl.fork().run(f"{W}:ignore_sigterm"))
    assert child.stop(grace=0.1, signals=(signal.SIGTERM, signal.SIGINT)) == -signal.SIGINT
    child.control.close()


def test_stop_and_signals_on_an_exited_child_are_no_ops(tpl):
    child = tpl.fork().run(f"{W}:return_quietly")
    assert child.wait(20) == 0
    assert child.stop() == 0
    child.terminate()
    child.kill()
    child.send_signal(signal.SIGUSR1)
    assert child.returncode == 0 and repr(child).endswith("exited 0>")
    child.control.close()


def test_signalling_a_reaped_child_never_reaches_a_process_reusing_its_pid(tpl):
    bystander = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        child = tpl.fork().run(f"{W}:return_quietly")
        assert child.wait(20) == 0
        child.pid = bystander.pid  # as if the kernel had recycled the pid
        child.kill()
        assert bystander.poll() is None, "kill() of a reaped child hit another process"
    finally:
        bystander.stdin.close()
        assert bystander.wait(20) == 0
    child.control.close()


def test_with_block_waits_for_the_child_on_success_and_never_terminates_it(tpl):
    """typed-process's race: a cat-like worker that closed its output must exit 0."""
    for _ in range(1000):
        with tpl.fork().run(f"{W}:echo_until_eof", check=True, timeout=20) as child:
            control = child.control
            control.setblocking(True)
            control.settimeout(20)
            control.sendall(b"ping")
            control.shutdown(socket.SHUT_WR)
            data = b""
            while True:
                chunk = control.recv(100)
                if not chunk:
                    break
                data += chunk
            assert data == b"ping"
        assert child.returncode == 0


def test_with_block_raises_called_process_error_for_a_failure_when_checking(tpl):
    with pytest.raises(subprocess.CalledProcessError) as info:
        with tpl.fork().send_arg(3).run(f"{W}:exit_with", check=True):
            pass
    assert info.value.returncode == 3
    with tpl.fork().send_arg(3).run(f"{W}:exit_with") as child:  # no check: no error
        pass
    assert child.returncode == 3


def test_with_block_stops_the_child_when_the_block_raises(tpl):
    with pytest.raises(KeyError):
        with tpl.fork().run(f"{W}:ready_then_wait") as child:
            started(child)
            raise KeyError("boom")
    assert child.returncode == -signal.SIGTERM


def test_with_block_timeout_stops_the_child_and_raises(tpl):
    with pytest.raises(subprocess.TimeoutExpired):
        with tpl.fork().run(f"{W}:ready_then_wait", timeout=0.2) as child:
            started(child)
    assert child.returncode == -signal.SIGTERM


def _our_zombies():
    return [p.pid for p in psutil.Process().children() if p.status() == psutil.STATUS_ZOMBIE]


def lifecycles(count):
    """Mix waited children, dropped children and dropped un-run templates."""
    with Template().require(W) as base:
        for i in range(count):
            mode = i % 3
            if mode == 0:
                child = base.fork().run(f"{W}:return_quietly")
                assert child.wait(20) == 0
                child.control.close()
            elif mode == 1:
                # dropped at once, still running (our end of its socket closed first:
                # the socket is ours to close, the process the reaper's to reap)
                base.fork().run(f"{W}:return_quietly").close()
            else:
                base.fork().pid  # an un-run template, dropped after it exists
    gc.collect()
    assert reaper.wait_idle(30), f"{reaper.pending()} dropped processes never reaped"
    assert _our_zombies() == []


def test_2000_mixed_lifecycles_leave_no_zombie_and_no_fd():
    lifecycles(2000)


@pytest.mark.slow
def test_10000_mixed_lifecycles_leave_no_zombie_and_no_fd():
    lifecycles(10000)


def test_a_template_killed_mid_require_raises_broken_template_error_and_the_next_works():
    from forkserver import BrokenTemplateError

    doomed = Template()
    with pytest.raises(BrokenTemplateError) as info:
        doomed.require("tests._dies_on_import")
    assert info.value.__cause__ is not None
    with Template().require(W) as fresh:  # the next Template() works
        child = fresh.fork().run(f"{W}:return_quietly")
        assert child.wait(20) == 0
        child.control.close()


def test_running_children_are_unaffected_when_their_template_dies(tpl):
    with Template().require(W) as t:
        child = started(t.fork().run(f"{W}:ready_then_wait"))
        os.kill(t.pid, signal.SIGKILL)
        with pytest.raises(Exception):
            t.require("json")
        assert child.poll() is None  # still running
        child.control.close()  # EOF: it returns
        assert child.wait(20) == 0


PARENT_SCRIPT = """
import json, os, sys
import forkserver
pipe_r = int(sys.argv[1])
base = forkserver.Template().require("tests._workers")
unrun = base.fork()
unrun.pid
# both block on the pipe, not on their control socket (whose EOF would end them anyway)
doomed = base.fork().send_fh(pipe_r).run("tests._workers:wait_on_pipe", die_with_parent=True)
survivor = base.fork().send_fh(pipe_r).run("tests._workers:wait_on_pipe")
from forkserver._template import default_template
print(json.dumps({"templates": [default_template().pid, base.pid, unrun.pid],
                  "doomed": doomed.pid, "survivor": survivor.pid}), flush=True)
sys.stdin.read()
"""


def _set_subreaper(on):
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(36, int(on), 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER


def _gone_within(pid, seconds):
    from forkserver._wait import wait_readable

    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return wait_readable(pidfd, seconds)
    finally:
        os.close(pidfd)


def test_when_the_parent_is_sigkilled_its_templates_and_die_with_parent_workers_exit():
    import json

    pipe_r, pipe_w = os.pipe()
    _set_subreaper(True)  # orphans come to us, so the test can reap them
    ours_before = {p.pid for p in psutil.Process().children()}
    try:
        parent = subprocess.Popen(
            [sys.executable, "-c", PARENT_SCRIPT, str(pipe_r)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            pass_fds=[pipe_r],
        )
        os.close(pipe_r)
        pids = json.loads(parent.stdout.readline())
        parent.kill()
        parent.wait(20)
        parent.stdin.close()
        parent.stdout.close()
        # Everything the parent had is now ours: its templates, their spare
        # clones, its workers.  All but the survivor must end.
        orphans = {p.pid for p in psutil.Process().children()} - ours_before
        assert set(pids["templates"]) | {pids["doomed"], pids["survivor"]} <= orphans
        for pid in orphans - {pids["survivor"]}:
            assert _gone_within(pid, 1.0), f"pid {pid} outlived its parent by over 1 s"
        assert psutil.Process(pids["survivor"]).status() != psutil.STATUS_ZOMBIE
        os.close(pipe_w)  # lets the survivor return
        assert _gone_within(pids["survivor"], 20)
        # A template may have been cloning a spare when its parent died: that
        # clone came to us later and ends by itself (its socket is dead too).
        for pid in {p.pid for p in psutil.Process().children()} - ours_before:
            assert _gone_within(pid, 20), f"pid {pid} outlived its parent"
            os.waitpid(pid, 0)  # reparented to us: reap
        # Every writer of the shared stderr is gone: no process complained.
        assert b"Traceback" not in parent.stderr.read()
        parent.stderr.close()
    finally:
        _set_subreaper(False)


def test_at_exit_templates_end_kill_on_exit_workers_die_and_others_keep_running():
    import json

    pipe_r, pipe_w = os.pipe()
    script = (
        "import json, sys, forkserver\n"
        "r = int(sys.argv[1])\n"
        "t = forkserver.Template().require('tests._workers')\n"
        "unrun = t.fork(); unrun.pid\n"
        "k = t.fork().send_fh(r).run('tests._workers:wait_on_pipe', kill_on_exit=True)\n"
        "s = t.fork().send_fh(r).run('tests._workers:wait_on_pipe')\n"
        "print(json.dumps([t.pid, unrun.pid, k.pid, s.pid]), flush=True)\n"
    )
    _set_subreaper(True)
    ours_before = {p.pid for p in psutil.Process().children()}
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", script, str(pipe_r)], stdout=subprocess.PIPE, pass_fds=[pipe_r]
        )
        out = proc.stdout.readline()  # not to EOF: the survivor shares this stdout
        assert proc.wait(60) == 0
        proc.stdout.close()
        os.close(pipe_r)
        tpl_pid, unrun_pid, killed_pid, survivor_pid = json.loads(out)
        for pid in (tpl_pid, unrun_pid, killed_pid):  # reaped by the program itself
            assert not psutil.pid_exists(pid)
        # Nothing else was left either (spare clones included): only the survivor is ours now.
        assert {p.pid for p in psutil.Process().children()} - ours_before == {survivor_pid}
        assert psutil.Process(survivor_pid).status() != psutil.STATUS_ZOMBIE
        os.close(pipe_w)
        assert _gone_within(survivor_pid, 20)
        os.waitpid(survivor_pid, 0)
    finally:
        _set_subreaper(False)


def test_the_reaper_thread_ends_once_every_dropped_process_is_reaped(tpl):
    import threading

    tpl.fork().run(f"{W}:return_quietly").close()  # dropped while running
    gc.collect()
    assert reaper.wait_idle(20)
    assert [t.name for t in threading.enumerate() if t.name == "forkserver-reaper"] == []


def test_a_dropped_child_reaped_by_a_waitpid_of_ours_does_not_stop_the_reaper(tpl):
    child = tpl.fork().run(f"{W}:wait_for_eof")
    pid, control = child.pid, child.control
    del child  # dropped while running: handed to the reaper thread
    gc.collect()
    with reaper._lock:  # the reaper thread cannot reap it meanwhile
        control.close()  # the worker exits...
        os.waitpid(pid, 0)  # ...and the application's own waitpid reaps it first
    assert reaper.wait_idle(20), "the reaper thread died or still waits"
    tpl.fork().run(f"{W}:return_quietly").close()  # the next dropped child is still reaped
    gc.collect()
    assert reaper.wait_idle(20)
