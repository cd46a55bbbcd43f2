"""Sphinx configuration: MyST Markdown pages, the furo theme, autodoc for the reference.

Build (warnings are errors):  python -m sphinx -W --keep-going -b html docs docs/_build/html
"""
from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # bench_chart
sys.path.insert(0, os.path.dirname(HERE))  # forkserver, when it is not installed

import bench_chart  # noqa: E402

import forkserver  # noqa: E402
from forkserver._bench._cli import TYPICAL_RUN  # noqa: E402

project = "forkserver"
author = "the forkserver developers"
copyright = "2026, the forkserver developers"
release = forkserver.__version__

extensions = ["myst_parser", "sphinx.ext.autodoc"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_generated/*.md", "Thumbs.db", ".DS_Store"]

myst_enable_extensions = ["colon_fence", "deflist", "substitution"]
myst_heading_anchors = 3
# Facts stated once, in the code, and shown here: {{ bench_duration }}.
myst_substitutions = {"bench_duration": TYPICAL_RUN.replace("--quick", "`--quick`")}

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
maximum_signature_line_length = 88  # longer signatures get one parameter a line
autodoc_default_options = {"members": True}

html_theme = "furo"
html_title = f"forkserver {release}"
html_static_path = []

# The benchmark chart is drawn from the saved run at every build, so the
# chart and the table on docs/benchmarks.md always come from the same data.
bench_chart.draw(os.path.join(HERE, "_data", "bench.json"), os.path.join(HERE, "_generated", "bench.svg"))
