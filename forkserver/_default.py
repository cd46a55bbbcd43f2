"""The shared default template of this process: started lazily, once per pid (parent side).

``Template()`` clones it.  It is a small interpreter exec'd on first use
(``_boot.exec_interpreter``), or the program itself forked by
``forkserver.early()``.  A default template found dead is replaced on next
use; a forked copy of the caller (``os.fork``) starts its own.

This module only keeps the registry: it works on whatever template object
it is given and never imports ``_template`` (which imports it).
"""
from __future__ import annotations

import os
import threading
from typing import Any, Callable

from ._errors import BrokenChannelError, ProtocolError
from ._interrupts import deferred
from ._link import WAIT


class _Default:
    """The shared default template of this process (one per pid, started lazily)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.template: Any = None  # a Template

    def get(self, start: Callable[[], Any]) -> Any:
        """The default template; ``start()`` makes a new one when there is none or it died.

        Ctrl-C is deferred: a template started here is the registry's before
        the interrupt comes.
        """
        with deferred(), self.lock:
            tpl = self.template
            if tpl is not None and not _alive(tpl):
                self.template = tpl = None
            if tpl is None:
                tpl = self.template = start()
            return tpl

    def discard(self, tpl: Any) -> None:
        """Forget ``tpl`` as the default (it died); reap it."""
        with self.lock:
            if self.template is tpl:
                self.template = None
        with tpl._lock:
            if tpl._status not in ("broken", "closed"):
                tpl._broken(BrokenChannelError("gone"), "discard")

    def shutdown(self) -> None:
        """At interpreter exit: end the default template and reap it (no zombie left)."""
        tpl, self.template = self.template, None
        if tpl is not None and tpl._owner == os.getpid():
            tpl.close()

    def after_fork_child(self) -> None:
        # A forked copy of the caller must not talk to its parent's template.
        self.lock = threading.Lock()  # another thread may have held it at the fork
        tpl, self.template = self.template, None
        for t in (tpl, tpl and tpl._spare):
            if t is not None and t._chan is not None:
                t._chan.close()
                t._close_pidfd()
                t._status = "closed"
                t._spare = None


def _alive(tpl: Any) -> bool:
    """Non-blocking check that the default template is usable.

    Reads what has arrived: its greeting, and the replies of calls that
    were interrupted (dropped).  A template found dead is handed to the
    reaper (``Template._broken``).
    """
    with tpl._lock:
        if tpl._status in ("closed", "broken", "running"):
            return False
        try:
            while tpl._step("check") is not WAIT:
                pass
        except (BrokenChannelError, ProtocolError):  # BrokenTemplateError included: it died
            return False
        return True


_default = _Default()
os.register_at_fork(after_in_child=_default.after_fork_child)
