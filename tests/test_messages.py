"""Error messages a new user meets: each says what happened, in the user's terms, and what to do."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import forkserver
from forkserver import Template, ThreadedTemplateError

from .test_template import W, finish

pytestmark = pytest.mark.usefixtures("no_leaks")


def test_early_in_a_threaded_program_speaks_of_the_program_and_its_threads():
    script = textwrap.dedent(
        """
        import threading, forkserver
        stop = threading.Event()
        threading.Thread(target=stop.wait, name="busy-helper").start()
        try:
            forkserver.early()
        except forkserver.ThreadedTemplateError as exc:
            print(exc)
        finally:
            stop.set()
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    message = out.stdout
    assert out.returncode == 0, out.stderr
    assert "early() must be called before any thread starts" in message
    assert "busy-helper" in message and "this program already runs 2 threads" in message
    assert "template process" not in message and "modules you require" not in message
    assert issubclass(ThreadedTemplateError, forkserver.ForkserverError)


def test_a_main_target_without_early_points_to_early():
    with Template() as tpl:
        with pytest.raises(AttributeError, match=r"forkserver\.early\(\)") as info:
            tpl.fork().run("__main__:f")
        assert "not your program's main script" in str(info.value)


def test_stderr_stdout_sends_the_templates_stderr_where_its_stdout_goes():
    r, w = os.pipe()
    try:
        with Template(stdout=w, stderr=subprocess.STDOUT) as tpl:
            os.close(w)
            w = -1
            tpl.eval("import os; os.write(1, b'out+'); os.write(2, b'err')")
        assert os.read(r, 100) == b"out+err"
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_stderr_stdout_follows_an_inherited_stdout_too(capfd):
    with Template(stderr=subprocess.STDOUT) as tpl:
        tpl.eval("import os; os.write(2, b'to stderr')")
    out, err = capfd.readouterr()
    assert "to stderr" in out and "to stderr" not in err


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"stdout": subprocess.PIPE}, r"Template\(stdout=subprocess\.PIPE\): a template has no"),
        ({"stdin": subprocess.STDOUT}, r"STDOUT is only valid for stderr"),
        ({"stderr": -5}, r"Template\(stderr=-5\): not an fd"),
    ],
)
def test_a_subprocess_constant_a_template_cannot_honour_is_refused_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Template(**kwargs)


def test_a_missing_target_module_names_the_run_and_the_module():
    with Template() as tpl:  # no spare yet: the fork and the run travel as one command
        expected = r"run\('nomod_xyz:f'\): no module named 'nomod_xyz'"
        with pytest.raises(ModuleNotFoundError, match=expected) as info:
            tpl.fork().run("nomod_xyz:f")
        assert info.value.name == "nomod_xyz"
        header = str(info.value.__cause__).splitlines()[0]
        assert "during run('nomod_xyz:f')" in header and "fork()" not in header
        with pytest.raises(ModuleNotFoundError, match="no module named 'nomod_xyz'"):
            tpl.run("nomod_xyz:f")  # not fused: the same words
        assert finish(tpl.require(W).run(f"{W}:return_quietly")) == 0


def test_a_target_module_that_fails_inside_keeps_its_own_error(tmp_path, monkeypatch):
    (tmp_path / "imports_a_missing_one.py").write_text("import missing_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with Template() as tpl:
        with pytest.raises(ModuleNotFoundError) as info:
            tpl.fork().run("imports_a_missing_one:f")
    assert info.value.name == "missing_dependency_xyz"
    assert "run(" not in str(info.value)  # the module's own import error, untouched
