"""forkserver.mp_context(): what makes its children different from the standard start methods'.

The children are the caller's direct children with exact exit codes, start
with the caller's environment as of each ``start()``, have the preloaded
modules without importing them, and an interrupted ``start()`` leaves
nothing behind.  What every context must offer (CPython's own tests,
adapted) is in ``test_mp_stdlib.py``; the main-module rules in
``test_mp_main.py``.
"""
from __future__ import annotations

import gc
import multiprocessing
import os
import pickle
import signal
import sys
import threading
from multiprocessing.connection import wait

import psutil
import pytest

import forkserver
from forkserver import ClosedError, Template
from forkserver._reaper import reaper

from . import _mp_probe
from ._helpers import run_in_child, wait_exitcode
from ._mp_helpers import (  # noqa: F401
    every_interruption,
    module_context,
    mp_no_leaks,
    mp_tracker,
    pid_alive,
    snapshot,
)
from .conftest import _describe

pytestmark = pytest.mark.usefixtures("mp_no_leaks")

TIMEOUT = 30.0
PROBE_LOG = "FORKSERVER_TEST_PROBE_LOG"


@pytest.fixture(scope="module")
def ctx():
    with module_context(forkserver.mp_context(preload=[__name__])) as context:
        yield context


def run(ctx, target, *args, **kwargs):
    """Start ``target`` in a child, join it (with a deadline); the process object."""
    proc = ctx.Process(target=target, args=args, kwargs=kwargs)
    proc.start()
    proc.join(TIMEOUT)
    assert proc.exitcode is not None, f"{proc!r} did not exit within {TIMEOUT}s"
    return proc


def ask(ctx, target, *args):
    """Run ``target(conn, *args)`` in a child; what it sent back, and its exit code."""
    ours, theirs = ctx.Pipe()
    try:
        proc = ctx.Process(target=target, args=(theirs, *args))
        proc.start()
        theirs.close()
        assert ours.poll(TIMEOUT), "the child sent nothing"
        answer = ours.recv()
        proc.join(TIMEOUT)
        return answer, proc.exitcode
    finally:
        ours.close()


# -- targets (module level: children unpickle them by name) -----------------------


def noop():
    pass


def send_lineage(conn):
    conn.send((os.getpid(), os.getppid(), multiprocessing.parent_process().pid))


def send_env(conn, names):
    conn.send({name: os.environ.get(name) for name in names})


def send_cwd_and_path(conn):
    conn.send((os.getcwd(), list(sys.path)))


def send_modules(conn, names):
    conn.send({name: name in sys.modules for name in names})


def send_start_method(conn):
    conn.send((multiprocessing.get_start_method(), multiprocessing.current_process().name))


def exit_with(code):
    sys.exit(code)


def os_exit_with(code):
    os._exit(code)


def raise_error():
    raise ValueError("a failing target")


def signal_self(signum):
    os.kill(os.getpid(), signum)


def wait_for(event):
    event.wait(TIMEOUT)


def write_line(text):
    print(text, flush=True)


def send_length(conn, blob):
    conn.send(len(blob))


# -- the context ---------------------------------------------------------------


def test_the_context_is_a_base_context_that_answers_forkserver(ctx):
    assert isinstance(ctx, multiprocessing.context.BaseContext)
    assert ctx.get_start_method() == "forkserver"
    assert ctx.get_context() is ctx
    assert ctx.get_context("spawn") is multiprocessing.get_context("spawn")
    assert issubclass(ctx.Process, multiprocessing.process.BaseProcess)


def test_children_see_the_standard_forkserver_as_their_start_method(ctx):
    # As in a child of the standard forkserver: a Process() started there uses it.
    (method, name), code = ask(ctx, send_start_method)
    assert (method, code) == ("forkserver", 0)
    assert name.startswith("TemplateProcess-")


def test_a_child_is_the_callers_direct_child(ctx):
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=send_lineage, args=(theirs,))
    proc.start()
    theirs.close()
    assert ours.poll(TIMEOUT)
    pid, ppid, parent = ours.recv()
    ours.close()
    assert pid == proc.pid
    assert ppid == parent == os.getpid()
    assert psutil.Process(proc.pid).ppid() == os.getpid() or not pid_alive(proc.pid)
    proc.join(TIMEOUT)
    assert proc.exitcode == 0


@pytest.mark.parametrize("target, arg, expected", [
    (exit_with, 3, 3),
    (exit_with, None, 0),
    (os_exit_with, 7, 7),
    (signal_self, signal.SIGUSR1, -signal.SIGUSR1),
    (signal_self, signal.SIGSEGV, -signal.SIGSEGV),
])
def test_exit_codes_are_exact(ctx, target, arg, expected):
    assert run(ctx, target, arg).exitcode == expected


def test_a_failing_target_exits_1(ctx, capfd):
    assert run(ctx, raise_error).exitcode == 1
    assert "ValueError: a failing target" in capfd.readouterr().err


@pytest.mark.parametrize("how, expected",
                         [("terminate", -signal.SIGTERM), ("kill", -signal.SIGKILL)])
def test_terminate_and_kill_give_the_signal_as_a_negative_exit_code(ctx, how, expected):
    event = ctx.Event()
    proc = ctx.Process(target=wait_for, args=(event,))
    proc.start()
    getattr(proc, how)()
    proc.join(TIMEOUT)
    assert proc.exitcode == expected


def test_the_exit_code_stays_exact_when_the_template_is_killed():
    # The standard forkserver reports 255 when its server is gone; our
    # children are ours, so nothing stands between us and their status.
    with forkserver.mp_context(preload=[__name__]) as ctx:
        event = ctx.Event()
        waiter = ctx.Process(target=wait_for, args=(event,))
        waiter.start()
        assert ctx._warm.wait_ready(TIMEOUT)
        os.kill(ctx._root_template().pid, signal.SIGKILL)
        proc = run(ctx, exit_with, 5)  # the waiting child was forked before: it needs no template
        event.set()
        waiter.join(TIMEOUT)
        assert (proc.exitcode, waiter.exitcode) == (5, 0)
        # The next start finds the template dead and makes a new one.
        assert run(ctx, exit_with, 6).exitcode == 6


def test_a_status_reaped_by_someone_else_raises_instead_of_a_made_up_code(ctx):
    from forkserver import ReapedElsewhereError

    proc = ctx.Process(target=exit_with, args=(3,))
    proc.start()
    assert wait([proc.sentinel], timeout=TIMEOUT)
    assert os.waitpid(proc.pid, 0)[0] == proc.pid  # "someone else": a waitpid of the user's
    with pytest.raises(ReapedElsewhereError, match=r"exit status of pid \d+ is lost"):
        proc.join(TIMEOUT)
    assert isinstance(ReapedElsewhereError("x"), forkserver.ForkserverError)
    multiprocessing.process._children.discard(proc)
    proc._popen.close()


def test_the_sentinel_is_readable_once_the_child_exits_and_stays_valid(ctx):
    event = ctx.Event()
    proc = ctx.Process(target=wait_for, args=(event,))
    with pytest.raises(ValueError):
        proc.sentinel
    proc.start()
    sentinel = proc.sentinel
    assert wait([sentinel], timeout=0) == []
    event.set()
    assert wait([sentinel], timeout=TIMEOUT) == [sentinel]
    proc.join(TIMEOUT)
    assert proc.exitcode == 0
    # Reaped now: the sentinel is still ours, still readable, not reused.
    assert wait([sentinel], timeout=0) == [sentinel]
    assert os.readlink(f"/proc/self/fd/{sentinel}") == "anon_inode:[pidfd]"
    proc.close()


# -- what a child starts with ------------------------------------------------------


def test_a_child_has_the_preloaded_modules_without_importing_them(tmp_path, monkeypatch):
    log = tmp_path / "imports.log"
    monkeypatch.setenv(PROBE_LOG, str(log))
    with forkserver.mp_context(preload=[__name__, "tests._mp_probe"]) as ctx:
        root_pid = ctx._root_template().pid
        for _ in range(3):
            found, code = ask(ctx, send_modules, ["tests._mp_probe", "concurrent.futures.process"])
            assert code == 0
            assert found == {"tests._mp_probe": True, "concurrent.futures.process": True}
    assert log.read_text().split() == [str(root_pid)]  # imported once: in the template


def test_the_template_and_its_children_hold_no_parent_side_module():
    # Worker-side code must stay lean (DESIGN.md): the context's template
    # imports our child side and the wire, nothing of the parent's.
    with forkserver.mp_context(preload=["tests._mp_probe"]) as ctx:
        ours, theirs = ctx.Pipe()
        proc = ctx.Process(target=_mp_probe.send_forkserver_modules, args=(theirs,))
        proc.start()
        theirs.close()
        assert ours.poll(TIMEOUT)
        found = set(ours.recv())
        ours.close()
        proc.join(TIMEOUT)
    parent_side = {"forkserver._template", "forkserver._cloning", "forkserver._default",
                   "forkserver._reaper", "forkserver._process", "forkserver._boot",
                   "forkserver._pool._mp", "forkserver._pool._mp_popen", "forkserver._pool._mp_warm"}
    assert "forkserver._pool._mp_worker" in found
    assert not found & parent_side, found & parent_side


def test_a_failing_preload_raises_at_mp_context_with_its_type():
    with pytest.raises(ModuleNotFoundError, match="no_such_module_here"):
        forkserver.mp_context(preload=["no_such_module_here"])
    with pytest.raises(ZeroDivisionError):
        forkserver.mp_context(preload=["tests._mp_probe_fails"])


def test_preload_must_be_a_list_of_names():
    with pytest.raises(TypeError, match="list of module names"):
        forkserver.mp_context(preload="json")
    with pytest.raises(TypeError, match="non-empty strings"):
        forkserver.mp_context(preload=[""])


def test_a_child_starts_with_the_callers_current_environment(ctx, monkeypatch):
    names = ["FS_MP_ADDED", "FS_MP_CHANGED", "FS_MP_REMOVED"]
    monkeypatch.setenv("FS_MP_CHANGED", "before")
    monkeypatch.setenv("FS_MP_REMOVED", "before")
    with forkserver.mp_context(preload=[__name__]) as fresh:
        found, _ = ask(fresh, send_env, names)
        assert found == {"FS_MP_ADDED": None, "FS_MP_CHANGED": "before", "FS_MP_REMOVED": "before"}
        monkeypatch.setenv("FS_MP_ADDED", "new")
        monkeypatch.setenv("FS_MP_CHANGED", "after")
        monkeypatch.delenv("FS_MP_REMOVED")
        found, _ = ask(fresh, send_env, names)
        assert found == {"FS_MP_ADDED": "new", "FS_MP_CHANGED": "after", "FS_MP_REMOVED": None}


def test_a_child_starts_in_the_callers_current_directory_with_its_sys_path(
    ctx, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path / "extra"))
    (cwd, path), code = ask(ctx, send_cwd_and_path)
    assert code == 0
    assert cwd == str(tmp_path)
    assert path[0] == str(tmp_path / "extra")


def test_a_child_writes_to_the_callers_current_stdout(ctx, capfd):
    # capfd points fd 1 at a file now, after the template was made.
    assert run(ctx, write_line, "from the child").exitcode == 0
    assert "from the child" in capfd.readouterr().out


def test_a_big_argument_reaches_the_child(ctx):
    blob = os.urandom(1 << 16) * 256  # 16 MiB: more than any socket buffer
    length, code = ask(ctx, send_length, blob)
    assert (length, code) == (len(blob), 0)


# -- templates, spares, closing ----------------------------------------------------


def test_children_can_come_from_a_template_of_the_callers(monkeypatch):
    with Template(env={**os.environ, "FS_MP_TEMPLATE_ENV": "yes"}) as tpl:
        tpl.require("json")
        with forkserver.mp_context(template=tpl, preload=[__name__]) as ctx:
            found, _ = ask(ctx, send_modules, ["json"])
            assert found == {"json": True}
            env, _ = ask(ctx, send_env, ["FS_MP_TEMPLATE_ENV"])
            assert env == {"FS_MP_TEMPLATE_ENV": "yes"}  # the template's environment is the base
            monkeypatch.setenv("FS_MP_TEMPLATE_ENV", "changed here")
            env, _ = ask(ctx, send_env, ["FS_MP_TEMPLATE_ENV"])
            assert env == {"FS_MP_TEMPLATE_ENV": "changed here"}  # changes since mp_context() apply
        # Ours was forked: the user's template did not import multiprocessing's child side.
        child = tpl.fork().run("tests._mp_probe:report_modules")
        try:
            child.control.settimeout(TIMEOUT)
            found = pickle.loads(child.control.recv(1 << 16))
        finally:
            child.control.close()
            child.wait(TIMEOUT)
        assert found["forkserver._pool._mp_worker"] is False


def test_set_forkserver_preload_imports_into_the_template_and_raises_errors(tmp_path, monkeypatch):
    log = tmp_path / "imports.log"
    monkeypatch.setenv(PROBE_LOG, str(log))
    with forkserver.mp_context(preload=[__name__]) as ctx:
        ctx.set_forkserver_preload(["tests._mp_probe"])
        found, _ = ask(ctx, send_modules, ["tests._mp_probe"])
        assert found == {"tests._mp_probe": True}
        with pytest.raises(ModuleNotFoundError):
            ctx.set_forkserver_preload(["no_such_module_here"])
        assert run(ctx, noop).exitcode == 0
    assert len(log.read_text().split()) == 1


def test_closing_the_context_leaves_running_children_alone():
    ctx = forkserver.mp_context(preload=[__name__])
    event = ctx.Event()
    proc = ctx.Process(target=wait_for, args=(event,))
    proc.start()
    waiting = ctx._warm.standing()
    ctx.close()
    ctx.close()  # idempotent
    assert waiting is None or waiting.poll() is not None  # the waiting child ended
    assert proc.is_alive()
    event.set()
    proc.join(TIMEOUT)
    assert proc.exitcode == 0
    with pytest.raises(ClosedError, match="closed"):
        ctx.Process(target=noop).start()


def test_a_killed_waiting_child_is_never_handed_out(ctx):
    assert ctx._warm.wait_ready(TIMEOUT)
    waiting = ctx._warm.standing()
    os.kill(waiting.pid, signal.SIGKILL)
    waiting.wait(TIMEOUT)
    proc = run(ctx, noop)
    assert proc.pid != waiting.pid and proc.exitcode == 0


def test_start_from_many_threads_at_once(ctx):
    procs = [ctx.Process(target=noop) for _ in range(8)]
    threads = [threading.Thread(target=p.start) for p in procs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    for p in procs:
        p.join(TIMEOUT)
    assert [p.exitcode for p in procs] == [0] * 8
    assert len({p.pid for p in procs}) == 8


def test_the_context_pickles_as_a_new_context_built_on_first_use(ctx):
    copy = pickle.loads(pickle.dumps(ctx))
    try:
        assert copy is not ctx and copy._root is None  # nothing built yet
        assert run(copy, noop).exitcode == 0
    finally:
        copy.close()
    with Template() as tpl, forkserver.mp_context(template=tpl) as theirs:
        with pytest.raises(TypeError, match="cannot be sent"):
            pickle.dumps(theirs)


def _start_in_forked_copy(ctx):
    proc = ctx.Process(target=exit_with, args=(4,))
    proc.start()
    proc.join(TIMEOUT)
    ctx.close()
    assert proc.exitcode == 4


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_copy_of_the_caller_builds_its_own_template(ctx):
    assert run(ctx, noop).exitcode == 0
    assert wait_exitcode(run_in_child(_start_in_forked_copy, ctx)) == 0
    assert run(ctx, noop).exitcode == 0  # ours is untouched


# -- interrupts ---------------------------------------------------------------------


def _interrupted_start_leaves_nothing(ctx, every: int) -> int:
    started = []

    def call():
        proc = ctx.Process(target=noop)
        started.append(proc)
        proc.start()
        proc.join(TIMEOUT)

    before = snapshot()

    def check():
        gc.collect()  # what the interrupted frames held
        assert reaper.wait_idle(TIMEOUT)
        for proc in started:
            if proc._popen is not None:  # it did start: it is ours to join
                proc.join(TIMEOUT)
                assert proc.exitcode == 0
                proc.close()
        started.clear()
        fds, pids = snapshot()
        assert fds == before[0], {fd: _describe(fd) for fd in fds ^ before[0]}
        assert pids == before[1]

    return every_interruption(call, check, every)


def test_an_interrupted_start_leaves_no_child_and_no_fd(ctx):
    # Every 13th line event of start() + join() (all of them: -m slow).
    assert _interrupted_start_leaves_nothing(ctx, every=13) > 10
    assert run(ctx, noop).exitcode == 0


@pytest.mark.slow
def test_an_interrupt_at_any_line_of_start_leaves_no_child_and_no_fd(ctx):
    assert _interrupted_start_leaves_nothing(ctx, every=1) > 100
    assert run(ctx, noop).exitcode == 0
