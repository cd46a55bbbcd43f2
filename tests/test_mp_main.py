"""forkserver.mp_context() and the main module: functions of a script work as under spawn.

Each test runs a script in a fresh interpreter.  multiprocessing's rule for
spawn and forkserver: the child imports the parent's main module under the
name ``__mp_main__`` (by path, or by module name for ``python -m``), so its
``if __name__ == "__main__":`` block does not run there.  Our context
imports it once, into the template; every child then finds it in place.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

TIMEOUT = 60

HEADER = """\
import os, sys
import forkserver

with open(os.environ["MARK"], "a") as _f:
    _f.write(f"top {__name__} {os.getpid()}\\n")
"""

WORK = """
def work(q):
    q.put((__name__, os.getpid()))


def run_three(ctx):
    q = ctx.Queue()
    procs = [ctx.Process(target=work, args=(q,)) for _ in range(3)]
    for p in procs:
        p.start()
    names = sorted({q.get(timeout=30)[0] for _ in procs})
    for p in procs:
        p.join(30)
    print(names, [p.exitcode for p in procs])
"""


def run_script(tmp_path, body, *args, module=None):
    """Write the script (or ``pkg.<module>``), run it; (stdout, stderr, marks)."""
    mark = tmp_path / "marks"
    source = HEADER + textwrap.dedent(body)
    if module:
        pkg = tmp_path / "pkg"
        pkg.mkdir()
        (pkg / "__init__.py").write_text("")
        (pkg / f"{module}.py").write_text(source)
        argv = [sys.executable, "-m", f"pkg.{module}", *args]
    else:
        (tmp_path / "script.py").write_text(source)
        argv = [sys.executable, str(tmp_path / "script.py"), *args]
    env = {**os.environ, "MARK": str(mark)}
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    marks = mark.read_text().splitlines() if mark.exists() else []
    return proc.stdout, proc.stderr, marks


def tops(marks):
    return [line.split()[1] for line in marks if line.startswith("top ")]


def test_functions_of_the_main_script_run_in_children_and_the_guard_does_not(tmp_path):
    out, err, marks = run_script(tmp_path, WORK + """
if __name__ == "__main__":
    with forkserver.mp_context() as ctx:
        run_three(ctx)
    with open(os.environ["MARK"], "a") as f:
        f.write("guard\\n")
""")
    assert out.strip() == "['__mp_main__'] [0, 0, 0]", err
    # Run here, and once in the template for every child (spawn: once per child).
    assert tops(marks) == ["__main__", "__mp_main__"]
    assert marks.count("guard") == 1


def test_the_main_module_run_with_dash_m_is_imported_by_name(tmp_path):
    out, err, marks = run_script(tmp_path, WORK + """
if __name__ == "__main__":
    with forkserver.mp_context() as ctx:
        run_three(ctx)
""", module="mod")
    assert out.strip() == "['__mp_main__'] [0, 0, 0]", err
    assert tops(marks) == ["__main__", "__mp_main__"]


def test_a_process_pool_executor_runs_functions_of_the_main_script(tmp_path):
    out, err, _ = run_script(tmp_path, """
from concurrent.futures import ProcessPoolExecutor


def square(x):
    return x * x


if __name__ == "__main__":
    with ProcessPoolExecutor(2, mp_context=forkserver.mp_context()) as ex:
        print(list(ex.map(square, range(6))))
""")
    assert out.strip() == "[0, 1, 4, 9, 16, 25]", err


def test_a_context_made_at_the_top_of_the_script_is_built_only_in_the_parent(tmp_path):
    # In the template (and in children) the module-level mp_context() builds
    # nothing until it is used: no template inside the template.
    out, err, marks = run_script(tmp_path, WORK + """
CTX = forkserver.mp_context()
with open(os.environ["MARK"], "a") as _f:
    _f.write(f"built {__name__} {CTX._root is not None}\\n")

if __name__ == "__main__":
    run_three(CTX)
""")
    assert out.strip() == "['__mp_main__'] [0, 0, 0]", err
    built = sorted(m.split()[1:] for m in marks if m.startswith("built"))
    assert built == [["__main__", "True"], ["__mp_main__", "False"]]


def test_a_main_module_that_starts_a_thread_is_imported_by_each_child_with_a_warning(tmp_path):
    out, err, marks = run_script(tmp_path, WORK + """
import threading
threading.Thread(target=threading.Event().wait, daemon=True).start()

if __name__ == "__main__":
    with forkserver.mp_context() as ctx:
        run_three(ctx)
""")
    assert out.strip() == "['__mp_main__'] [0, 0, 0]", err
    assert "could not be imported into the template (ThreadedTemplateError" in err
    # Here, the template's attempt, then each child's own import (as under spawn).
    assert tops(marks) == ["__main__"] + ["__mp_main__"] * 4


def test_starting_a_process_outside_the_guard_fails_in_the_child_as_under_spawn(tmp_path):
    out, err, _ = run_script(tmp_path, WORK + """
ctx = forkserver.mp_context()
p = ctx.Process(target=work, args=(ctx.Queue(),))
p.start()
p.join(30)
if __name__ == "__main__":
    print("exitcode", p.exitcode)
""")
    assert out.strip() == "exitcode 1", err
    assert "bootstrapping phase" in err


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_the_same_scripts_give_the_same_answers_under_the_standard_methods(tmp_path, method):
    # The reference behaviour the tests above compare with.
    out, err, marks = run_script(tmp_path, WORK + f"""
if __name__ == "__main__":
    import multiprocessing
    run_three(multiprocessing.get_context({method!r}))
""")
    assert out.strip() == "['__mp_main__'] [0, 0, 0]", err
    assert tops(marks)[0] == "__main__" and set(tops(marks)[1:]) == {"__mp_main__"}
