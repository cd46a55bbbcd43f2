"""Every ```python block of README.md and docs/**/*.md runs (CONTRIBUTING.md, "Snippets").

The blocks of one page run in order in one fresh interpreter, sharing their
globals, with the working directory a temporary copy of ``tests/snippets/``
(the stand-in modules ``mypkg``, ``myserver``, ... that snippets import).  A
block preceded on the line just before its fence by
``<!-- snippet: no-run (reason) -->`` is skipped; the reason is required.
A block preceded by ``<!-- snippet: file NAME -->`` is written to ``NAME`` in
the working directory instead (a module the page has the reader save).  A
page must also leave no process running.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
from typing import Tuple

import pytest

from ._snippets import ROOT, STAND_INS, pages, parse

RUNNER = pathlib.Path(__file__).resolve().parent / "_snippet_runner.py"
# A hang guard, not a speed check: pages are written to finish in a few seconds.
PAGE_TIMEOUT = 90


def run_page(page: pathlib.Path, workdir: pathlib.Path) -> "subprocess.CompletedProcess[str]":
    """Run ``page``'s snippets in a fresh interpreter, in a copy of the stand-ins."""
    shutil.copytree(STAND_INS, workdir, dirs_exist_ok=True)
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # the page sees what a user's script would see
    return subprocess.run(
        [sys.executable, str(RUNNER), str(page)], cwd=workdir, env=env,
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=PAGE_TIMEOUT,
    )


def _runnable_pages():
    out = []
    for page in pages():
        blocks, _ = parse(page)
        if any(b.skip is None for b in blocks):
            out.append(pytest.param(page, id=str(page.relative_to(ROOT))))
    return out


@pytest.mark.parametrize("page", _runnable_pages())
def test_every_snippet_of_the_page_runs(page, tmp_path):
    done = run_page(page, tmp_path / "work")
    assert done.returncode == 0, f"{page.relative_to(ROOT)}:\n{done.stdout}\n{done.stderr}"


def test_every_no_run_marker_gives_a_reason_and_every_python_block_is_fenced_as_python():
    problems = [p for page in pages() for p in parse(page)[1]]
    assert not problems, "\n".join(problems)


def test_the_readme_and_the_docs_have_snippets_to_run():
    # The collector must find something: an empty list would pass everything above.
    names = {str(p.values[0].relative_to(ROOT)) for p in _runnable_pages()}
    assert "README.md" in names and "docs/tutorial.md" in names


# -- the checker itself can fail ------------------------------------------------


def _page(tmp_path: pathlib.Path, text: str) -> pathlib.Path:
    page = tmp_path / "page.md"
    page.write_text(textwrap.dedent(text))
    return page


def _run(tmp_path: pathlib.Path, text: str) -> Tuple[int, str]:
    done = run_page(_page(tmp_path, text), tmp_path / "work")
    return done.returncode, done.stdout + done.stderr


def test_a_broken_snippet_fails_and_names_its_page_and_line(tmp_path):
    code, out = _run(tmp_path, """\
        # A page

        ```python
        x = 1
        ```

        ```python
        assert x == 2, "x is not 2"
        ```
        """)
    assert code == 1
    assert "page.md:8" in out and "x is not 2" in out  # the failing line, in the page


def test_blocks_share_globals_in_order_and_no_run_blocks_are_skipped(tmp_path):
    code, out = _run(tmp_path, """\
        ```python
        import mypkg.model
        seen = ["first"]
        ```

        <!-- snippet: no-run (it would fail) -->
        ```python
        raise SystemExit(7)
        ```

        ```bash
        exit 9
        ```

        ```python
        seen.append("second")
        assert seen == ["first", "second"]
        ```
        """)
    assert code == 0, out


def test_a_page_that_leaves_a_process_running_fails(tmp_path):
    code, out = _run(tmp_path, """\
        ```python
        import subprocess
        left = subprocess.Popen(["sleep", "60"])
        ```
        """)
    assert code == 2
    assert "left processes running" in out and "sleep" in out


def test_a_marker_without_a_reason_or_away_from_its_fence_is_reported(tmp_path):
    page = _page(tmp_path, """\
        <!-- snippet: no-run -->
        ```python
        pass
        ```

        <!-- snippet: no-run (stray) -->

        <!-- snippet: nope -->
        ```python
        pass
        ```

        ```py
        pass
        ```
        """)
    blocks, problems = parse(page)
    assert [b.skip for b in blocks] == ["", None]
    assert len(problems) == 4, problems
    assert "gives no reason" in problems[0]
    assert "fenced as 'py'" in problems[1]
    assert "not directly above a fence" in problems[2]
    assert "unknown snippet marker" in problems[3]


def test_a_file_block_is_written_where_the_page_says_and_can_be_imported(tmp_path):
    code, out = _run(tmp_path, """\
        Save this as `greeting.py`:

        <!-- snippet: file greeting.py -->
        ```python
        WORD = "hello"
        ```

        ```python
        import greeting
        assert greeting.WORD == "hello"
        ```
        """)
    assert code == 0, out
