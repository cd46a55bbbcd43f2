"""Kill storm: random SIGKILLs across the process tree while the program keeps working.

A killer thread SIGKILLs random children of ours -- workers, programs,
spare clones, templates, the default template -- at random moments, while
the main thread keeps doing what programs do: ``fork().run()``,
``Template()``, ``spawn``/``communicate``, ``run_program``, ``eval``,
``close``, templates dropped half-used.  Afterwards (issue 11, "Done
means"): 0 zombies, 0 leaked fds, only typed errors came out
(``ForkserverError`` subclasses; a worker's own results may be cut short,
that is the kill), the reaper went idle, and a fresh ``Template()`` works.

The killer only signals through a pidfd it verified to be our unreaped
child (``waitid(P_PIDFD, WNOWAIT)``), so it never hits a process that
reused a pid.  The default run is 300 iterations; ``-m slow`` runs the
same storm for 10 minutes.
"""
from __future__ import annotations

import collections
import gc
import os
import random
import select
import signal
import subprocess
import threading
import time

import psutil
import pytest

import forkserver
from forkserver import ForkserverError, Template
from forkserver._reaper import reaper
from forkserver._wait import is_our_child

from ._workers import recv_obj

pytestmark = pytest.mark.usefixtures("no_leaks")

W = "tests._workers"


class Killer(threading.Thread):
    """Kills 0-2 random children of ours shortly after each ``go()``."""

    def __init__(self, seed: int) -> None:
        super().__init__(name="storm-killer", daemon=True)
        self.rng = random.Random(seed)
        self.go_event = threading.Event()
        self.done_event = threading.Event()
        self.stop = False
        self.kills = 0
        self.victims = []  # pidfds of the processes killed: the storm is over once all died

    def go(self) -> None:
        self.done_event.clear()
        self.go_event.set()

    def wait_done(self) -> None:
        assert self.done_event.wait(20), "the killer is stuck"

    def run(self) -> None:
        me = psutil.Process()
        while True:
            self.go_event.wait()
            self.go_event.clear()
            if self.stop:
                self.done_event.set()
                return
            # Chaos, not synchronisation: a random moment in the middle of the call.
            threading.Event().wait(self.rng.random() * 0.004)
            try:
                kids = [p.pid for p in me.children()]
            except psutil.Error:
                kids = []
            for pid in self.rng.sample(kids, min(len(kids), self.rng.choice([0, 1, 1, 2]))):
                self._kill(pid)
            self.done_event.set()

    def _kill(self, pid: int) -> None:
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return  # gone already
        try:
            if is_our_child(pidfd):  # not a pid reused by someone else's process
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                self.kills += 1
                self.victims.append(pidfd)
                return
        except OSError:
            pass
        os.close(pidfd)

    def settle(self) -> None:
        """Wait until every process killed has died (a big one takes a while to exit)."""
        for pidfd in self.victims:
            assert select.select([pidfd], [], [], 20)[0], "a SIGKILLed process did not die"
            os.close(pidfd)
        self.victims = []


def _talk(child) -> None:
    """Read the worker's answer (may be cut short by a kill) and reap it."""
    try:
        child.control.setblocking(True)
        child.control.settimeout(20)
        recv_obj(child.control)
    except (EOFError, OSError):
        pass  # killed before it answered
    child.wait(20)
    child.close()


class Operator:
    """The program under the storm: one random operation per iteration."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.tpl = None
        self.errors: "collections.Counter[str]" = collections.Counter()
        self.ops: "collections.Counter[str]" = collections.Counter()

    def template(self) -> Template:
        if self.tpl is None or self.tpl._status != "ready":
            if self.tpl is not None:
                self.tpl.close()
                self.tpl = None
            tpl = Template().require(W)
            self.tpl = tpl
        return self.tpl

    def step(self, i: int) -> None:
        op = self.rng.choice(
            ["run", "run", "run", "new", "spawn", "program", "eval", "close", "drop", "fork_pid"]
        )
        self.ops[op] += 1
        try:
            getattr(self, "op_" + op)(i)
        except ForkserverError as exc:
            self.errors[type(exc).__name__] += 1
            if self.tpl is not None and self.tpl._status == "broken":
                self.tpl = None

    def op_run(self, i: int) -> None:
        _talk(self.template().fork().send_arg(i).run(f"{W}:echo_args"))

    def op_new(self, i: int) -> None:
        with Template() as tpl:
            tpl.eval("x = 1")
            child = tpl.fork().run(f"{W}:return_quietly")
            child.wait(20)
            child.close()

    def op_spawn(self, i: int) -> None:
        child = forkserver.spawn(["cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        out, _ = child.communicate(b"x" * 5000, timeout=20)
        assert out == b"x" * 5000 or child.returncode == -signal.SIGKILL

    def op_program(self, i: int) -> None:
        done = forkserver.run_program(["true"], timeout=20)
        assert done.returncode in (0, -signal.SIGKILL)

    def op_eval(self, i: int) -> None:
        self.template().eval("y = args[0]", i)

    def op_close(self, i: int) -> None:
        tpl = self.template()
        self.tpl = None
        tpl.close()

    def op_drop(self, i: int) -> None:
        # dropped while it runs (its control closed by us, not left to the GC: it then ends)
        self.template().fork().run(f"{W}:wait_for_eof").control.close()

    def op_fork_pid(self, i: int) -> None:
        self.template().fork().pid  # an un-run template, dropped

    def close(self) -> None:
        if self.tpl is not None:
            self.tpl.close()
            self.tpl = None


def _storm(iterations: int = 0, seconds: float = 0.0, seed: int = 11) -> None:
    killer = Killer(seed)
    op = Operator(seed + 1)
    killer.start()
    deadline = time.monotonic() + seconds
    i = 0
    try:
        while (iterations and i < iterations) or (seconds and time.monotonic() < deadline):
            killer.go()
            op.step(i)
            killer.wait_done()
            i += 1
    finally:
        killer.stop = True
        killer.go()
        killer.join(20)
        killer.settle()  # the storm is over: whatever it killed is dead now
        op.close()
    assert killer.kills > i // 4, f"only {killer.kills} kills in {i} iterations: the storm proved little"
    # Only typed errors came out (anything else failed the loop already).
    assert set(op.errors) <= {"BrokenTemplateError", "BrokenChannelError"}, op.errors
    # A fresh Template() works.  (It also notices a default template or spare
    # killed while nobody used it: such a standing process is reaped at the
    # next use of forkserver.)
    with Template().require(W) as fresh:
        child = fresh.fork().send_arg("after").run(f"{W}:echo_args")
        child.control.setblocking(True)
        child.control.settimeout(20)
        assert recv_obj(child.control) == ("after",)
        assert child.wait(20) == 0
        child.close()
    gc.collect()
    assert reaper.wait_idle(30), f"{reaper.pending()} processes never reaped"
    zombies = [_name(p) for p in psutil.Process().children() if p.status() == psutil.STATUS_ZOMBIE]
    assert zombies == [], zombies


def _name(proc):
    from forkserver import _default, _template

    known = {t._pid: repr(t) for t in list(_template._live)}
    default = _default._default.template
    return (proc.pid, proc.name(), known.get(proc.pid), default and default._pid)


def test_a_300_iteration_kill_storm_leaves_no_zombie_no_fd_and_only_typed_errors():
    _storm(iterations=300)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_ten_minute_kill_storm_leaves_no_zombie_no_fd_and_only_typed_errors():
    _storm(seconds=600)
