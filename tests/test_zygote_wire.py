"""The zygote's wire and client in isolation: records, keys, command lines, start-up cost.

The client is meant to be lean: ``forkserver run`` through the console
script imports neither argparse nor forkserver's parent side, and the
launcher (``python -IS``) imports ``_socket`` and this room's two modules
on the way to a warm zygote.  Those are checked by running them under
``python -X importtime``.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import forkserver
from forkserver import _protocol
from forkserver._zygote import _client, _wire as W
from tests._zygote import zygotes  # noqa: F401


def test_the_clients_copies_of_shared_constants_agree_with_forkserver():
    assert W.VERSION == forkserver.__version__
    assert W.THREAD_LIMIT_VARS == tuple(_protocol.THREAD_LIMIT_VARS)


def test_records_round_trip_and_a_partial_one_waits_for_the_rest():
    data = W.record(W.ARG, b"x") + W.record(W.ENV, b"A=\0b") + W.record(W.END)
    records, used = W.parse_records(data)
    assert records == [(W.ARG, b"x"), (W.ENV, b"A=\0b"), (W.END, b"")] and used == len(data)
    records, used = W.parse_records(data[:-3])
    assert records == [(W.ARG, b"x"), (W.ENV, b"A=\0b")] and used == len(data) - 5


def test_the_key_follows_start_up_variables_and_the_preload_set_only():
    base = {b"HOME": b"/root", b"PATH": b"/bin"}
    ident = W.identity(base)
    assert W.identity({**base, b"TERM": b"xterm", b"OLDPWD": b"/x"}) == ident
    for name in (b"PYTHONPATH", b"LC_ALL", b"LANG", b"OMP_NUM_THREADS", b"PYTHONHASHSEED"):
        assert W.identity({**base, name: b"1"}) != ident, name
    name = W.zygote_name(ident, ["numpy", "pandas"])
    assert name == W.zygote_name(ident, ["pandas", "numpy"])
    assert name != W.zygote_name(ident, ["numpy"])
    assert name.startswith(b"zygote-") and len(name) == 7 + 16


@pytest.mark.parametrize("argv, mode, target, args", [
    (["s.py", "-x", "--preload", "y"], b"path", "s.py", ["-x", "--preload", "y"]),
    (["--preload=a,b", "-m", "pkg.mod", "1"], b"module", "pkg.mod", ["1"]),
    (["-mpkg", "2"], b"module", "pkg", ["2"]),
    (["-c", "print(1)", "-c"], b"code", "print(1)", ["-c"]),
    (["--", "-weird-name.py", "a"], b"path", "-weird-name.py", ["a"]),
    (["--detach", "--no-start", "--socket", "/s", "-"], b"path", "-", []),
])
def test_run_command_lines_are_parsed_as_python_does(argv, mode, target, args):
    opts = _client.parse(argv)
    assert (opts.mode, opts.target, opts.args) == (mode, target, args)


def test_run_options_are_parsed():
    opts = _client.parse(["--preload", " numpy, ,pandas,numpy", "--socket", "/tmp/s.sock",
                          "--no-start", "--detach", "--idle-timeout", "2.5", "x.py"])
    assert (opts.preload, opts.socket, opts.start, opts.detach, opts.idle_timeout) == \
        (["numpy", "pandas"], b"/tmp/s.sock", False, True, 2.5)
    for bad in (["--idle-timeout", "-1", "x.py"], ["-X", "x.py"], ["--preload"], []):
        with pytest.raises(_client.UsageError):
            _client.parse(bad)


def _imported(stderr: str) -> set:
    """Module names from ``python -X importtime`` output."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip())
    return names


def test_the_launcher_imports_only_the_client_on_the_way_to_a_warm_zygote(zygotes, tmp_path):
    launcher = tmp_path / "pyz"
    out = zygotes.cli("launcher", str(launcher), "--preload", "json")
    assert out.returncode == 0, out.stderr
    shebang = launcher.read_text().splitlines()[0]
    assert shebang.startswith(f"#!{os.path.dirname(sys.executable)}/") and shebang.endswith(" -IS")
    first = subprocess.run([str(launcher), "-c", "print('hi')"], env=zygotes.env,
                           capture_output=True, text=True, timeout=60)
    assert (first.returncode, first.stdout) == (0, "hi\n"), first.stderr
    warm = subprocess.run([sys.executable, "-X", "importtime", "-IS", str(launcher), "-c",
                           "print('hi')"], env=zygotes.env, capture_output=True, text=True,
                          timeout=60)
    assert warm.stdout == "hi\n"
    startup = _imported(subprocess.run([sys.executable, "-X", "importtime", "-IS", "-c", "pass"],
                                       capture_output=True, text=True).stderr)
    assert _imported(warm.stderr) - startup == {"_socket", "_wire", "_client"}


def test_forkserver_run_imports_no_argparse_and_nothing_of_the_parent_side(zygotes):
    assert zygotes.run("--preload", "json", "-c", "pass").returncode == 0  # warm
    out = subprocess.run([sys.executable, "-X", "importtime", zygotes.cmd("run")[0], "run",
                          "--preload", "json", "-c", "pass"], env=zygotes.env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    names = _imported(out.stderr)
    assert "forkserver._zygote._client" in names
    heavy = {"argparse", "threading", "subprocess", "pickle", "forkserver._template",
             "forkserver._fds", "forkserver._bench._cli", "socket", "select"}
    assert names & (heavy - _startup_modules(zygotes.env)) == set()


def test_the_zygote_templates_child_module_imports_no_threading():
    # _child is preloaded into every zygote template: it must keep templates lean.
    with forkserver.Template.new_exec() as tpl:
        tpl.eval("import sys\nbefore = set(sys.modules)")
        tpl.require("forkserver._zygote._child")
        tpl.eval("bad = {'threading', 'subprocess', 'forkserver._template'} "
                 "& (set(sys.modules) - before)\nassert not bad, bad")


def test_a_zygote_template_has_no_threading_after_preloading(zygotes):
    code = "import sys; print(sorted({'threading', 'subprocess'} & set(sys.modules)))"
    out = zygotes.run("--preload", "json", "-c", code)  # what the run inherited from its zygote
    assert out.returncode == 0, out.stderr
    assert set(eval(out.stdout)) <= _startup_modules(zygotes.env)  # only what python itself loads


def _startup_modules(env) -> set:
    """The modules this interpreter has loaded before running any code of ours.

    Usually neither threading nor subprocess; but a ``.pth`` file in
    site-packages may import them at start-up (this machine's global
    interpreters do): that is not ours to avoid.
    """
    out = subprocess.run([sys.executable, "-c", "import sys; print(sorted(sys.modules))"],
                         env=env, capture_output=True, text=True, timeout=60, check=True)
    return set(eval(out.stdout))


def test_the_socket_directory_is_under_xdg_runtime_dir_when_that_is_ours(tmp_path):
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    assert W.runtime_dir({b"XDG_RUNTIME_DIR": bytes(xdg)}) == bytes(xdg / "forkserver")
    assert (xdg / "forkserver").stat().st_mode & 0o777 == 0o700


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a directory of another uid")
def test_an_xdg_runtime_dir_of_another_user_is_passed_over_for_tmp(tmp_path):
    xdg = tmp_path / "theirs"
    xdg.mkdir(mode=0o700)
    os.chown(xdg, 65534, 65534)  # as `sudo -E` keeps the invoking user's
    assert W.runtime_dir({b"XDG_RUNTIME_DIR": bytes(xdg)}) == b"/tmp/forkserver-0"
    assert not (xdg / "forkserver").exists()
