"""Ctrl-C, cancellation or an exception at every line of every public call (issue 11).

For each call -- ``eval``, ``require``, ``fork().run()`` (with a spare, and
fused with its fork), ``spawn``, ``communicate``, ``close``, ``Template()``,
and the asyncio faces ``aio.eval``/``require``/``run``/``spawn`` -- the call
is run once under ``sys.settrace`` to count the line events in forkserver's
own modules, then again and again, interrupted at the n-th event
(``tests/_inject.py``).  After each interrupted run:

* the interrupt came out of the call (a Ctrl-C or a cancellation is never
  swallowed; an injected ``MemoryError`` either came out, or was no failure
  of the call, which then returned what it should);
* no fd leaked, no child is left unreaped (zombies included), the reaper
  thread went idle (``no_leaks``' checks);
* the template used is usable with its replies in step (``eval("1/0")``
  raises ``ZeroDivisionError``, ``eval("x = 41")`` returns) -- always after
  a Ctrl-C or a cancellation; after a ``MemoryError`` raised at any line,
  even inside a deferred region (mode ``raise``), it may instead be
  broken: then its next use raises ``BrokenTemplateError`` and a new one
  replaces it.  The default template likewise: after a Ctrl-C it is the
  same process, still usable.

The default suite interrupts up to ``SAMPLES`` events per call and mode,
spread evenly over the call with a seeded offset (a call runs several
hundred events; every one of them, for every call and mode, takes minutes);
the ``slow`` versions interrupt every event.
"""
from __future__ import annotations

import gc
import os
import subprocess

import psutil
import pytest

import forkserver
import forkserver.aio as aio
from forkserver import BrokenTemplateError, Template
from forkserver._reaper import reaper

from . import _inject
from ._inject import count_events, count_events_async, run_injected, run_injected_async, sample
from .conftest import child_pids, open_fds

W = "tests._workers"
SAMPLES = 12
SEED = 11


# -- scenarios: setup (untraced), the call (traced), what to do with its result ---------------


class _Templates:
    """The templates the scenarios share; a broken one is replaced."""

    def __init__(self) -> None:
        self.spare: Template = None  # type: ignore[assignment]
        self.plain: Template = None  # type: ignore[assignment]

    def get(self, spare: bool) -> Template:
        attr = "spare" if spare else "plain"
        tpl = getattr(self, attr)
        if tpl is None or tpl._status != "ready":
            if tpl is not None:
                tpl.close()
            tpl = Template(spare=spare).require(W)
            if spare:
                _finish(tpl.fork().run(f"{W}:return_quietly"))  # it keeps a spare from now on
            setattr(self, attr, tpl)
        return tpl

    def close(self) -> None:
        for tpl in (self.spare, self.plain):
            if tpl is not None:
                tpl.close()


def _finish(child) -> int:
    try:
        return child.wait(20)
    finally:
        child.close()


class Scenario:
    name = ""
    uses_template = True  # the check: the template it used is in step (or broken, mode raise)
    spare = True
    is_async = False

    def setup(self, templates: _Templates):
        return templates.get(self.spare) if self.uses_template else None

    def call(self, state):
        raise NotImplementedError

    def done(self, state, result) -> None:
        """The call returned: use or close what it made."""


class Eval(Scenario):
    name = "eval"

    def call(self, tpl):
        return tpl.eval("y = 1")


class Require(Scenario):
    name = "require"

    def call(self, tpl):
        return tpl.require("json")


class Run(Scenario):
    name = "fork().run()"

    def call(self, tpl):
        return tpl.fork().send_arg(3).run(f"{W}:exit_with")

    def done(self, tpl, child):
        assert _finish(child) == 3


class RunFused(Run):
    name = "fork().run(), fused"
    spare = False


class Spawn(Scenario):
    name = "spawn"
    uses_template = False

    def call(self, state):
        return forkserver.spawn(["sh", "-c", "exit 4"], stdout=subprocess.PIPE)

    def done(self, state, child):
        assert child.communicate() == (b"", None) and child.returncode == 4


class Communicate(Scenario):
    name = "communicate"
    uses_template = False
    data = bytes(range(256)) * 800  # more than a pipe holds: many reads and writes

    def setup(self, templates):
        return forkserver.spawn(["cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def call(self, child):
        return child.communicate(self.data)

    def done(self, child, result):
        assert result == (self.data, None)

    def after_interrupt(self, child):
        # Nothing read is lost, nothing is read or written twice: the same call, again, completes it.
        out, _ = child.communicate(self.data)
        assert child._comm.chunks and b"".join(child._comm.chunks[child._comm.fds[0]]) == out
        assert out == self.data and child.returncode == 0
        child.close()


class Close(Scenario):
    name = "close"
    uses_template = False

    def setup(self, templates):
        tpl = Template().require(W)
        tpl.pid
        return tpl

    def call(self, tpl):
        return tpl.close()

    def after_interrupt(self, tpl):
        # Interrupted before it began, it did nothing; else it closed all the same.
        assert tpl._status in ("closed", "ready"), tpl
        tpl.close()  # then a second close finishes (or has nothing left to do)
        assert tpl._status == "closed"


class NewTemplate(Scenario):
    name = "Template()"
    uses_template = False

    def call(self, state):
        return Template()

    def done(self, state, tpl):
        tpl.eval("x = 1")
        tpl.close()


class AioEval(Eval):
    name = "aio.eval"
    is_async = True

    def call(self, tpl):
        return aio.eval(tpl, "y = 1")


class AioRequire(Require):
    name = "aio.require"
    is_async = True

    def call(self, tpl):
        return aio.require(tpl, "json")


class AioRun(Run):
    name = "aio.run"
    is_async = True

    def call(self, tpl):
        return aio.run(tpl.fork().send_arg(3), f"{W}:exit_with")

    def done(self, tpl, child):
        assert _finish(child.child) == 3


class AioSpawn(Spawn):
    name = "aio.spawn"
    is_async = True

    def call(self, state):
        return aio.spawn(["sh", "-c", "exit 4"], stdout=subprocess.PIPE)

    def done(self, state, child):
        assert child.child.communicate() == (b"", None) and child.returncode == 4


SYNC = [Eval(), Require(), Run(), RunFused(), Spawn(), Communicate(), Close(), NewTemplate()]
ASYNC = [AioEval(), AioRequire(), AioRun(), AioSpawn()]


# -- the driver ------------------------------------------------------------------------------


# An interrupted call may leave a file object or socket it had made to its
# finalizer (which closes it, once, with a ResourceWarning): what is checked
# is that no fd stays open, no process unreaped, no reply out of step.
pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


@pytest.fixture(scope="module")
def templates():
    t = _Templates()
    yield t
    t.close()


def _zombies():
    return [p.pid for p in psutil.Process().children() if p.status() == psutil.STATUS_ZOMBIE]


def _run_once(scenario, templates, n, mode):
    """One interrupted run of ``scenario`` and every check after it."""
    from forkserver import _default

    state = scenario.setup(templates)
    default = _default._default.template
    default_pid = default._pid if default is not None else None
    fds_before, kids_before = open_fds(), child_pids()
    if scenario.is_async:
        fired, exc, result = run_injected_async(lambda: scenario.call(state), n, mode)
    else:
        fired, exc, result = run_injected(lambda: scenario.call(state), n, mode)
    where = f"{scenario.name}, {mode} at event {n} ({_inject.last_where[0]})"
    from forkserver import _interrupts

    st = _interrupts._st
    assert (st.depth, st.pending, st.saved, st.allowed) == (0, False, None, False), (
        f"{where}: a deferred region was left open: {vars(st)}"
    )
    if fired and mode == "signal":
        assert isinstance(exc, KeyboardInterrupt), f"{where}: the Ctrl-C was lost or changed: {exc!r}"
    if fired and mode == "cancel":
        import asyncio

        assert isinstance(exc, asyncio.CancelledError), f"{where}: got {exc!r}"
    if fired and mode == "raise" and exc is not None:
        assert _caused_by_injection(exc), f"{where}: the error became {exc!r}"
    if exc is None:
        scenario.done(state, result)
    else:
        exc.__traceback__ = None  # its frames hold what the call had: let them go
        del exc
        after = getattr(scenario, "after_interrupt", None)
        if after is not None:
            after(state)
        elif result is not None:
            scenario.done(state, result)
    result = None
    gc.collect()
    if scenario.uses_template:
        _check_template(state, mode, where)  # (a broken one is replaced at the next setup)
    _check_default(default_pid, mode, where)
    assert reaper.wait_idle(20), f"{where}: the reaper still waits for {reaper.pending()} entries{_stacks()}"
    leaked = open_fds() - fds_before
    assert not leaked, f"{where}: fds leaked: {[_describe(fd) for fd in leaked]}"
    kids = child_pids() - kids_before
    assert not kids, f"{where}: children left: {kids}"
    assert not _zombies(), f"{where}: zombies: {_zombies()}"


def _caused_by_injection(exc) -> bool:
    """The injected MemoryError, or an error it caused (BrokenTemplateError)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, _inject.Injected):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _check_template(tpl, mode, where):
    if tpl._status == "broken":
        assert mode == "raise", f"{where}: an interrupt broke {tpl!r}"
        with pytest.raises(BrokenTemplateError):
            tpl.eval("x = 41")
        return
    with pytest.raises(ZeroDivisionError):
        tpl.eval("1/0")
    tpl.eval("x = 41")


def _check_default(pid_before, mode, where):
    from forkserver._template import default_template

    tpl = default_template()
    if mode in ("signal", "cancel") and pid_before is not None:
        assert tpl.pid == pid_before, f"{where}: a Ctrl-C replaced the default template"


def _stacks():
    import sys
    import traceback

    return "".join(
        f"\nthread {tid}:\n" + "".join(traceback.format_stack(frame))
        for tid, frame in sys._current_frames().items()
    )


def _describe(fd):
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


def _events(scenario, templates):
    state = scenario.setup(templates)
    if scenario.is_async:
        total, result = count_events_async(lambda: scenario.call(state))
    else:
        total, result = count_events(lambda: scenario.call(state))
    scenario.done(state, result)
    gc.collect()
    assert total > 10, f"{scenario.name}: only {total} events traced: the tracer sees nothing"
    return total


def _drive(scenario, mode, templates, every):
    total = _events(scenario, templates)
    points = range(1, total + 2) if every else sample(total, SAMPLES, SEED)
    for n in points:
        _run_once(scenario, templates, n, mode)


_SYNC_MODES = ["signal", "raise"]
_ASYNC_MODES = ["cancel", "signal", "raise"]


@pytest.mark.parametrize("mode", _SYNC_MODES)
@pytest.mark.parametrize("scenario", SYNC, ids=lambda s: s.name)
def test_an_interrupt_anywhere_in_a_call_leaves_everything_consistent(scenario, mode, templates):
    _drive(scenario, mode, templates, every=False)


@pytest.mark.parametrize("mode", _ASYNC_MODES)
@pytest.mark.parametrize("scenario", ASYNC, ids=lambda s: s.name)
def test_a_cancellation_anywhere_in_a_coroutine_leaves_everything_consistent(scenario, mode, templates):
    _drive(scenario, mode, templates, every=False)


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("mode", _SYNC_MODES)
@pytest.mark.parametrize("scenario", SYNC, ids=lambda s: s.name)
def test_an_interrupt_at_every_line_of_a_call_leaves_everything_consistent(scenario, mode, templates):
    _drive(scenario, mode, templates, every=True)


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("mode", _ASYNC_MODES)
@pytest.mark.parametrize("scenario", ASYNC, ids=lambda s: s.name)
def test_a_cancellation_at_every_line_of_a_coroutine_leaves_everything_consistent(scenario, mode, templates):
    _drive(scenario, mode, templates, every=True)


def test_the_injector_interrupts_where_it_is_told():
    # The helper must be able to fail a call: interrupted at event 1, eval raises.
    with Template() as tpl:
        fired, exc, _ = run_injected(lambda: tpl.eval("y = 2"), 1, "raise")
        assert fired and isinstance(exc, _inject.Injected)
        total, _ = count_events(lambda: tpl.eval("y = 2"))
        # (far) past the end: the call runs unharmed (counts vary a little: a greeting read...)
        fired, exc, _ = run_injected(lambda: tpl.eval("y = 2"), 10 * total, "raise")
        assert not fired and exc is None
