"""Find the Python snippets of README.md and docs/**/*.md (used by test_snippets.py and the runner).

A snippet is a fenced block whose info string is exactly ``python``.  A block
preceded, on the line just before its fence, by
``<!-- snippet: no-run (reason) -->`` is not run; the reason is required.
One preceded by ``<!-- snippet: file NAME -->`` is not run either: it is
written to ``NAME`` in the working directory at that point of the page (a
module the page tells the reader to save, then imports).
Other spellings of a Python block (``py``, ``{code-block} python``, ...)
are reported, so that no Python code escapes the test by its fence.
"""
from __future__ import annotations

import pathlib
import re
from typing import List, NamedTuple, Optional, Tuple

ROOT = pathlib.Path(__file__).resolve().parent.parent
STAND_INS = ROOT / "tests" / "snippets"

_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
_ANY_MARKER = re.compile(r"^\s*<!--\s*snippet:")
_MARKER = re.compile(r"^\s*<!--\s*snippet:\s*no-run\b(?P<rest>.*?)-->\s*$")
_FILE = re.compile(r"^\s*<!--\s*snippet:\s*file\s+(?P<name>[\w.-]+(/[\w.-]+)*)\s*-->\s*$")
_REASON = re.compile(r"^\s*\((?P<reason>[^()]*\S[^()]*)\)\s*$")
_DISGUISED = re.compile(r"^(py|python3|pycon|ipython|\{(code|code-block|code-cell|sourcecode)\}\s+py(thon)?3?)$")


class Block(NamedTuple):
    """One ```python block: where it starts (1-based line of its first code line) and its code."""

    path: pathlib.Path
    line: int
    code: str
    skip: Optional[str]  # the no-run reason, or None: it runs
    file: Optional[str] = None  # written to this file instead of run


def pages() -> List[pathlib.Path]:
    """README.md and every Markdown page of docs/ (not the build output)."""
    docs = ROOT / "docs"
    found = [ROOT / "README.md"]
    found += sorted(p for p in docs.rglob("*.md") if "_build" not in p.relative_to(docs).parts)
    return found


def parse(path: pathlib.Path) -> Tuple[List[Block], List[str]]:
    """The page's python blocks in order, and the problems found (each names its line)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: List[Block] = []
    problems: List[str] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = len(m["indent"]), m["fence"], m["info"].strip()
        end = i + 1
        while end < len(lines):
            close = _FENCE.match(lines[end])
            if close and close["fence"].startswith(fence[0] * len(fence)) and not close["info"].strip():
                break
            end += 1
        body = [line[indent:] if line[:indent].strip() == "" else line for line in lines[i + 1 : end]]
        where = f"{_name(path)}:{i + 1}"
        before = lines[i - 1] if i > 0 else ""
        marker, file = _MARKER.match(before), _FILE.match(before)
        if info == "python":
            skip = None
            if file:
                blocks.append(Block(path, i + 2, "\n".join(body) + "\n", None, file["name"]))
                i = end + 1
                continue
            if marker:
                reason = _REASON.match(marker["rest"])
                if reason is None:
                    problems.append(f"{where}: the no-run marker gives no reason: write "
                                    "<!-- snippet: no-run (why it cannot run) -->")
                    skip = ""
                else:
                    skip = reason["reason"].strip()
            blocks.append(Block(path, i + 2, "\n".join(body) + "\n", skip))
        else:
            if marker or file:
                problems.append(f"{where}: a snippet marker before a {info or 'plain'} block "
                                "(only ```python blocks are run or written: remove the marker)")
            if _DISGUISED.match(info):
                problems.append(f"{where}: a Python block fenced as {info!r}: fence it as ```python "
                                "so the snippet test runs it (or mark it no-run with a reason)")
        i = end + 1
    for n, line in enumerate(lines):
        if not _ANY_MARKER.match(line):
            continue
        if not (_MARKER.match(line) or _FILE.match(line)):
            problems.append(f"{_name(path)}:{n + 1}: unknown snippet marker {line.strip()!r} (use "
                            "<!-- snippet: no-run (reason) --> or <!-- snippet: file NAME -->)")
        elif not (n + 1 < len(lines) and _FENCE.match(lines[n + 1])):
            problems.append(f"{_name(path)}:{n + 1}: a snippet marker not directly above a fence")
    return blocks, problems


def _name(path: pathlib.Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)
