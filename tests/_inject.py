"""A KeyboardInterrupt at the n-th line executed in our package: Ctrl-C, placed on purpose.

``with ctrl_c_at(n, package_dir) as probe: call()`` raises KeyboardInterrupt
at the n-th "line" trace event of this thread whose code lives under
``package_dir``.  ``probe.fired`` says whether the call got that far and
``probe.where`` where it struck.  A test runs n = 1, 2, ... until the call
finishes without it firing, and checks its invariants after each run.

One trace event is not a place a real Ctrl-C can strike: since Python 3.10
(bpo-29988) the interpreter checks for signals nowhere between the end of a
``with`` block and the call of its ``__exit__``, but a trace function sees
a second "line" event on the ``with`` line there (coming back up from the
block).  Raising at it would skip ``__exit__`` (a lock left held), which no
signal can do, so those events are passed over.
"""
from __future__ import annotations

import linecache
import sys
from typing import Any, Dict, Optional


class ctrl_c_at:
    def __init__(self, n: int, package_dir: str) -> None:
        self.n = n
        self.package_dir = package_dir
        self.seen = 0
        self.fired = False
        self.where: Optional[str] = None
        self._previous: Dict[int, int] = {}  # frame id -> line of its last line event

    def _call(self, frame: Any, event: str, arg: Any) -> Any:
        if self.fired or not frame.f_code.co_filename.startswith(self.package_dir):
            return None  # no tracing of this frame's lines
        return self._line

    def _line(self, frame: Any, event: str, arg: Any) -> Any:
        if event != "line" or self.fired:
            return self._line
        line = frame.f_lineno
        before = self._previous.get(id(frame), -1)
        self._previous[id(frame)] = line
        if before > line and _opens_with_block(frame.f_code.co_filename, line):
            return self._line  # on the way into __exit__: no signal is checked there
        self.seen += 1
        if self.seen == self.n:
            self.fired = True
            self.where = f"{frame.f_code.co_filename}:{line} in {frame.f_code.co_name}"
            raise KeyboardInterrupt(f"injected at line event {self.n}, {self.where}")
        return self._line

    def __enter__(self) -> "ctrl_c_at":
        sys.settrace(self._call)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.settrace(None)


def _opens_with_block(filename: str, line: int) -> bool:
    return linecache.getline(filename, line).lstrip().startswith(("with ", "async with "))
