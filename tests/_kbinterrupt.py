"""Inject a KeyboardInterrupt at every line of a call, one line per run (sys.settrace).

``interrupt_at(n, under)`` is a context manager: inside it, the n-th "line"
event executed in this thread by code whose file lies under the directory
``under`` raises KeyboardInterrupt, as a Ctrl-C arriving there would.  Its
``fired`` attribute says whether the call got that far; a test loops
n = 1, 2, ... until it no longer fires, checking its invariants after each.

One place is skipped, as the interpreter skips it for real signals (since
3.10, bpo-29988): the step from the end of a ``with`` block into its
``__exit__``.  A trace function sees it as a second "line" event on the
``with`` line, coming from the block's body below it; raising there would
leave a lock taken that no real Ctrl-C can leave taken.
"""

from __future__ import annotations

import linecache
import sys
from typing import Any, Dict, Optional


class interrupt_at:
    def __init__(self, n: int, under: str) -> None:
        self.n, self.under = n, under
        self.count = 0
        self.fired = False
        self.where: Optional[str] = None
        self._last: Dict[int, int] = {}  # id(frame) -> its previous line event's line

    def _global(self, frame: Any, event: str, arg: Any) -> Any:
        if self.fired or not frame.f_code.co_filename.startswith(self.under):
            return None
        return self._local

    def _local(self, frame: Any, event: str, arg: Any) -> Any:
        if event == "line" and not self.fired:
            line, last = frame.f_lineno, self._last.get(id(frame), -1)
            self._last[id(frame)] = line
            if last > line and _is_with(frame.f_code.co_filename, line):
                return self._local  # leaving the block: __exit__ comes next, uninterruptibly
            self.count += 1
            if self.count == self.n:
                self.fired = True
                self.where = f"{frame.f_code.co_filename}:{frame.f_lineno} ({frame.f_code.co_name})"
                raise KeyboardInterrupt(f"injected at line event {self.n}: {self.where}")
        return self._local

    def __enter__(self) -> "interrupt_at":
        sys.settrace(self._global)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.settrace(None)


def _is_with(filename: str, line: int) -> bool:
    return linecache.getline(filename, line).lstrip().startswith(("with ", "async with "))
