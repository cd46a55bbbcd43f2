"""Templates outlive a hang-up and a Ctrl-C; their workers and programs do not.

A closing terminal sends SIGHUP to its foreground process group, Ctrl-C sends
SIGINT to it, and a server's "reload" is often ``kill -HUP`` of its group:
the caller handles them, and its templates (in the same group) must not die
of them -- they end when the caller closes their sockets.  What templates
start gets the dispositions a plain ``python`` or ``subprocess`` would: the
default, unless the caller ignores the signal.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

import forkserver
from forkserver import Template

W = "tests._workers"


def _ignored(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(f.read().split("SigIgn:")[1].split()[0], 16)


def _running(child) -> None:
    """Wait for ``ready_then_wait``'s byte: the worker's function runs, its signals are set."""
    child.control.setblocking(True)
    child.control.settimeout(20)
    assert child.control.recv(1) == b"r"


def _bit(sig: int) -> int:
    return 1 << (sig - 1)


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGINT])
def test_a_template_sent_a_hangup_or_ctrl_c_goes_on_serving(sig):
    with Template() as tpl:
        tpl.eval("x = 41")
        os.kill(tpl.pid, sig)
        child = tpl.eval("x += 1").fork().run(f"{W}:return_quietly")
        child.control.close()
        assert child.wait(20) == 0


def test_a_template_ignores_hangup_and_ctrl_c_while_waiting():
    with Template() as tpl:
        tpl.eval("pass")
        mask = _ignored(tpl.pid)
    assert mask & _bit(signal.SIGHUP) and mask & _bit(signal.SIGINT)


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGINT])
def test_a_worker_dies_of_a_hangup_or_ctrl_c_as_python_would(sig):
    with Template() as tpl:
        child = tpl.fork().run(f"{W}:ready_then_wait")
    try:
        _running(child)  # run() returns before the worker has set its signals up
        assert _ignored(child.pid) & (_bit(signal.SIGHUP) | _bit(signal.SIGINT)) == 0
        os.kill(child.pid, sig)
        # SIGINT: KeyboardInterrupt, then Python ends the process with SIGINT
        assert child.wait(20) == -sig
    finally:
        child.control.close()


def test_a_program_gets_sighup_at_its_default():
    with forkserver.spawn(["sleep", "30"]) as child:
        mask = _ignored(child.pid)
        child.send_signal(signal.SIGHUP)
        assert child.wait(20) == -signal.SIGHUP
    assert mask & _bit(signal.SIGHUP) == 0


def test_a_caller_that_ignores_sighup_passes_that_on_to_programs_like_subprocess():
    old = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with forkserver.spawn(["sleep", "30"]) as child:
            mask = _ignored(child.pid)
            child.kill()
    finally:
        signal.signal(signal.SIGHUP, old)
    assert mask & _bit(signal.SIGHUP)


def test_workers_of_a_template_started_under_nohup_keep_ignoring_sighup():
    # nohup: SIGHUP ignored from the start; an exec'd template inherits that,
    # and so do its workers (as the children of a nohup'd python would).
    code = textwrap.dedent(
        f"""
        import signal, forkserver
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        with forkserver.Template.new_exec() as tpl:
            child = tpl.fork().run("{W}:ready_then_wait")
        child.control.setblocking(True)
        child.control.settimeout(20)
        assert child.control.recv(1) == b"r"  # its function runs: its signals are set up
        with open(f"/proc/{{child.pid}}/status") as f:
            mask = int(f.read().split("SigIgn:")[1].split()[0], 16)
        child.control.close()
        assert child.wait(20) == 0
        print(bool(mask & (1 << (signal.SIGHUP - 1))))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"
