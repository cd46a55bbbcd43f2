"""The template namespace, ``forkserver.template``: require binds, eval runs, forks and workers see.

AnyEvent::Fork's idiom: what ``require`` and ``eval`` put in a template is
there in every fork, and ``run("name")`` calls a function ``eval`` defined.
"""
from __future__ import annotations

import textwrap

import pytest

from forkserver import Template

from .test_template import W, finish, talk

pytestmark = pytest.mark.usefixtures("no_leaks")

HANDLER = """
import os, pickle
from tests._workers import send_obj

def handler(control, *args):
    send_obj(control, (args, __name__, handler.__module__, os.getpid()))
"""


def test_require_binds_the_top_package_in_the_namespace_as_import_would():
    with Template().require("json.decoder", W) as tpl:
        tpl.eval("NAME = json.decoder.JSONDecoder.__name__; TOP = json.__name__")  # no import here
        got, code = talk(tpl.fork().send_arg("NAME", "TOP").run(f"{W}:namespace_get"))
    assert (got, code) == (["JSONDecoder", "json"], 0)


def test_the_readme_idiom_require_then_eval_a_model_that_workers_read(tmp_path, monkeypatch):
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "model.py").write_text(
        "def load(path):\n    return {'weights': path}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with Template() as tpl:
        tpl.require("mypkg.model", W)
        tpl.eval("MODEL = mypkg.model.load(args[0])", "weights.bin")
        got, code = talk(tpl.fork().send_arg("MODEL").run(f"{W}:namespace_get"))
    assert (got, code) == ([{"weights": "weights.bin"}], 0)


@pytest.mark.parametrize(
    "target", ["handler", "forkserver.template:handler", "forkserver.template.handler"]
)
def test_a_function_defined_by_eval_runs_in_a_fork_by_its_name(target):
    with Template() as tpl:
        tpl.eval(HANDLER)
        child = tpl.fork().send_arg(1, "two").run(target)
        (args, name, module, pid), code = talk(child)
    assert code == 0 and args == (1, "two") and pid == child.pid
    assert name == module == "forkserver.template"


def test_eval_defined_functions_and_classes_pickle_by_reference_in_workers():
    source = textwrap.dedent(
        """
        import dataclasses, pickle
        from tests._workers import send_obj

        @dataclasses.dataclass
        class Point:
            x: int
            y: int

        def roundtrip(control):
            again = pickle.loads(pickle.dumps((Point(1, 2), roundtrip)))
            send_obj(control, (again[0] == Point(1, 2), again[1] is roundtrip))
        """
    )
    with Template().eval(source) as tpl:
        got, code = talk(tpl.fork().run("roundtrip"))
    assert (got, code) == ((True, True), 0)


def test_forks_inherit_the_namespace_and_a_later_eval_does_not_reach_them():
    with Template().require(W) as tpl:
        tpl.eval("COUNT = 1")
        before = tpl.fork()
        tpl.eval("COUNT += 1")
        got_before, _ = talk(before.send_arg("COUNT").run(f"{W}:namespace_get"))
        got_after, _ = talk(tpl.fork().send_arg("COUNT").run(f"{W}:namespace_get"))
    assert (got_before, got_after) == ([1], [2])


def test_the_namespace_is_the_module_in_sys_modules_and_eval_sees_it_as_globals():
    with Template() as tpl:
        tpl.eval(
            "import sys\n"
            "assert sys.modules['forkserver.template'].__dict__ is globals()\n"
            "assert __name__ == 'forkserver.template'\n"
            "import forkserver\n"
            "assert forkserver.template is sys.modules['forkserver.template']\n"
        )


def test_a_bare_name_eval_did_not_define_raises_with_advice_and_the_template_stays_usable():
    with Template().eval(HANDLER) as tpl:
        with pytest.raises(AttributeError, match=r"eval\('def nothere\(control"):
            tpl.fork().run("nothere")
        with pytest.raises(AttributeError, match="namespace"):
            tpl.run("nothere")  # not fused with a fork: the same message
        (args, *_), code = talk(tpl.fork().run("handler"))
    assert code == 0 and args == ()


def test_in_the_callers_process_the_module_explains_where_the_namespace_lives():
    import forkserver.template as here

    with pytest.raises(AttributeError, match="namespace of a template process"):
        here.MODEL
    assert not hasattr(here, "__wrapped__")  # dunder probes are plain misses
    assert "require" in here.__doc__


def test_run_of_a_function_object_still_names_its_module():
    # the namespace changes nothing for module-level functions
    from . import _workers

    with Template().require(W) as tpl:
        assert finish(tpl.fork().run(_workers.return_quietly)) == 0


def test_an_exec_d_templates_main_is_not_the_namespace():
    with Template() as tpl:
        tpl.eval("import __main__, sys\nassert __main__ is not sys.modules['forkserver.template']")
