"""The template engine: Template(), require, eval, send_fh, send_arg, fork, run."""
from __future__ import annotations

import os
import pickle
import signal
import socket
import subprocess
import sys
import threading

import psutil
import pytest

import forkserver
from forkserver import (
    BrokenTemplateError,
    ClosedError,
    RemoteTraceback,
    Template,
    ThreadedTemplateError,
)

from . import _workers
from ._workers import recv_obj
from .conftest import children_but_default

pytestmark = pytest.mark.usefixtures("no_leaks")

W = "tests._workers"


def finish(child, timeout=20):
    """Wait for a worker and close our end of its control socket."""
    try:
        return child.wait(timeout)
    finally:
        child.control.close()


def talk(child):
    """Read the one object a worker sends, then reap it; returns (obj, returncode)."""
    child.control.setblocking(True)
    child.control.settimeout(20)
    obj = recv_obj(child.control)
    return obj, finish(child)


# -- the synopsis --------------------------------------------------------------------


def test_anyevent_synopsis_ten_forked_workers_accept_on_one_listener():
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    with Template().require(W).send_fh(listener) as tpl:
        listener.close()  # the template holds its own copy
        workers = [tpl.fork().send_arg(i).run(f"{W}:accept_loop") for i in range(10)]
    try:
        seen = set()
        for _ in range(40):
            with socket.create_connection(("127.0.0.1", port), timeout=20) as conn:
                line = conn.makefile("rb").readline()
            assert line.startswith(b"worker ")
            seen.add(int(line.split()[3]))
        assert seen <= {w.pid for w in workers}
        assert len(seen) >= 1
    finally:
        for w in workers:
            w.control.close()  # EOF: the accept loop returns
    assert [finish(w) for w in workers] == [0] * 10


def test_args_and_fds_sent_to_a_template_are_cloned_into_every_fork(tmp_path):
    path = tmp_path / "data"
    path.write_bytes(b"shared file")
    with open(path, "rb") as f, Template() as tpl:
        tpl.require(W).send_arg("first", {"k": [1, 2]}).send_fh(f).send_arg(3)
        for _ in range(3):
            got, code = talk(tpl.fork().run(f"{W}:report"))
            assert code == 0
            assert got["args"] == [
                ("value", "first"),
                ("value", {"k": [1, 2]}),
                ("file", "rb", "BufferedReader"),
                ("value", 3),
            ]
        # the template itself can still run after its forks
        got, code = talk(tpl.run(f"{W}:report"))
        assert code == 0 and len(got["args"]) == 4


def test_every_process_is_a_direct_child_of_the_caller():
    with Template() as tpl:
        assert psutil.Process(tpl.pid).ppid() == os.getpid()
        sub = tpl.fork()
        assert psutil.Process(sub.pid).ppid() == os.getpid()
        child = sub.require(W).run(f"{W}:report")
        assert psutil.Process(child.pid).ppid() == os.getpid()
        got, code = talk(child)
        assert got["ppid"] == os.getpid() and got["pid"] == child.pid
        assert code == 0


def test_send_fh_gives_the_worker_the_same_kind_of_object(tmp_path):
    a, b = socket.socketpair()
    r, w = os.pipe()
    text = open(tmp_path / "t.txt", "w")
    binary = open(tmp_path / "b.bin", "wb")
    try:
        tpl = Template().send_fh(a, text, binary, r)
        got, code = talk(tpl.require(W).run(f"{W}:report"))
    finally:
        for h in (a, b, text, binary):
            h.close()
        os.close(r)
        os.close(w)
    assert code == 0
    assert got["args"] == [
        ("socket", socket.AF_UNIX, socket.SOCK_STREAM),
        ("file", "w", "TextIOWrapper"),
        ("file", "wb", "BufferedWriter"),
        ("value", got["args"][3][1]),
    ]
    assert isinstance(got["args"][3][1], int)


def test_send_fh_duplicates_at_once_so_the_caller_may_close_its_copy():
    r, w = os.pipe()
    tpl = Template().require(W).send_fh(r)
    os.close(r)  # closed before the worker even exists
    os.write(w, b"still readable")
    os.close(w)
    got, code = talk(tpl.run(f"{W}:read_files"))
    assert got == [b"still readable"] and code == 0


def test_the_control_socket_is_blocking_in_the_worker_and_non_blocking_here():
    child = Template().require(W).run(f"{W}:report")
    assert not child.control.getblocking()
    assert not child.control.get_inheritable()
    got, code = talk(child)
    assert got["control_blocking"] is True
    assert got["control_inheritable"] is False
    assert got["comm"] == "fs:report"
    assert got["sigint"] is True  # Ctrl-C works in workers again


def test_run_accepts_colon_dotted_and_function_targets():
    for target in (f"{W}:report", f"{W}.report", _workers.report):
        got, code = talk(Template().require(W).run(target))
        assert code == 0 and got["pid"] > 0


def test_eval_binds_args_and_keeps_its_namespace_for_later_evals_and_forks():
    with Template() as tpl:
        tpl.eval("import os; TOTAL = sum(args)", 1, 2, 3)
        tpl.eval("TOTAL *= args[0]", 10)
        tpl.eval("os.environ['FROM_EVAL'] = str(TOTAL)")
        got, code = talk(tpl.require(W).fork().run(f"{W}:report"))
    assert got["env"]["FROM_EVAL"] == "60" and code == 0


# -- exit statuses ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "func, args, expected",
    [
        ("return_quietly", (), 0),
        ("raise_value_error", (), 1),
        ("exit_with", (7,), 7),
        ("exit_with", (0,), 0),
        ("kill_self", (int(signal.SIGTERM),), -signal.SIGTERM),
        ("kill_self", (int(signal.SIGKILL),), -signal.SIGKILL),
    ],
)
def test_the_worker_exit_status_is_exact(func, args, expected):
    with Template().require(W) as tpl:
        child = tpl.fork().send_arg(*args).run(f"{W}:{func}")
        assert finish(child) == expected
        assert child.returncode == expected


def test_a_raising_worker_prints_its_traceback_to_its_stderr(tmp_path):
    err = open(tmp_path / "err", "w")
    with err:
        child = Template(stderr=err).require(W).run(f"{W}:raise_value_error")
    assert finish(child) == 1
    text = (tmp_path / "err").read_text()
    assert "ValueError: raised on purpose" in text and "Traceback" in text


def test_output_buffered_in_a_template_is_not_duplicated_by_its_forks(tmp_path):
    out = open(tmp_path / "out", "w")
    with out, Template(stdout=out) as tpl:
        tpl.eval("import sys; sys.stdout.write('once ')")  # buffered, no newline
        tpl.require(W)
        children = [tpl.fork().send_arg(f"child{i} ").run(f"{W}:print_and_exit") for i in range(3)]
        assert [finish(c) for c in children] == [0, 0, 0]
    text = (tmp_path / "out").read_text()
    assert text.count("once") == 1
    assert sorted(text.split()) == ["child0", "child1", "child2", "once"]


# -- context -----------------------------------------------------------------------------


def test_a_template_adopts_the_callers_current_env_cwd_sys_path_and_stdio(tmp_path, monkeypatch):
    monkeypatch.setenv("FORKSERVER_TEST_VAR", "now")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path / "extra"))
    got, code = talk(Template().require(W).run(f"{W}:report"))
    assert code == 0
    assert got["env"]["FORKSERVER_TEST_VAR"] == "now"
    assert got["cwd"] == str(tmp_path)
    assert got["sys_path"][0] == str(tmp_path / "extra")


def test_keyword_overrides_replace_env_cwd_and_stdout(tmp_path):
    out = open(tmp_path / "out", "w")
    env = {"ONLY": "this", "PATH": os.environ.get("PATH", "")}
    with out:
        tpl = Template(env=env, cwd="/", stdout=out)
    got, code = talk(tpl.require(W).run(f"{W}:report"))
    assert got["env"] == env and got["cwd"] == "/" and code == 0
    child = Template(stdout=subprocess.DEVNULL).require(W).send_arg("gone").run(f"{W}:print_and_exit")
    assert finish(child) == 0


# -- failure modes --------------------------------------------------------------------


def test_a_missing_module_raises_import_error_with_the_remote_traceback():
    with Template() as tpl:
        with pytest.raises(ImportError) as info:
            tpl.require("no_such_module_anywhere")
        assert isinstance(info.value.__cause__, RemoteTraceback)
        assert "no_such_module_anywhere" in str(info.value.__cause__)
        tpl.require("json")  # the template is still usable


def test_a_raising_eval_raises_the_same_type_here():
    with Template() as tpl:
        with pytest.raises(ZeroDivisionError) as info:
            tpl.eval("1 / 0")
        assert "1 / 0" in str(info.value.__cause__)
        with pytest.raises(SyntaxError):
            tpl.eval("def (")


def test_an_exception_that_cannot_be_rebuilt_becomes_remote_error():
    with Template() as tpl:
        with pytest.raises(forkserver.RemoteError, match="Local: nope") as info:
            tpl.eval("class Local(Exception): pass\nraise Local('nope')")
        assert "Local" in str(info.value.__cause__)


@pytest.mark.parametrize(
    "target, error",
    [
        ("no_such_module_xyz:func", ImportError),
        (f"{W}:no_such_function", AttributeError),
        (f"{W}:json", TypeError),  # a module, not callable
    ],
)
def test_a_bad_run_target_raises_here_and_the_template_stays_usable(target, error):
    with Template().require(W) as tpl:
        with pytest.raises(error):
            tpl.run(target)
        assert finish(tpl.run(f"{W}:return_quietly")) == 0


@pytest.mark.parametrize("target", ["no.", "", ":f", "mod:", "two words"])
def test_a_malformed_target_is_rejected_before_anything_is_sent(target):
    with Template() as tpl:
        with pytest.raises(ValueError):
            tpl.run(target)


def test_a_local_function_is_rejected_with_advice():
    def local(control):
        pass

    with Template() as tpl, pytest.raises(ValueError, match="module-level"):
        tpl.run(local)


def test_an_unpicklable_arg_raises_at_the_call_site():
    with Template() as tpl:
        with pytest.raises((TypeError, pickle.PicklingError, AttributeError), match="picklable"):
            tpl.send_arg(threading.Lock())
        assert finish(tpl.require(W).run(f"{W}:return_quietly")) == 0


def test_a_closed_fd_raises_at_the_call_site():
    sock = socket.socket()
    sock.close()
    with Template() as tpl:
        tpl.pid
        closed = os.open(os.devnull, os.O_RDONLY)
        os.close(closed)
        with pytest.raises(OSError, match="not open"):
            tpl.send_fh(closed)
        with pytest.raises(ValueError, match="closed"):
            tpl.send_fh(sock)
        with pytest.raises(TypeError):
            tpl.send_fh("not a handle")


def test_a_failed_pipelined_command_surfaces_at_the_next_waiting_call():
    with Template() as tpl:
        # pickles fine here, cannot be unpickled in the template
        tpl.send_arg(_Unloadable())
        with pytest.raises(RuntimeError, match="refuses to unpickle"):
            tpl.require("json")
        with pytest.raises(RuntimeError, match="refuses to unpickle"):
            tpl.fork().pid  # a broken template does not fork either


class _Unloadable:
    def __reduce__(self):
        return (_refuse, ())


def _refuse():
    raise RuntimeError("refuses to unpickle")


def test_a_killed_template_raises_broken_template_error_and_is_reaped():
    tpl = Template()
    os.kill(tpl.pid, signal.SIGKILL)
    with pytest.raises(BrokenTemplateError):
        tpl.require("json")
    with pytest.raises(BrokenTemplateError):
        tpl.fork()
    tpl.close()


def test_a_new_interpreter_template_keeps_no_inherited_fd_open():
    from forkserver._wait import wait_readable

    r, w = os.pipe()
    os.set_inheritable(w, True)  # as a user's pipe for a subprocess would be
    try:
        with Template.new_exec(sys_path=sys.path) as tpl:
            tpl.require(W)
            assert set(os.listdir(f"/proc/{tpl.pid}/fd")) == {"0", "1", "2", "3"}
            child = tpl.fork().run(f"{W}:wait_for_eof")
            os.close(w)
            w = -1
            # The reader sees EOF although the template and a worker are alive.
            assert wait_readable(r, 20) and os.read(r, 1) == b""
            child.control.close()
            assert child.wait(20) == 0
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_a_fork_whose_template_died_meanwhile_raises_and_closes_cleanly():
    tpl = Template(spare=False)
    clone = tpl.fork()  # deferred: the FORK command goes with the run
    os.kill(tpl.pid, signal.SIGKILL)
    os.waitid(os.P_PID, tpl.pid, os.WEXITED | os.WNOWAIT)  # dead, not reaped
    with pytest.raises(BrokenTemplateError):
        clone.run(f"{W}:return_quietly")
    clone.close()  # nothing was created: nothing to end, no error
    tpl.close()


def test_a_dead_template_reaped_by_a_waitpid_of_ours_raises_broken_and_closes_quietly():
    tpl = Template()
    os.kill(tpl.pid, signal.SIGKILL)
    os.waitpid(tpl.pid, 0)  # as a waitpid(-1) loop of the application would
    with pytest.raises(BrokenTemplateError):
        tpl.require("json")
    tpl.close()  # no "reaped by someone else" error: it is gone all the same


def test_a_template_is_consumed_by_run():
    tpl = Template().require(W)
    child = tpl.run(f"{W}:return_quietly")
    with pytest.raises(ClosedError, match="consumed"):
        tpl.require("json")
    with pytest.raises(ClosedError):
        tpl.fork()
    assert finish(child) == 0


def test_close_ends_and_reaps_the_template_and_a_closed_template_refuses_work():
    tpl = Template()
    pid = tpl.pid
    tpl.close()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    with pytest.raises(ClosedError, match="closed"):
        tpl.require("json")
    tpl.close()  # idempotent
    assert "closed" in repr(tpl)


# -- default template --------------------------------------------------------------------


def test_the_default_template_is_spawned_once_and_restarted_after_it_dies():
    from forkserver._template import default_template

    first = default_template()
    assert default_template() is first
    finish(Template().require(W).run(f"{W}:return_quietly"))
    os.kill(first.pid, signal.SIGKILL)
    finish(Template().require(W).run(f"{W}:return_quietly"))  # next use works
    second = default_template()
    assert second is not first and second.pid != first.pid


def test_a_forked_copy_of_the_caller_gets_its_own_default_template():
    from forkserver._template import default_template

    from ._helpers import run_in_child, wait_exitcode

    parent_default = default_template().pid

    def in_child():
        mine = default_template()
        assert mine.pid != parent_default
        child = Template().require(W).run(f"{W}:return_quietly")
        assert child.wait(20) == 0
        mine.close()

    assert wait_exitcode(run_in_child(in_child), timeout=30) == 0


def test_32_threads_create_and_run_processes_at_once_without_crossed_replies():
    results, errors = {}, []

    def work(n):
        try:
            for k in range(3):
                tpl = Template().require(W)
                got, code = talk(tpl.send_arg(n, k).run(f"{W}:echo_args"))
                assert code == 0
                results[(n, k)] = got
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "deadlock: a thread never finished"
    assert not errors, errors[0]
    assert results == {(n, k): (n, k) for n in range(32) for k in range(3)}


def test_new_exec_starts_a_fresh_interpreter_as_our_child(tmp_path):
    with Template.new_exec(cwd=tmp_path, sys_path=sys.path) as tpl:
        # A reply first: posix_spawn returns as soon as exec has replaced the
        # memory, before the kernel has set up the new argv (cmdline reads empty).
        tpl.require(W)
        assert psutil.Process(tpl.pid).ppid() == os.getpid()
        assert psutil.Process(tpl.pid).cmdline()[0] == sys.executable
        got, code = talk(tpl.fork().run(f"{W}:report"))
    assert got["cwd"] == str(tmp_path) and code == 0


# -- hygiene ------------------------------------------------------------------------------


def test_a_template_with_an_import_time_thread_refuses_to_fork_with_a_useful_error():
    with Template().require("tests._threaded_mod") as tpl:
        with pytest.raises(ThreadedTemplateError) as info:
            tpl.fork().pid
        message = str(info.value)
        assert "require('tests._threaded_mod')" in message
        assert "import-time-poller" in message
        assert "Remedy" in message
        # run() does not fork, so it still works
        assert finish(tpl.require(W).run(f"{W}:return_quietly")) == 0


def test_thread_pool_limits_apply_during_imports_and_are_restored_afterwards(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "3")  # the user's own choice is kept
    tpl = Template().require("tests._env_probe", W)
    seen, code = talk(tpl.fork().run(f"{W}:env_at_import"))
    assert seen["OMP_NUM_THREADS"] == "1" and seen["OPENBLAS_NUM_THREADS"] == "1"
    assert seen["MKL_NUM_THREADS"] == "3"
    got, code = talk(tpl.run(f"{W}:report"))
    assert "OMP_NUM_THREADS" not in got["env"] and got["env"]["MKL_NUM_THREADS"] == "3"


def test_numpy_preloaded_template_stays_single_threaded_and_forks_working_children():
    pytest.importorskip("numpy")
    with Template().require("numpy", W) as tpl:
        threads, _ = talk(tpl.fork().run(f"{W}:count_threads"))
        assert threads == 1
        for _ in range(3):
            total, code = talk(tpl.fork().run(f"{W}:matmul"))
            assert total == 200.0 * 200 * 200 and code == 0


def test_gc_freeze_before_fork_is_on_by_default_and_can_be_turned_off():
    if not hasattr(__import__("gc"), "get_freeze_count"):
        pytest.skip("gc.get_freeze_count needs Python 3.7+")
    with Template().require(W) as tpl:
        frozen, _ = talk(tpl.fork().run(f"{W}:report"))
    assert frozen["gc_frozen"] > 0
    with Template(gc_freeze=False).require(W) as tpl:
        thawed, _ = talk(tpl.fork().run(f"{W}:report"))
    assert thawed["gc_frozen"] == 0


def test_no_deprecation_warning_reaches_a_threaded_caller(tmp_path):
    import warnings

    err = open(tmp_path / "err", "w")
    stop = threading.Event()
    bystander = threading.Thread(target=stop.wait)
    bystander.start()
    try:
        with warnings.catch_warnings(record=True) as caught, err:
            warnings.simplefilter("always")
            tpl = Template(stderr=err, env={**os.environ, "PYTHONWARNINGS": "always"})
            finish(tpl.require(W).fork().run(f"{W}:return_quietly"))
            tpl.close()
    finally:
        stop.set()
        bystander.join()
    assert not [w for w in caught if issubclass(w.category, DeprecationWarning)]
    assert "DeprecationWarning" not in (tmp_path / "err").read_text()


def test_protocol_version_mismatch_is_a_clear_error():
    from forkserver import _protocol as P
    from forkserver._fds import FdChannel, socketpair

    a, b = socketpair()
    a.setblocking(False)
    fake = FdChannel(b)
    fake.send(P.HELLO, P.HELLO_FORMAT.pack(999, os.getpid()))
    tpl = Template._from_channel(FdChannel(a), "a fake")
    with pytest.raises(forkserver.ProtocolError, match="protocol 999"):
        tpl.pid
    assert "broken" in repr(tpl)
    fake.close()


def test_early_forks_the_program_into_the_default_template_and_runs_main_functions(tmp_path):
    script = tmp_path / "prog.py"
    script.write_text(
        "import forkserver, os, sys\n"
        "def hello(control, word):\n"
        "    control.sendall(word.encode() + b' from ' + str(os.getppid()).encode())\n"
        "forkserver.early()  # after the definitions it should carry, before threads\n"
        "if __name__ == '__main__':\n"
        "    c = forkserver.Template().send_arg('hi').run(hello)\n"
        "    c.control.setblocking(True)\n"
        "    data = c.control.recv(100)\n"
        "    assert c.wait(20) == 0, c\n"
        "    print(data.decode(), os.getpid())\n"
    )
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert out.returncode == 0, out.stderr
    words = out.stdout.split()
    assert words[0] == "hi" and words[2] == words[3]  # the worker's parent is the program


# -- deferred forks ------------------------------------------------------------------------


def test_a_fork_keeps_the_state_of_the_moment_it_was_asked_for():
    with Template().require(W).send_arg("before") as tpl:
        forked = tpl.fork()
        tpl.send_arg("after")  # the deferred clone must not see this
        got, code = talk(forked.send_arg("own").run(f"{W}:echo_args"))
        assert got == ("before", "own") and code == 0
        got, code = talk(tpl.fork().run(f"{W}:echo_args"))
        assert got == ("before", "after") and code == 0


def test_a_fork_that_is_never_used_creates_no_process():
    with Template().require(W) as tpl:
        before = children_but_default()
        r, w = os.pipe()
        unused = tpl.fork().send_arg(1).send_fh(r)
        os.close(r)
        os.close(w)
        unused.close()  # closes the duplicated fd it was holding
        tpl.fork()  # dropped without close
        tpl.require("json")
        assert children_but_default() == before


def test_a_bad_target_in_a_fused_fork_and_run_raises_and_leaves_nothing():
    r, w = os.pipe()
    with Template().require(W) as tpl:
        with pytest.raises(AttributeError, match="no_such"):
            tpl.fork().send_fh(r).run(f"{W}:no_such")
        with pytest.raises(ImportError):
            tpl.fork().run("no_such_module_q:f")
        assert finish(tpl.fork().run(f"{W}:return_quietly")) == 0
    os.close(r)
    os.close(w)


def test_fds_sent_to_a_deferred_fork_reach_the_worker_once_and_nowhere_else():
    r, w = os.pipe()
    with Template().require(W) as tpl:
        child = tpl.fork().send_fh(r).run(f"{W}:read_files")
        os.close(r)
        os.write(w, b"to the worker")
        os.close(w)  # the worker must see EOF: nobody else holds the write end
        got, code = talk(child)
    assert got == [b"to the worker"] and code == 0


def test_the_default_template_ends_and_is_reaped_when_the_program_exits(tmp_path):
    script = (
        "import forkserver, os\n"
        "t = forkserver.Template()\n"
        "from forkserver._template import default_template\n"
        "print(default_template().pid, t.pid, flush=True)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    default_pid, tpl_pid = map(int, out.split())
    # the program reaped its default template itself: no zombie handed to init
    assert not psutil.pid_exists(default_pid) or psutil.Process(default_pid).ppid() != 1
