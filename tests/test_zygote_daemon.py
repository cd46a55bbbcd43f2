"""The zygote daemon: its directory and peers (security), crashes, staleness, lifecycle.

Security tests that need another uid run as root and drop to ``nobody`` in
a forked process (skipped otherwise).  Every test has its own zygote
directory and leaves no process behind (``tests/_zygote.py``).
"""
from __future__ import annotations

import os
import pathlib
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap

import pytest

from forkserver._zygote import _client, _wire as W
from tests._helpers import run_in_child, wait_exitcode
from tests._zygote import processes_with, wait_gone, zygotes  # noqa: F401

PRELOAD = ("--preload", "json")
NOBODY = 65534
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid")


def test_the_socket_directory_is_created_private_and_the_socket_is_ours_only(zygotes, tmp_path):
    zygotes.dir.rmdir()
    zygotes.dir = tmp_path / "fresh"
    zygotes.env["FORKSERVER_RUNTIME_DIR"] = str(zygotes.dir)
    zygotes.marker = f"FORKSERVER_RUNTIME_DIR={zygotes.dir}".encode()
    assert zygotes.run(*PRELOAD, "-c", "pass").returncode == 0
    assert stat.S_IMODE(zygotes.dir.stat().st_mode) == 0o700
    (sock,) = zygotes.dir.glob("*.sock")
    assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o600
    for other in zygotes.dir.glob("*.l*"):  # the lock and the log
        assert stat.S_IMODE(other.stat().st_mode) == 0o600, other


@pytest.mark.parametrize("mode", [0o755, 0o770, 0o701])
def test_a_socket_directory_others_can_enter_is_refused(zygotes, mode):
    zygotes.dir.chmod(mode)
    out = zygotes.run(*PRELOAD, "-c", "print('ran')")
    assert out.returncode == 1 and out.stdout == ""
    assert f"has mode {mode:#o}" in out.stderr
    assert list(zygotes.dir.iterdir()) == []  # nothing was started, no socket made


@root_only
def test_a_socket_directory_owned_by_someone_else_is_refused(zygotes):
    os.chown(zygotes.dir, NOBODY, NOBODY)
    out = zygotes.run(*PRELOAD, "-c", "print('ran')")
    assert out.returncode == 1 and out.stdout == ""
    assert f"belongs to uid {NOBODY}" in out.stderr
    os.chown(zygotes.dir, 0, 0)


def test_a_symlink_as_the_socket_directory_is_refused(zygotes, tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    out = zygotes.run(*PRELOAD, "-c", "pass", env=dict(zygotes.env, FORKSERVER_RUNTIME_DIR=str(link)))
    assert out.returncode == 1 and "is not a directory" in out.stderr


@pytest.fixture
def open_dir(zygotes):
    """A directory anyone may enter (pytest's tmp_path is not): the kernel lets another uid
    reach a socket there, so only the zygote's and the client's own checks stand in the way."""
    path = pathlib.Path(tempfile.mkdtemp(prefix="fs-zygote-open-", dir="/tmp"))
    path.chmod(0o777)
    try:
        yield path
    finally:
        for sock in path.glob("*.sock"):  # before the directory goes
            zygotes.cli("stop", "--wait", "--socket", str(sock))
        shutil.rmtree(path)


def _become_nobody():
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


@root_only
def test_a_connection_from_another_uid_is_refused_logged_and_nothing_of_it_read(zygotes, open_dir):
    sock_path = str(open_dir / "z.sock")
    assert zygotes.run("--socket", sock_path, *PRELOAD, "-c", "pass").returncode == 0
    os.chmod(sock_path, 0o666)  # so that only the zygote's own check stands in the way
    marker = open_dir / "marker"
    opts = _client.parse([*PRELOAD, "-c", f"open({str(marker)!r}, 'w')"])
    ident = W.identity({k.encode(): v.encode() for k, v in zygotes.env.items()})
    request = _client.request(opts, ident, [])

    def intruder():
        _become_nobody()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(sock_path)
        r, w = os.pipe()
        s.settimeout(30)
        try:
            W.send_fds(s, request, [w])
            reply = s.recv(100)
        except (BrokenPipeError, ConnectionResetError):  # closed with our request unread
            reply = b""
        assert reply == b"", "the zygote answered another uid"

    assert wait_exitcode(run_in_child(intruder)) == 0
    assert not marker.exists()
    log = (open_dir / "z.log").read_text()
    assert f"refused a connection from uid {NOBODY}" in log and "nothing read" in log
    assert zygotes.run("--socket", sock_path, *PRELOAD, "-c", "print('still fine')").stdout \
        == "still fine\n"


@root_only
def test_the_client_refuses_a_zygote_that_runs_as_another_uid(zygotes, open_dir):
    sock_path = str(open_dir / "fake.sock")
    listening_r, listening_w = os.pipe()
    got_r, got_w = os.pipe()

    def fake_zygote():
        _become_nobody()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(sock_path)
        os.chmod(sock_path, 0o666)
        s.listen(1)
        os.write(listening_w, b"x")
        conn, _ = s.accept()
        conn.settimeout(30)
        data = conn.recv(1 << 20)
        os.write(got_w, b"%d" % len(data))

    pid = run_in_child(fake_zygote)
    os.close(listening_w)
    os.close(got_w)
    try:
        assert os.read(listening_r, 1) == b"x"
        out = zygotes.run("--socket", sock_path, *PRELOAD, "-c", "print('ran')")
        assert out.returncode == 1 and out.stdout == ""
        assert f"runs as uid {NOBODY}" in out.stderr
        assert wait_exitcode(pid) == 0
        assert os.read(got_r, 20) == b"0"  # it got not one byte: no environment, no fds
    finally:
        os.close(listening_r)
        os.close(got_r)


def test_a_socket_path_longer_than_sun_path_is_reached_through_its_directory(zygotes, tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True, mode=0o700)
    zygotes.dir.rmdir()
    zygotes.dir = deep
    zygotes.env["FORKSERVER_RUNTIME_DIR"] = str(deep)
    zygotes.marker = f"FORKSERVER_RUNTIME_DIR={deep}".encode()
    assert len(str(deep / "zygote-0123456789abcdef.sock")) > W.SUN_PATH_MAX
    out = zygotes.run(*PRELOAD, "-c", "print('long')")
    assert (out.returncode, out.stdout) == (0, "long\n"), out.stderr
    assert zygotes.daemon()["socket"].startswith(str(deep))


def test_a_socket_file_name_too_long_for_sun_path_is_a_clear_error(zygotes):
    out = zygotes.run("--socket", str(zygotes.dir / ("n" * 120 + ".sock")), *PRELOAD, "-c", "pass")
    assert out.returncode == 1
    assert "too long for a unix socket" in out.stderr


def test_no_start_without_a_running_zygote_fails_clearly(zygotes):
    out = zygotes.run("--no-start", *PRELOAD, "-c", "print('ran')")
    assert out.returncode == 1 and out.stdout == ""
    assert "no zygote listens on" in out.stderr and "--no-start" in out.stderr


def _waiting_run(zygotes, code):
    """A client whose run prints its pid, then blocks reading a line of its stdin."""
    full = "import os, sys\nprint(os.getpid(), flush=True)\nsys.stdin.readline()\n" + code
    proc = subprocess.Popen(zygotes.cmd("run", *PRELOAD, "-c", full), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=zygotes.env)
    return proc, int(proc.stdout.readline())


def test_the_zygote_sigkilled_mid_run_the_client_still_gets_the_exit_code(zygotes):
    proc, run_pid = _waiting_run(zygotes, "sys.exit(3)")
    daemon = zygotes.daemon()["pid"]
    os.kill(daemon, signal.SIGKILL)
    assert wait_gone([daemon], 30) == []
    assert run_pid in processes_with(zygotes.marker)  # the run outlives its zygote
    out, err = proc.communicate(b"go\n", timeout=30)
    assert proc.returncode == 3, err
    # The next run finds the dead zygote's socket, replaces it with a new zygote.
    assert zygotes.run(*PRELOAD, "-c", "print('next')").stdout == "next\n"
    assert zygotes.daemon()["pid"] != daemon


def test_the_zygote_sigkilled_then_the_run_killed_the_client_says_the_status_is_lost(zygotes):
    proc, run_pid = _waiting_run(zygotes, "")
    daemon = zygotes.daemon()["pid"]
    os.kill(daemon, signal.SIGKILL)
    assert wait_gone([daemon], 30) == []
    os.kill(run_pid, signal.SIGKILL)
    assert wait_gone([run_pid], 30) == []  # before communicate() closes the run's stdin
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert b"the zygote died during the run" in err and b"(pid %d)" % run_pid in err


def test_the_zygote_sigkilled_mid_run_signals_still_reach_the_run(zygotes):
    proc, run_pid = _waiting_run(zygotes, "")
    daemon = zygotes.daemon()["pid"]
    os.kill(daemon, signal.SIGKILL)
    assert wait_gone([daemon], 30) == []
    proc.send_signal(signal.SIGTERM)  # forwarded through the run's pidfd now
    try:
        assert proc.wait(30) == 1  # the status died with the zygote: the client says so
        assert wait_gone([run_pid], 30) == []
        assert b"ended without reporting its status" in proc.stderr.read()
    finally:  # its stdin stays open until here: the run must end by the signal, not by EOF
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            pipe.close()


def _module_env(zygotes, tmp_path, text, name="zmod"):
    lib = tmp_path / "lib"
    lib.mkdir(exist_ok=True)
    (lib / f"{name}.py").write_text(text)
    env = dict(zygotes.env, PYTHONPATH=str(lib))
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # bytecode written: the same-second edit below
    return lib, env


def test_an_edited_preloaded_module_restarts_the_zygote_before_the_run(zygotes, tmp_path):
    lib, env = _module_env(zygotes, tmp_path, "VALUE = 1\n")
    code = "import zmod; print(zmod.VALUE)"
    assert zygotes.run("--preload", "zmod", "-c", code, env=env).stdout == "1\n"
    path = lib / "zmod.py"
    before = path.stat()
    path.write_text("VALUE = 2\n")  # same size, and the same second as far as bytecode knows
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1000))
    assert zygotes.run("--preload", "zmod", "-c", code, env=env).stdout == "2\n"
    path.write_text("VALUE = 'three'\n")
    assert zygotes.run("--preload", "zmod", "-c", code, env=env).stdout == "three\n"
    (info,) = zygotes.daemon()["zygotes"]
    assert info["generation"] == 3
    assert "zmod.py changed" in zygotes.logs()


def test_a_failed_preload_is_retried_once_the_module_can_be_found(zygotes, tmp_path):
    lib, env = _module_env(zygotes, tmp_path, "", name="placeholder")
    code = "import later; print(later.X)"
    first = zygotes.run("--preload", "later", "-c", "print('plain')", env=env)
    assert first.stdout == "plain\n" and "running plain python" in first.stderr
    (lib / "later.py").write_text("X = 'found'\n")
    second = zygotes.run("--preload", "later", "-c", code, env=env)
    assert (second.stdout, second.stderr) == ("found\n", "")


def test_each_checkout_of_a_preloaded_package_gets_its_own_zygote(zygotes, tmp_path):
    for name in ("a", "b"):
        (tmp_path / name / "mypkg").mkdir(parents=True)
        (tmp_path / name / "mypkg" / "__init__.py").write_text(f"WHERE = {name!r}\n")
    code = "import mypkg; print(mypkg.WHERE)"
    for name in ("a", "b", "a"):
        out = zygotes.run("--preload", "mypkg", "-c", code, cwd=tmp_path / name)
        assert (out.stdout, out.stderr) == (f"{name}\n", "")
    assert len(zygotes.daemon()["zygotes"]) == 2
    elsewhere = zygotes.run("--preload", "mypkg", "-c", code, cwd=tmp_path)
    notice, *python_says = elsewhere.stderr.splitlines()
    assert "could not preload mypkg" in notice and "running plain python" in notice
    assert elsewhere.returncode == 1 and "No module named 'mypkg'" in python_says[-1]


def test_a_zygote_for_another_start_up_environment_is_replaced(zygotes, tmp_path):
    sock = zygotes.socket(zygotes.dir / "shared.sock")
    code = "import sys; print(sys.flags.hash_randomization)"
    first = zygotes.run("--socket", sock, *PRELOAD, "-c", code)
    old = zygotes.daemon()["pid"]
    env = dict(zygotes.env, PYTHONHASHSEED="0")
    second = zygotes.run("--socket", sock, *PRELOAD, "-c", code, env=env)
    assert (first.stdout, second.stdout, second.stderr) == ("1\n", "0\n", "")
    assert wait_gone([old], 30) == []
    assert zygotes.daemon()["pid"] != old


def test_the_idle_timeout_stops_the_zygote(zygotes):
    assert zygotes.run("--idle-timeout", "0.3", *PRELOAD, "-c", "pass").returncode == 0
    info = zygotes.daemon()
    assert info["idle_timeout"] == 0.3
    assert wait_gone([info["pid"]], 30) == []
    assert not list(zygotes.dir.glob("*.sock"))


def test_serve_starts_a_zygote_in_the_background_that_runs_then_use(zygotes):
    out = zygotes.cli("serve", *PRELOAD)
    assert out.returncode == 0, out.stderr
    assert "serving" in out.stdout and "json preloaded" in out.stdout
    pid = zygotes.daemon()["pid"]
    assert os.getsid(pid) == pid  # a session of its own: away from our terminal
    assert zygotes.run("--no-start", *PRELOAD, "-c", "print('via serve')").stdout == "via serve\n"
    again = zygotes.cli("serve", *PRELOAD)
    assert "already serving" in again.stdout and str(pid) in again.stdout
    status = zygotes.cli("status")
    assert f"zygote pid {pid}" in status.stdout and "1 runs" in status.stdout


def test_serve_reports_a_preload_that_fails(zygotes):
    out = zygotes.cli("serve", "--preload", "no_such_module_for_serve")
    assert out.returncode == 1
    assert "No module named 'no_such_module_for_serve'" in out.stdout
    assert "stopped it" in out.stdout and not list(zygotes.dir.glob("*.sock"))


def test_serve_in_the_foreground_logs_to_stderr_and_stops_when_idle(zygotes):
    proc = subprocess.Popen(zygotes.cmd("serve", "--foreground", *PRELOAD, "--idle-timeout", "1"),
                            env=zygotes.env, stderr=subprocess.PIPE, text=True)
    try:
        assert "listening on" in proc.stderr.readline()
        out = zygotes.run("--no-start", *PRELOAD, "-c", "print('fg')")
        assert out.stdout == "fg\n", out.stderr
        assert proc.wait(30) == 0
        assert "idle for 1 s: stopping" in proc.stderr.read()
    finally:
        proc.stderr.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_stop_lets_a_run_in_progress_finish(zygotes):
    proc, run_pid = _waiting_run(zygotes, "print('finished'); sys.exit(6)")
    daemon = zygotes.daemon()["pid"]
    out = zygotes.cli("stop")
    assert "1 run(s) finishing first" in out.stdout
    assert not list(zygotes.dir.glob("*.sock"))  # no new runs: the path is free at once
    stdout, _ = proc.communicate(b"go\n", timeout=30)
    assert (proc.returncode, stdout) == (6, b"finished\n")
    assert wait_gone([daemon], 30) == []


def test_stop_with_nothing_running_says_so(zygotes):
    out = zygotes.cli("stop")
    assert (out.returncode, out.stdout) == (0, "forkserver: no zygote was running\n")


def test_a_request_that_is_not_ours_gets_no_run(zygotes):
    assert zygotes.run(*PRELOAD, "-c", "pass").returncode == 0
    (path,) = zygotes.dir.glob("*.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        s.settimeout(30)
        reply = s.recv(1000)
    finally:
        s.close()
    assert reply[:1] == W.REPLACE and b"not a zygote request" in reply
    assert zygotes.run(*PRELOAD, "-c", "print('ok')").stdout == "ok\n"


def test_a_script_that_forks_a_subprocess_group_is_killed_whole_with_its_client(zygotes, tmp_path):
    code = textwrap.dedent(f"""\
        import subprocess, sys
        child = subprocess.Popen([{sys.executable!r}, "-c", "import time; time.sleep(120)"])
        print(child.pid, flush=True)
        child.wait()
        """)
    proc = subprocess.Popen(zygotes.cmd("run", *PRELOAD, "-c", code), stdout=subprocess.PIPE,
                            env=zygotes.env)
    try:
        grandchild = int(proc.stdout.readline())
        proc.kill()  # SIGKILL: no chance to forward anything
        proc.wait(30)
        assert wait_gone([grandchild], 30) == []  # the whole process group went
    finally:
        proc.stdout.close()


def test_a_zygote_that_never_answers_does_not_hang_the_client(zygotes, tmp_path):
    hung = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # accepts (backlog), never replies
    path = str(tmp_path / "hung.sock")
    hung.bind(path)
    hung.listen(1)
    env = dict(zygotes.env, FORKSERVER_REPLY_TIMEOUT="0.5")
    proc = subprocess.Popen(zygotes.cmd("run", "--socket", path, *PRELOAD, "-c", "print('plain')"),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.wait(30) == 0  # not EOF: the unread request still holds its stdio fds
    finally:
        hung.close()  # now the fds queued with the request go, and our pipes reach EOF
    out, err = proc.communicate(timeout=30)
    assert out == b"plain\n"
    assert b"did not answer within 0.5 s" in err and b"running plain python" in err


def test_a_zygote_template_that_died_is_rebuilt_and_runs_go_on(zygotes):
    assert zygotes.run(*PRELOAD, "-c", "pass").returncode == 0
    (template,) = zygotes.daemon()["zygotes"]
    os.kill(template["pid"], signal.SIGKILL)
    assert wait_gone([template["pid"]], 30) == []
    for i in range(3):  # its spare clone may serve one more; then a new template is built
        out = zygotes.run(*PRELOAD, "-c", f"print({i})")
        assert (out.returncode, out.stdout, out.stderr) == (0, f"{i}\n", "")
    (rebuilt,) = zygotes.daemon()["zygotes"]
    assert rebuilt["generation"] == 2 and rebuilt["pid"] != template["pid"]
    assert "building a new one" in zygotes.logs()


def test_each_preload_set_gets_its_own_zygote_side_by_side(zygotes):
    code = "import sys; print(sorted({'json', 'csv'} & set(sys.modules)))"
    assert zygotes.run("--preload", "json", "-c", code).stdout == "['json']\n"
    assert zygotes.run("--preload", "csv", "-c", code).stdout == "['csv']\n"
    assert zygotes.run("--preload", "csv,json", "-c", code).stdout == "['csv', 'json']\n"
    live = [s for s in zygotes.status() if not s.get("stale")]
    assert sorted(tuple(s["preload"]) for s in live) == [("csv",), ("csv", "json"), ("json",)]
    assert len({s["socket"] for s in live}) == len({s["pid"] for s in live}) == 3
