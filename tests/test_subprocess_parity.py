"""``spawn``/``run_program``/``Child`` as ``subprocess``: text mode, bufsize, executable, timeouts.

Adapted, in our own words, from CPython's ``Lib/test/test_subprocess.py``
(3.13): the parts about the options ``spawn`` shares with ``Popen`` --
``text``/``universal_newlines``/``encoding``/``errors``, ``bufsize``,
``executable`` -- and about timeouts (``communicate``, ``wait``, ``run``).
Where we differ on purpose the test says so (``TimeoutExpired.timeout`` is
always the timeout given; ``ReapedElsewhereError`` instead of a made-up 0
under SIGCHLD=SIG_IGN; ``check`` on a worker's ``wait()``).

Left out, and why:

* ``shell=``, string commands, ``list2cmdline``, Windows-only tests
  (``startupinfo``, ``creationflags``, ``ansi``/``oem`` encodings,
  ``_winapi`` waits): ``spawn`` runs no shell and is Linux only.
* ``preexec_fn``, ``user``/``group``/``extra_groups``/``umask``,
  ``close_fds=False``, ``restore_signals``, ``pipesize``: ``spawn`` has no such
  options (the program gets fds 0-2 and ``pass_fds`` only; signals are reset
  always, tested in test_spawn.py).
* ``Popen`` internals: ``_execute_child`` mocks, the ``_posixsubprocess``
  argument checks, ``vfork``/``posix_spawn`` selection, ``__del__`` warnings,
  the ``_fork_exec`` fd-order sanity checks.
* ``check_output``/``call``/``check_call``/``getoutput``: we offer only
  ``run_program`` (their tests that apply are ported onto it).
* ``test_no_leaking`` near ``RLIMIT_NOFILE`` and the fd leak on exec errors:
  covered by test_spawn.py (huge rlimit, ``no_leaks`` on every test).
* ``test_communicate_eintr`` (SIGALRM mid-``communicate``): PEP 475 retries
  ``poll``; ``test_run_abort``/KeyboardInterrupt grace: our interrupt safety is
  the reliability work's tests.
* ``test_sigchild_ignore``: subprocess reports 0 there; we raise
  ``ReapedElsewhereError`` (tested below).
"""
from __future__ import annotations

import io
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from subprocess import DEVNULL, PIPE

import pytest

import forkserver
from forkserver import Template

from .test_template import W

pytestmark = pytest.mark.usefixtures("no_leaks")

PY = sys.executable
BINARY_WRITER = (  # writes mixed line endings to its binary stdout
    "import sys\n"
    "buf = sys.stdout.buffer\n"
    "pieces = (b'line2\\n', b'line4\\n', b'line5\\r\\n', b'line6\\r', b'\\nline7', b'\\nline8')\n"
    "for piece in pieces:\n"
    "    buf.write(piece); buf.flush()\n"
)


def py(code):
    return [PY, "-c", code]


class FakePath:
    """An os.PathLike that is not a str, as CPython's tests use."""

    def __init__(self, path):
        self.path = path

    def __fspath__(self):
        return self.path


# -- text mode -------------------------------------------------------------------------


@pytest.mark.parametrize("option", ["universal_newlines", "text"])
def test_text_mode_pipes_read_and_write_str_with_newlines_translated(option):
    code = (
        "import sys\n"
        "buf = sys.stdout.buffer\n"
        "buf.write(sys.stdin.readline().encode()); buf.flush()\n"
        "buf.write(b'line2\\n'); buf.flush()\n"
        "buf.write(sys.stdin.read().encode()); buf.flush()\n"
        "buf.write(b'line4\\n'); buf.write(b'line5\\r\\n'); buf.write(b'line6\\r')\n"
        "buf.write(b'\\nline7'); buf.write(b'\\nline8')\n"
    )
    with forkserver.spawn(py(code), stdin=PIPE, stdout=PIPE, **{option: True}) as child:
        assert child.text_mode and child.universal_newlines and child.encoding
        child.stdin.write("line1\n")
        child.stdin.flush()
        assert child.stdout.readline() == "line1\n"
        child.stdin.write("line3\n")
        child.stdin.close()
        assert child.stdout.readline() == "line2\n"
        assert child.stdout.read(6) == "line3\n"
        assert child.stdout.read() == "line4\nline5\nline6\nline7\nline8"
    assert child.returncode == 0


def test_communicate_in_text_mode_returns_str_with_newlines_translated():
    child = forkserver.spawn(py(BINARY_WRITER), stdout=PIPE, stderr=PIPE, universal_newlines=1)
    out, err = child.communicate(timeout=30)
    assert (out, err) == ("line2\nline4\nline5\nline6\nline7\nline8", "")
    assert child.stdout.closed and child.stderr.closed


def test_communicate_in_text_mode_feeds_a_str_to_stdin_alone():
    code = textwrap.dedent(
        """
        import sys
        first = sys.stdin.readline()
        assert first == "line1\\n", repr(first)
        rest = sys.stdin.read()
        assert rest == "line3\\n", repr(rest)
        """
    )
    child = forkserver.spawn(py(code), stdin=PIPE, universal_newlines=True)
    assert child.communicate("line1\nline3\n", timeout=30) == (None, None)
    assert child.returncode == 0


def test_communicate_in_text_mode_with_no_input_closes_stdin():
    child = forkserver.spawn(["true"], stdin=PIPE, stdout=PIPE, text=True)
    assert child.communicate(timeout=30) == ("", None)
    assert child.returncode == 0 and child.stdin.closed


def test_communicate_in_text_mode_with_all_three_pipes():
    code = textwrap.dedent(
        """
        import sys
        line = sys.stdin.buffer.readline()
        sys.stdout.buffer.write(line + b"line2\\r")
        sys.stderr.buffer.write(b"eline2\\n")
        sys.stdout.buffer.write(sys.stdin.buffer.read() + b"line4\\nline5\\r\\n")
        sys.stderr.buffer.write(b"eline6\\reline7\\r\\nz")
        """
    )
    child = forkserver.spawn(
        py(code), stdin=PIPE, stdout=PIPE, stderr=PIPE, universal_newlines=True
    )
    out, err = child.communicate("line1\nline3\n", timeout=30)
    assert child.returncode == 0
    assert out == "line1\nline2\nline3\nline4\nline5\n"
    assert err.startswith("eline2\neline6\neline7\n")


@pytest.mark.parametrize("encoding", ["utf-16", "utf-32-be"])
def test_text_mode_decodes_wide_encodings_before_translating_newlines(encoding):
    code = f"import sys; sys.stdout.buffer.write('1\\r\\n2\\r3\\n4'.encode({encoding!r}))"
    child = forkserver.spawn(py(code), stdin=PIPE, stdout=PIPE, encoding=encoding)
    assert child.communicate(input="", timeout=30) == ("1\n2\n3\n4", None)
    assert child.encoding == encoding


@pytest.mark.parametrize(
    "errors, expected",
    [("ignore", ""), ("replace", "\ufffd\ufffd"), ("surrogateescape", "\udc80\udc80"),
     ("backslashreplace", "\\x80\\x80")],
)
def test_the_errors_handler_decodes_bad_bytes(errors, expected):
    code = "import sys; sys.stdout.buffer.write(b'[\\x80\\x80]')"
    child = forkserver.spawn(py(code), stdin=PIPE, stdout=PIPE, encoding="utf-8", errors=errors)
    assert child.communicate(input="", timeout=30)[0] == f"[{expected}]"
    assert child.errors == errors


@pytest.mark.parametrize(
    "options",
    [{"text": True}, {"universal_newlines": True}, {"encoding": "utf-8", "errors": "ignore"}],
)
def test_run_program_in_text_mode_without_input_gives_empty_stdin_and_str_output(options):
    done = forkserver.run_program(
        py("import sys; print('XX' if sys.stdin.read() else 'empty')"),
        input=None, stdin=DEVNULL, stdout=PIPE, timeout=30, **options,
    )
    assert done.stdout == "empty\n" and done.returncode == 0


def test_run_program_in_text_mode_takes_str_input_and_captures_str():
    done = forkserver.run_program(
        py("import sys; sys.stdout.write(sys.stdin.read().upper()); sys.stderr.write('é')"),
        input="pear", capture_output=True, encoding="utf-8", timeout=30,
    )
    assert (done.stdout, done.stderr) == ("PEAR", "é")


def test_check_in_text_mode_puts_str_output_on_the_error():
    with pytest.raises(forkserver.CalledProcessError) as info:
        forkserver.run_program(
            py("import sys; print('out'); sys.exit(3)"), capture_output=True, text=True,
            check=True, timeout=30,
        )
    assert (info.value.returncode, info.value.output) == (3, "out\n")


def test_text_and_universal_newlines_that_disagree_are_refused():
    with pytest.raises(subprocess.SubprocessError, match="disagree"):
        forkserver.spawn(["true"], text=True, universal_newlines=False)


def test_input_of_the_wrong_kind_is_a_type_error_that_says_which():
    with pytest.raises(TypeError, match="text mode input is a str"):
        forkserver.run_program(["cat"], input=b"bytes", text=True, timeout=30)
    with pytest.raises(TypeError, match="spawn with text=True"):
        forkserver.run_program(["cat"], input="str", timeout=30)


def test_an_unknown_encoding_raises_before_a_program_starts():
    with pytest.raises(LookupError):
        forkserver.spawn(["true"], stdout=PIPE, encoding="no-such-codec")


def test_the_default_text_encoding_warns_at_the_callers_line_under_warn_default_encoding():
    code = textwrap.dedent(
        """\
        import forkserver
        forkserver.run_program(["echo", "hello"], capture_output=True, text=True)
        """
    )
    out = subprocess.run(
        [PY, "-X", "warn_default_encoding", "-c", code], capture_output=True, timeout=60,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    if sys.version_info < (3, 10):
        assert out.returncode == 0 and b"EncodingWarning" not in out.stderr  # no such warning
        return
    lines = out.stderr.splitlines()
    assert lines and lines[0].startswith(b"<string>:2: EncodingWarning: "), lines


def test_a_stream_refuses_text_mode_rather_than_ignore_it():
    with pytest.raises(TypeError, match="codecs.iterdecode"):
        forkserver.stream(["echo", "hi"], text=True)


# -- bufsize -------------------------------------------------------------------------------


def test_pipes_are_buffered_by_default_and_raw_with_bufsize_0():
    for bufsize, kind in ((-1, io.BufferedIOBase), (None, io.BufferedIOBase), (0, io.RawIOBase)):
        with forkserver.spawn(["true"], stdin=PIPE, stdout=PIPE, stderr=PIPE, bufsize=bufsize) as c:
            assert all(isinstance(f, kind) for f in (c.stdin, c.stdout, c.stderr)), bufsize


def test_a_bufsize_that_is_no_integer_is_a_type_error():
    with pytest.raises(TypeError, match="bufsize must be an integer"):
        forkserver.spawn(["true"], bufsize="orange")


ECHO_LINE = py("import sys; sys.stdout.write(sys.stdin.readline()); sys.stdout.flush()")


def _line_back(line, text):
    """Write ``line`` with bufsize=1, drop stdin's fd without flushing, read what came back."""
    with forkserver.spawn(ECHO_LINE, stdin=PIPE, stdout=PIPE, stderr=DEVNULL, bufsize=1,
                          universal_newlines=text) as child:
        child.stdin.write(line)  # line buffering flushes it, in text mode only
        os.close(child.stdin.fileno())
        got = child.stdout.readline()
        try:
            child.stdin.close()
        except OSError:
            pass  # EBADF: its fd was closed above
        child.stdin = None
    assert child.returncode == 0
    return got


def test_bufsize_1_line_buffers_stdin_in_text_mode():
    assert _line_back("line\n", text=True) == "line\n"


def test_bufsize_1_in_binary_mode_warns_and_keeps_the_default_buffer():
    with pytest.warns(RuntimeWarning, match="line buffering"):
        assert _line_back(b"line\n", text=False) == b""


def test_an_unbuffered_stdout_leaves_unread_bytes_in_the_pipe_for_select():
    code = "import sys; sys.stdout.write('apple')"
    with forkserver.spawn(py(code), stdout=PIPE, bufsize=0) as child:
        assert child.stdout.read(4) == b"appl"
        assert child.stdout in select.select([child.stdout], [], [], 10)[0]


# -- executable -----------------------------------------------------------------------------


@pytest.mark.parametrize("convert", [str, os.fsencode, FakePath])
def test_executable_runs_in_place_of_argv0_which_the_program_still_sees(convert):
    fake = os.path.join(os.path.dirname(PY), "doesnotexist")
    done = forkserver.run_program(
        [fake, "-c", "import sys; print(sys.argv[0]); sys.exit(47)"], executable=convert(PY),
        stdout=PIPE, timeout=30,
    )
    assert done.returncode == 47


def test_executable_takes_precedence_over_argv0_and_names_itself_in_the_error():
    assert forkserver.run_program(py("pass"), timeout=30).returncode == 0
    with pytest.raises(FileNotFoundError) as info:
        forkserver.spawn(py("pass"), executable="/no/such/program-xyz")
    assert info.value.filename == "/no/such/program-xyz"


def test_an_executable_without_a_slash_is_searched_in_path_and_argv0_is_kept():
    done = forkserver.run_program(["pretend-name", "-c", 'echo "$0"'], executable="sh",
                                  capture_output=True, timeout=30)
    assert done.stdout == b"pretend-name\n"


def test_a_relative_executable_is_relative_to_the_programs_cwd(tmp_path):
    os.symlink("/bin/sh", tmp_path / "my-shell")
    done = forkserver.run_program(["x", "-c", "pwd"], executable="./my-shell", cwd=tmp_path,
                                  capture_output=True, text=True, timeout=30)
    assert done.stdout.strip() == os.path.realpath(tmp_path)


def test_a_bad_executable_raises_like_subprocess():
    with pytest.raises(OSError) as ours:
        forkserver.spawn([PY, "-c", ""], executable="/_this/pa.th/does/not/exist")
    with pytest.raises(OSError) as theirs:
        subprocess.Popen([PY, "-c", ""], executable="/_this/pa.th/does/not/exist")
    assert (ours.value.errno, ours.value.filename) == (theirs.value.errno, theirs.value.filename)
    assert type(ours.value) is type(theirs.value)


# -- timeouts ---------------------------------------------------------------------------------


def test_communicate_after_a_timeout_goes_on_and_returns_everything():
    code = (
        "import sys, time\n"
        "sys.stderr.write('pineapple\\n'); sys.stderr.flush()\n"
        "time.sleep(1)\n"
        "sys.stderr.write('pear\\n')\n"
        "sys.stdout.write(sys.stdin.read())\n"
    )
    child = forkserver.spawn(
        py(code), universal_newlines=True, stdin=PIPE, stdout=PIPE, stderr=PIPE
    )
    with pytest.raises(subprocess.TimeoutExpired) as info:
        child.communicate("banana", timeout=0.3)
    assert info.value.timeout == 0.3
    out, err = child.communicate(timeout=30)
    assert (out, err.encode()) == ("banana", b"pineapple\npear\n")


def test_communicate_times_out_while_output_flows_and_loses_none_of_it():
    code = (
        "import sys, time\n"
        "for _ in range(4):\n"
        "    sys.stdout.write('a' * 65536); sys.stdout.flush(); time.sleep(0.2)\n"
    )
    child = forkserver.spawn(py(code), stdout=PIPE)
    with pytest.raises(subprocess.TimeoutExpired) as info:
        child.communicate(timeout=0.4)
    assert info.value.output is None or set(info.value.output) <= {ord("a")}  # what came so far
    out, _ = child.communicate(timeout=30)
    assert len(out) == 4 * 65536


def test_wait_with_a_timeout_names_it_and_the_program_keeps_running():
    child = forkserver.spawn(py("import time; time.sleep(0.3)"))
    with pytest.raises(subprocess.TimeoutExpired) as info:
        child.wait(timeout=0.0001)
    assert "0.0001" in str(info.value) and info.value.timeout == 0.0001
    assert child.wait(timeout=30) == 0


@pytest.mark.parametrize("timeout", [-1, 0, 1])
def test_timeout_expired_carries_the_timeout_given_when_the_program_has_no_pipes(timeout):
    # subprocess itself reports the time *left* here; we report what was asked
    with pytest.raises(subprocess.TimeoutExpired) as info:
        forkserver.run_program(["sleep", "30"], timeout=timeout)
    assert info.value.timeout == timeout and info.value.output is None


def test_a_negative_timeout_on_wait_does_not_wait():
    child = forkserver.spawn(["sleep", "30"])
    try:
        with pytest.raises(subprocess.TimeoutExpired) as info:
            child.wait(-1)
        assert info.value.timeout == -1
    finally:
        child.kill()
        child.wait()


def test_run_program_timeout_kills_and_keeps_the_output_so_far():
    code = "import sys, time\nsys.stdout.write('BDFL'); sys.stdout.flush()\ntime.sleep(3600)\n"
    with pytest.raises(subprocess.TimeoutExpired) as info:
        forkserver.run_program(py(code), timeout=3, stdout=PIPE)
    assert info.value.output == info.value.stdout == b"BDFL"
    assert info.value.timeout == 3


def test_run_program_timeout_kills_a_busy_loop():
    with pytest.raises(subprocess.TimeoutExpired):
        forkserver.run_program(py("while True: pass"), timeout=0.1)


def test_run_program_timeout_is_bounded_when_a_grandchild_holds_the_pipes():
    # sh waits for its sleep, which inherited the pipes: they reach EOF only when it ends
    started = time.monotonic()
    try:
        with pytest.raises(subprocess.TimeoutExpired) as info:
            forkserver.run_program(
                ["/bin/sh", "-c", f"echo before; sleep {SLEEPER}; :"], timeout=0.3,
                capture_output=True,
            )
    finally:
        _kill_sleepers()  # the grandchild is no child of ours, and outlived sh
    elapsed = time.monotonic() - started
    assert elapsed < 30, f"TimeoutExpired came after {elapsed:.1f} s, not at the timeout"
    assert info.value.output == b"before\n" and info.value.timeout == 0.3


def test_run_program_timeout_is_bounded_when_a_grandchild_keeps_writing():
    # after the kill, what the pipes hold is collected -- not all a grandchild can still write
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired) as info:
        forkserver.run_program(["sh", "-c", "yes; :"], timeout=0.2, capture_output=True)
    assert time.monotonic() - started < 30
    assert info.value.output.startswith(b"y\ny\n")
    # yes dies of SIGPIPE at its next write: our ends of the pipes are closed


SLEEPER = "61.25"  # a sleep nothing else runs


def _kill_sleepers():
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        if proc.info["cmdline"] == ["sleep", SLEEPER]:
            proc.kill()


# -- Child.wait and check, lost statuses -------------------------------------------------------


def test_wait_raises_called_process_error_for_a_failed_worker_with_check():
    with Template().require(W) as tpl:
        child = tpl.fork().send_arg(3).run(f"{W}:exit_with", check=True)
        with pytest.raises(forkserver.CalledProcessError) as info:
            child.wait(timeout=30)
        assert info.value.returncode == 3 and info.value.cmd == f"{W}:exit_with"
        assert child.poll() == 3 and child.returncode == 3  # only wait() judges
        with pytest.raises(forkserver.CalledProcessError):
            child.wait()  # every time, as the status stays
        child.control.close()
        ok = tpl.fork().run(f"{W}:return_quietly", check=True)
        assert ok.wait(timeout=30) == 0
        ok.control.close()


def test_stop_of_a_checked_worker_returns_the_signal_status_without_raising():
    with Template().require(W) as tpl:
        child = tpl.fork().run(f"{W}:wait_for_eof", check=True)
        assert child.stop(grace=10) == -signal.SIGTERM
        child.control.close()


def test_an_exit_status_lost_to_sigchld_sig_ign_raises_a_public_error_naming_it():
    script = textwrap.dedent(
        """
        import signal, sys, forkserver
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)
        tpl = forkserver.Template().require("tests._workers")
        for child in (forkserver.spawn(["true"]), tpl.fork().run("tests._workers:return_quietly")):
            try:
                child.wait(timeout=30)
            except forkserver.ReapedElsewhereError as exc:
                print(type(exc).__module__, isinstance(exc, forkserver.ForkserverError))
                print(exc)
        tpl.close()
        """
    )
    out = subprocess.run(
        [PY, "-c", script], capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 4, out  # the program's and the worker's
    for first, message in (lines[:2], lines[2:]):
        assert first == "forkserver._errors True"
        assert "SIGCHLD is SIG_IGN" in message and "SIG_DFL" in message


def test_aio_spawn_takes_the_same_text_options():
    import asyncio

    import forkserver.aio as aio

    async def main():
        child = await aio.spawn(["printf", "a\\r\\nb"], stdout=PIPE, text=True)
        out = child.stdout.read()
        child.close()
        return out, await child.wait(timeout=30)

    out, code = asyncio.run(main())
    assert (out, code) == ("a\nb", 0)
