"""The documentation covers the public API, and its facts agree with the code.

The Sphinx build itself (``python -m sphinx -W``) runs in ``.ci/run``; these
checks are quick and run with the suite on every interpreter.
"""
from __future__ import annotations

import re
import subprocess
import sys

from ._snippets import ROOT

DOCS = ROOT / "docs"
_AUTODOC = re.compile(r"^\.\. auto(?:class|function|exception|data|attribute)::\s+(\S+?)(?:\(|$)", re.M)


def documented_names():
    """Every name an autodoc directive of docs/*.md renders (``forkserver.X``)."""
    names = set()
    for page in DOCS.rglob("*.md"):
        if "_build" not in page.parts:
            names |= set(_AUTODOC.findall(page.read_text()))
    return names


PUBLIC_MODULES = ["forkserver", "forkserver.aio", "forkserver.worker"]  # those that exist


def _public_modules():
    import importlib

    found = {}
    for name in PUBLIC_MODULES:
        try:
            found[name] = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
    return found


def test_every_public_name_is_in_the_reference():
    public = {f"{mod}.{n}" for mod, module in _public_modules().items() for n in module.__all__}
    assert "forkserver.Template" in public and "forkserver.aio.run" in public
    missing = sorted(public - documented_names())
    assert not missing, (
        f"public names without an autodoc entry in docs/: {missing}; add them to "
        "docs/reference.md (or to the capability page that documents them)"
    )


def test_the_documented_names_exist():
    modules = _public_modules()
    for name in documented_names():
        module, _, attr = name.rpartition(".")
        assert module in modules and hasattr(modules[module], attr), name


def test_the_bench_duration_is_stated_once_and_shown_by_its_help():
    from forkserver._bench._cli import TYPICAL_RUN

    helptext = subprocess.run(
        [sys.executable, "-m", "forkserver", "bench", "--help"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    assert TYPICAL_RUN.split(" (")[0] in " ".join(helptext.split())
    assert "{{ bench_duration }}" in (DOCS / "benchmarks.md").read_text()
    # No other page or the README states a duration of its own for the bench.
    pattern = re.compile(r"forkserver bench[^\n]*\babout \d+ ?s\b")
    for page in [ROOT / "README.md", *DOCS.rglob("*.md")]:
        assert not pattern.search(page.read_text()), f"{page}: state the bench duration only in _bench/_cli.py"


def test_no_page_points_at_a_design_file_the_repository_does_not_have():
    for page in [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *DOCS.rglob("*.md")]:
        if page.exists():
            assert "DESIGN.md" not in page.read_text(), page
