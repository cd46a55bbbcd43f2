"""``forkserver run``: a run behaves as ``python script.py`` would (exit status, stdio, __main__).

Each test gets its own zygote directory (``tests/_zygote.py``); the zygote
preloads ``json`` unless a test needs more.  Terminals, signals typed at a
terminal and job control are in ``test_zygote_tty.py``; the daemon's side
(security, staleness, crashes) in ``test_zygote_daemon.py``.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from tests._zygote import processes_with, script, wait_gone, zygotes  # noqa: F401

PRELOAD = ("--preload", "json")


@pytest.mark.parametrize("code", [0, 1, 3, 255])
def test_the_client_exits_with_the_scripts_exit_code(zygotes, code):
    out = zygotes.run(*PRELOAD, "-c", f"import sys; sys.exit({code})")
    assert out.returncode == code, out.stderr
    assert out.stderr == ""


def test_an_uncaught_exception_exits_1_with_the_traceback_python_prints(zygotes, tmp_path):
    path = script(tmp_path, "def f():\n    raise ValueError('boom')\n\nf()\n")
    ours = zygotes.run(*PRELOAD, path)
    plain = subprocess.run([sys.executable, path], capture_output=True, text=True)
    assert ours.returncode == plain.returncode == 1
    assert ours.stderr == plain.stderr
    assert "ValueError: boom" in ours.stderr


def test_sys_exit_with_a_message_prints_it_and_exits_1(zygotes):
    out = zygotes.run(*PRELOAD, "-c", "import sys; sys.exit('bad input')")
    assert (out.returncode, out.stderr) == (1, "bad input\n")


def test_os_exit_status_is_reported_exactly(zygotes):
    out = zygotes.run(*PRELOAD, "-c", "import os; print('x', flush=True); os._exit(42)")
    assert (out.returncode, out.stdout) == (42, "x\n")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL, signal.SIGUSR1])
def test_a_script_killed_by_a_signal_kills_the_client_with_that_signal(zygotes, sig):
    out = zygotes.run(*PRELOAD, "-c", f"import os; os.kill(os.getpid(), {int(sig)})")
    assert out.returncode == -sig


def test_a_crash_of_the_script_is_reported_as_the_same_signal_without_a_core_of_ours(zygotes):
    out = zygotes.run(*PRELOAD, "-c", "import os, signal, resource; "
                      "resource.setrlimit(resource.RLIMIT_CORE, (0, 0)); "
                      "os.kill(os.getpid(), signal.SIGSEGV)")
    assert out.returncode == -signal.SIGSEGV


def test_stdin_is_piped_through(zygotes):
    out = zygotes.run(*PRELOAD, "-c", "print(input().upper())", input="x\n")
    assert (out.returncode, out.stdout) == (0, "X\n")


def test_a_shell_pipeline_feeds_the_script_and_reads_its_output(zygotes):
    line = f"echo x | {zygotes.cmd('run')[0]} run --preload json -c 'print(input())' | cat"
    out = subprocess.run(line, shell=True, env=zygotes.env, capture_output=True, text=True,
                         timeout=30)
    assert (out.returncode, out.stdout) == (0, "x\n")


def test_the_reader_of_the_scripts_stdout_sees_eof_when_the_run_ends(zygotes):
    # Nothing of ours keeps a copy of the client's stdout: `run ... | reader`
    # ends when the script does (Spring's `rake -T | grep` hang).
    proc = subprocess.Popen(zygotes.cmd("run", *PRELOAD, "-c", "print('a'); print('b')"),
                            stdout=subprocess.PIPE, env=zygotes.env)
    try:
        assert proc.stdout.read() == b"a\nb\n"  # returns at EOF only
    finally:
        proc.stdout.close()
        assert proc.wait(30) == 0


def test_stdout_and_stderr_go_to_the_clients_own_fds(zygotes, tmp_path):
    out_path, err_path = tmp_path / "out", tmp_path / "err"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        code = subprocess.run(zygotes.cmd("run", *PRELOAD, "-c",
                                          "import sys; print('to out'); print('to err', file=sys.stderr)"),
                              stdout=out, stderr=err, env=zygotes.env, timeout=30).returncode
    assert code == 0
    assert (out_path.read_text(), err_path.read_text()) == ("to out\n", "to err\n")


def test_a_closed_stdin_is_closed_in_the_script_too(zygotes):
    out = zygotes.run(*PRELOAD, "-c", "import sys; print(sys.stdin)", stdin=None,
                      preexec_fn=lambda: os.close(0))
    assert (out.returncode, out.stdout) == (0, "None\n"), out.stderr


PROBE = """\
import os, sys, json
print(json.dumps({
    "argv": sys.argv, "path0": sys.path[0], "name": __name__,
    "file": globals().get("__file__"), "cached": globals().get("__cached__", "absent"),
    "spec": [getattr(__spec__, "name", None), getattr(__spec__, "origin", None)],
    "package": __package__,
    "globals": sorted(k for k in globals() if k not in ("os", "sys", "json")),
    "loader": type(__loader__).__name__ if not isinstance(__loader__, type) else __loader__.__name__,
    "main_is_us": sys.modules["__main__"].__dict__ is globals(),
    "cwd": os.getcwd(), "umask": os.umask(0o22), "env": os.environ.get("ZYGOTE_PROBE"),
    "isatty": [os.isatty(fd) for fd in (0, 1, 2)],
    "stdout": [sys.stdout.name, sys.stdout.line_buffering, sys.stdout.encoding],
    "orig_argv_tail": getattr(sys, "orig_argv", [None])[1:],
}))
"""


def _both(zygotes, tmp_path, args, cwd):
    env = dict(zygotes.env, ZYGOTE_PROBE="seen")
    kw = dict(capture_output=True, text=True, cwd=cwd, env=env, timeout=30,
              preexec_fn=lambda: os.umask(0o027))
    ours = subprocess.run(zygotes.cmd("run", *PRELOAD, *args), **kw)
    plain = subprocess.run([sys.executable, *args], **kw)
    assert ours.returncode == plain.returncode == 0, (ours.stderr, plain.stderr)
    return json.loads(ours.stdout), json.loads(plain.stdout)


def test_a_script_sees_what_python_script_py_shows(zygotes, tmp_path):
    (tmp_path / "sub").mkdir()
    script(tmp_path, PROBE, "sub/probe.py")
    os.symlink("sub/probe.py", tmp_path / "link.py")
    for args in (["sub/probe.py", "a", "-b"], ["./sub/probe.py"], ["link.py", "x"]):
        ours, plain = _both(zygotes, tmp_path, args, tmp_path)
        assert ours == plain


def test_dash_m_runs_a_module_of_a_package_as_python_m_does(zygotes, tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    script(tmp_path, PROBE, "pkg/probe.py")
    ours, plain = _both(zygotes, tmp_path, ["-m", "pkg.probe", "arg"], tmp_path)
    assert ours == plain
    assert ours["name"] == "__main__" and ours["argv"][1:] == ["arg"]


def test_dash_c_runs_code_as_python_c_does(zygotes, tmp_path):
    ours, plain = _both(zygotes, tmp_path, ["-c", PROBE, "a1"], tmp_path)
    assert ours == plain
    assert ours["argv"] == ["-c", "a1"] and ours["path0"] == ""


def test_a_directory_with_a_main_module_runs_as_python_dir_does(zygotes, tmp_path):
    (tmp_path / "app").mkdir()
    script(tmp_path, PROBE, "app/__main__.py")
    ours, plain = _both(zygotes, tmp_path, ["app", "z"], tmp_path)
    assert ours == plain


def test_a_missing_script_fails_as_python_does(zygotes, tmp_path):
    ours = zygotes.run(*PRELOAD, "nosuch.py", cwd=tmp_path)
    plain = subprocess.run([sys.executable, "nosuch.py"], capture_output=True, text=True,
                           cwd=tmp_path)
    assert ours.returncode == plain.returncode == 2
    assert _after_program(ours.stderr) == _after_program(plain.stderr)


def _after_program(message):
    """The message without the interpreter's name (bin/python here, bin/python3 for the zygote)."""
    program, colon, rest = message.partition(": ")
    assert colon and program.startswith(os.path.dirname(sys.executable)), message
    return rest


def test_a_missing_module_fails_as_python_m_does(zygotes, tmp_path):
    ours = zygotes.run(*PRELOAD, "-m", "no_such_module_here", cwd=tmp_path)
    plain = subprocess.run([sys.executable, "-m", "no_such_module_here"], capture_output=True,
                           text=True, cwd=tmp_path)
    assert ours.returncode == plain.returncode == 1
    assert _after_program(ours.stderr) == _after_program(plain.stderr)


def test_a_file_left_open_by_the_script_is_flushed_at_exit(zygotes, tmp_path):
    target = tmp_path / "left-open.txt"
    out = zygotes.run(*PRELOAD, "-c", f"f = open({str(target)!r}, 'w'); f.write('kept')")
    assert out.returncode == 0, out.stderr
    assert target.read_text() == "kept"


def test_atexit_handlers_and_non_daemon_threads_finish_before_the_exit(zygotes):
    code = textwrap.dedent("""\
        import atexit, threading, time, sys
        atexit.register(lambda: print("atexit"))
        def work():
            time.sleep(0.2)
            print("thread done", flush=True)
        threading.Thread(target=work).start()
        sys.exit(4)
        """)
    out = zygotes.run(*PRELOAD, "-c", code)
    assert (out.returncode, out.stdout) == (4, "thread done\natexit\n")


def test_a_failing_flush_of_stdout_at_exit_gives_status_120_as_python_does(zygotes):
    code = "import sys; sys.stdout.write('x' * 10)"  # buffered: flushed at exit, into /dev/full
    env = {k: v for k, v in zygotes.env.items() if k != "PYTHONUNBUFFERED"}
    with open("/dev/full", "w") as full:
        ours = subprocess.run(zygotes.cmd("run", *PRELOAD, "-c", code), stdout=full,
                              env=env, timeout=30, stderr=subprocess.PIPE)
        plain = subprocess.run([sys.executable, "-c", code], stdout=full, env=env,
                               stderr=subprocess.PIPE)
    assert ours.returncode == plain.returncode == 120


def test_signals_ignored_where_the_client_started_are_ignored_in_the_script(zygotes):
    code = "import signal; print(signal.getsignal(signal.SIGHUP) == signal.SIG_IGN, " \
           "signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)"
    ignore = lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN)  # noqa: E731 - as nohup does
    ours = zygotes.run(*PRELOAD, "-c", code, preexec_fn=ignore)
    plain = subprocess.run([sys.executable, "-c", code], preexec_fn=ignore, capture_output=True,
                           text=True)
    assert ours.stdout == plain.stdout == "True True\n"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
                                 signal.SIGUSR2])
def test_a_signal_to_the_client_reaches_the_scripts_handler(zygotes, sig):
    code = textwrap.dedent(f"""\
        import signal, sys, os
        signal.signal({int(sig)}, lambda *a: sys.exit(5))
        os.write(1, b"ready\\n")
        while True:
            signal.pause()
        """)
    proc = subprocess.Popen(zygotes.cmd("run", *PRELOAD, "-c", code), stdout=subprocess.PIPE,
                            env=zygotes.env)
    try:
        assert proc.stdout.readline() == b"ready\n"
        proc.send_signal(sig)
        assert proc.wait(30) == 5
    finally:
        proc.stdout.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigint_to_the_client_raises_keyboardinterrupt_in_the_script(zygotes):
    code = "import os, time\ntry:\n    os.write(1, b'ready\\n')\n    time.sleep(60)\n" \
           "except KeyboardInterrupt:\n    print('caught', flush=True)\n    raise\n"
    proc = subprocess.Popen(zygotes.cmd("run", *PRELOAD, "-c", code), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=zygotes.env)
    try:
        assert proc.stdout.readline() == b"ready\n"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == -signal.SIGINT  # python's own end after an uncaught ^C
        assert proc.stdout.read() == b"caught\n"
        assert b"KeyboardInterrupt" in proc.stderr.read()
    finally:
        proc.stdout.close()
        proc.stderr.close()


def test_a_sigkilled_client_takes_its_run_with_it(zygotes, tmp_path):
    code = "import os, time\nprint(os.getpid(), flush=True)\ntime.sleep(120)\n"
    proc = subprocess.Popen(zygotes.cmd("run", *PRELOAD, "-c", code), stdout=subprocess.PIPE,
                            env=zygotes.env)
    try:
        run_pid = int(proc.stdout.readline())
        proc.kill()
        proc.wait(30)
        assert wait_gone([run_pid], 30) == []
    finally:
        proc.stdout.close()


def test_detach_prints_the_pid_and_leaves_the_run_going(zygotes, tmp_path):
    done = tmp_path / "done"
    gate_r, gate_w = os.pipe()
    code = f"import os\nos.read(0, 1)\nopen({str(done)!r}, 'w').write('yes')\n"
    # The run waits on a pipe we hold (its stdin), so it is surely alive after the client
    # left.  It has the client's stdout too: a file, not a pipe we would wait on for EOF.
    with open(tmp_path / "out", "w") as stdout:
        out = zygotes.run(*PRELOAD, "--detach", "-c", code, stdin=gate_r, stdout=stdout,
                          check_output=False)
    os.close(gate_r)
    try:
        assert out.returncode == 0
        run_pid = int((tmp_path / "out").read_text())
        assert run_pid in processes_with(zygotes.marker)
        os.write(gate_w, b"x")
    finally:
        os.close(gate_w)
    assert wait_gone([run_pid], 30) == []
    assert done.read_text() == "yes"


def test_twenty_concurrent_runs_each_get_their_own_output_and_status(zygotes):
    procs = [subprocess.Popen(zygotes.cmd("run", *PRELOAD, "-c",
                                          f"import sys; print({i}); sys.exit({i})"),
                              stdout=subprocess.PIPE, env=zygotes.env) for i in range(20)]
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=60)
        results.append((proc.returncode, out))
    assert results == [(i, b"%d\n" % i) for i in range(20)]
    assert len([s for s in zygotes.status() if not s.get("stale")]) == 1  # one zygote started


def _many_runs(zygotes, count, at_once):
    """``count`` runs, ``at_once`` at a time: each exits with, or dies of, what it was told."""
    codes = [i % 7 if i % 5 else -signal.SIGTERM for i in range(count)]
    results, live = [], []
    for i, code in enumerate(codes):
        action = f"sys.exit({code})" if code >= 0 else f"os.kill(os.getpid(), {-code})"
        live.append((code, subprocess.Popen(zygotes.cmd("run", *PRELOAD, "-c", (
            f"import os, sys; print({i}, flush=True); {action}")), stdout=subprocess.PIPE,
            env=zygotes.env)))
        if len(live) == at_once or i == count - 1:
            for want, proc in live:
                out, _ = proc.communicate(timeout=120)
                results.append((proc.returncode == want, out.strip().isdigit()))
            live = []
    assert results == [(True, True)] * count


def test_a_hundred_runs_twenty_at_a_time_keep_their_codes_and_signals(zygotes):
    _many_runs(zygotes, 100, 20)


@pytest.mark.slow
def test_a_thousand_runs_forty_at_a_time_keep_their_codes_and_signals(zygotes):
    _many_runs(zygotes, 1000, 40)


def test_runs_get_different_numpy_global_random_numbers(zygotes):
    pytest.importorskip("numpy")
    code = "import numpy; print(numpy.random.randint(1 << 30))"
    outs = {zygotes.run("--preload", "numpy", "-c", code).stdout for _ in range(3)}
    assert len(outs) == 3


def test_a_preload_that_fails_runs_plain_python_with_a_one_line_notice(zygotes):
    out = zygotes.run("--preload", "no_such_module_for_zygote", "-c", "print('ran')")
    assert (out.returncode, out.stdout) == (0, "ran\n")
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and "running plain python" in lines[0]
    assert "no_such_module_for_zygote" in lines[0]


def test_a_zygote_lacking_the_preload_set_runs_plain_python(zygotes, tmp_path):
    sock = zygotes.socket(tmp_path / "rt" / "mine.sock")
    assert zygotes.run("--socket", sock, "--preload", "json", "-c", "pass").returncode == 0
    out = zygotes.run("--socket", sock, "--preload", "json,csv", "-c", "import sys; "
                      "print('csv' in sys.modules)")
    assert out.stdout == "False\n"  # plain python: nothing preloaded
    assert "does not preload csv" in out.stderr and len(out.stderr.splitlines()) == 1


def test_bad_command_lines_are_refused_with_usage(zygotes):
    for args in ([], ["-u", "x.py"], ["--preload"], ["-m"]):
        out = zygotes.run(*args)
        assert out.returncode == 2, args
        assert "usage: forkserver run" in out.stderr
    assert zygotes.run("--help").returncode == 0


def test_options_after_the_script_belong_to_the_script(zygotes, tmp_path):
    out = zygotes.run(*PRELOAD, "-c", "import sys; print(sys.argv)", "--preload", "x", "-m")
    assert out.stdout == "['-c', '--preload', 'x', '-m']\n"


def test_python_dash_m_forkserver_run_is_the_same_command(zygotes):
    out = subprocess.run([sys.executable, "-m", "forkserver", "run", *PRELOAD, "-c",
                          "import sys; print(sys.argv); sys.exit(9)", "-b"], env=zygotes.env,
                         capture_output=True, text=True, timeout=30)
    assert (out.returncode, out.stdout) == (9, "['-c', '-b']\n"), out.stderr
