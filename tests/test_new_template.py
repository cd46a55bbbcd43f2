"""What a new ``Template()`` costs and finds: its set-up imports nothing, yet finds new modules.

CPython 3.13's ``importlib.invalidate_caches()`` imports ``importlib.metadata``
(and with it ``email``, ``zipfile``, ``pathlib``, ``threading``...): a new
template called it while adopting the caller's ``sys.path``, and paid ~20 ms
on its first command.  No timing here (see ``python -m forkserver bench
--only first_reply``): the tests check what is imported and what is found.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from forkserver import Template
from forkserver._template import default_template

from .test_template import W, talk

pytestmark = pytest.mark.usefixtures("no_leaks")


def test_a_new_template_imports_no_module_its_default_template_lacks():
    base = default_template()
    with base._lock:  # a plain clone of the default template: no SETUP, as Template() has
        clone, _ = base._clone()
    try:
        clone.require(W)
        before, _ = talk(clone.run(f"{W}:module_names"))
    finally:
        clone.close()
    with Template().require(W) as tpl:
        after, _ = talk(tpl.run(f"{W}:module_names"))
    assert sorted(set(after) - set(before)) == []


def test_a_new_template_finds_a_module_written_just_before_in_a_new_directory(
    tmp_path, monkeypatch
):
    default_template().pid  # started before the directory exists
    Template().close()
    fresh = tmp_path / "made_later"
    fresh.mkdir()
    (fresh / "late_module_for_setup.py").write_text("VALUE = 42\n")
    monkeypatch.syspath_prepend(str(fresh))
    with Template().require("late_module_for_setup", W) as tpl:
        tpl.eval("V = late_module_for_setup.VALUE")
        got, code = talk(tpl.fork().send_arg("V").run(f"{W}:namespace_get"))
    assert (got, code) == ([42], 0)


PROBE = textwrap.dedent(
    """
    import importlib.machinery, os, sys
    from forkserver._server._setup import refresh_import_caches

    sys.path_importer_cache["/no/such/dir"] = None      # a "not a directory" entry
    sys.path_importer_cache["relative/entry"] = None
    finder = importlib.machinery.FileFinder(os.getcwd())
    sys.path_importer_cache[os.getcwd()] = finder
    finder._path_mtime = 12345                          # its listing is cached
    refresh_import_caches()
    assert "/no/such/dir" not in sys.path_importer_cache
    assert "relative/entry" not in sys.path_importer_cache
    assert finder._path_mtime == -1                     # forgotten: listed again on next import
    assert "importlib.metadata" not in sys.modules, "invalidating imported importlib.metadata"
    import importlib.metadata                           # once loaded, as invalidate_caches()
    if sys.version_info >= (3, 13):                     # 3.13+ clears its cache too
        importlib.metadata.FastPath("/")
        refresh_import_caches()
        assert importlib.metadata.FastPath.__new__.cache_info().currsize == 0
    print("ok")
    """
)


def test_refreshing_the_import_caches_drops_stale_entries_without_importing_metadata(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert out.stdout.strip() == "ok", out.stderr


def test_templates_are_still_made_after_the_default_templates_directory_was_removed(tmp_path):
    # The default template's spares rehearse SETUP with its own directory: gone, it must not matter.
    script = textwrap.dedent(
        """
        import os, tempfile, forkserver
        gone = tempfile.mkdtemp(dir=os.environ["WHERE"])
        os.chdir(gone)
        forkserver.Template().close()   # the default template starts in `gone`
        os.chdir("/")
        os.rmdir(gone)
        for _ in range(3):
            with forkserver.Template() as t:
                t.eval("x = 1")
                t.fork().close()
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
        env={**os.environ, "WHERE": str(tmp_path), "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert out.stdout.strip() == "ok", out.stderr
