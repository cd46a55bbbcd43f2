"""A KeyboardInterrupt at the n-th line executed in our package: Ctrl-C, placed on purpose.

``with ctrl_c_at(n, package_dir) as probe: call()`` raises KeyboardInterrupt
at the n-th "line" trace event of this thread whose code lives under
``package_dir``.  ``probe.fired`` says whether the call got that far and
``probe.where`` where it struck.  A test runs n = 1, 2, ... until the call
finishes without it firing, and checks its invariants after each run.

Two kinds of trace events are not places a real Ctrl-C can strike, and are
passed over, since raising at them skips a ``with`` block's ``__exit__`` (a
lock left held) where no signal can:

* since Python 3.10 (bpo-29988) the interpreter checks for signals nowhere
  between the end of a ``with`` block and the call of its ``__exit__``, but
  a trace function sees a second "line" event on the ``with`` line there
  (coming back up from the block);
* the line event of a ``try:`` line: its instruction is a no-op, where no
  signal is checked, and since 3.11 it lies outside the enclosing ``with``'s
  exception-table range (an exception raised there skips ``__exit__``;
  checked on 3.9-3.13).
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
        self._previous[id(frame)] = -1  # a new frame (an id may be reused)
        return self._line

    def _line(self, frame: Any, event: str, arg: Any) -> Any:
        if event != "line" or self.fired:
            return self._line
        line = frame.f_lineno
        before = self._previous.get(id(frame), -1)
        self._previous[id(frame)] = line
        source = linecache.getline(frame.f_code.co_filename, line).lstrip()
        if before > line and source.startswith(("with ", "async with ")):
            return self._line  # on the way into __exit__: no signal is checked there
        if source.startswith("try:"):
            return self._line  # a no-op: no signal is checked there
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
