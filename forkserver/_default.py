"""The shared default template, ``early()``, and ending templates at exit (parent side).

The default template is a small interpreter started with ``posix_spawn``
(vfork semantics: cheap and safe from a big, threaded parent) on first use,
once per process; ``Template()`` clones it.  ``early()`` makes the program
itself, forked at the top of ``main``, the default template instead.
"""
from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import Dict, Optional

from . import _protocol as P
from ._errors import BrokenChannelError, ProtocolError
from ._fds import FdChannel, socketpair
from ._template import Template, _kill_on_exit, _live
from ._wait import open_pidfd

_BOOT = (  # the command socket is fd 3; nothing else inherited stays open
    "import sys; sys.path.insert(0, {path!r}); "
    "from forkserver._server._loop import close_inherited, main, finish; "
    "close_inherited(3); finish(main(3))"
)


def spawn_template(python: str, env: Dict[str, str]) -> Template:
    """posix_spawn a fresh template interpreter with its command socket on fd 3."""
    ours, theirs = socketpair()
    ours.setblocking(False)
    child_fd = theirs.fileno()
    if child_fd == 3:  # dup2(3, 3) would leave close-on-exec set
        child_fd = os.dup(3)
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    argv = [python, "-c", _BOOT.format(path=pkg_parent)]
    try:
        pid = os.posix_spawn(
            python,
            argv,
            env,
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, child_fd, 3),
            ],
        )
    except BaseException:
        ours.close()
        raise
    finally:
        if child_fd != theirs.fileno():
            os.close(child_fd)
        theirs.close()
    tpl = Template._from_channel(FdChannel(ours), "Template.new_exec()", pid)
    tpl._pidfd = open_pidfd(pid)
    return tpl


class _Default:
    """The shared default template of this process (one per pid, started lazily)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.template: Optional[Template] = None

    def get(self) -> Template:
        with self.lock:
            tpl = self.template
            if tpl is not None and not _alive(tpl):
                self.template = tpl = None
            if tpl is None:
                tpl = spawn_template(sys.executable, dict(os.environ))
                tpl._origin = "the default template"
                self.template = tpl
            return tpl

    def discard(self, tpl: Template) -> None:
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


def early() -> None:
    """Fork this program, now, into the default template (AnyEvent::Fork::Early).

    Call it at the very top of your main program, before any thread starts and
    before big imports or allocations: every later ``Template()`` is cloned
    from this copy of your program instead of a freshly exec'd interpreter.
    So no interpreter is started later, and functions defined in your
    ``__main__`` script can be ``run()`` by name.

    Limits: the copy keeps everything the program had at this point (modules,
    memory, open fds), so call it early; it must be the first use of
    forkserver in the process, and the process must be single-threaded.
    Workers cloned from it end with ``os._exit`` after ``atexit`` callbacks.
    """
    from ._server._hygiene import check_single_threaded
    from ._server._loop import finish, main

    with _default.lock:
        if _default.template is not None:
            raise RuntimeError(
                "forkserver.early() must come before any other use of forkserver in this "
                "process; call it at the top of your main program"
            )
        check_single_threaded(["the program itself (early() must run before threads start)"])
        ours, theirs = socketpair()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the new default template: never returns into the program
            ours.close()
            finish(main(theirs.detach()))
        theirs.close()
        ours.setblocking(False)
        tpl = Template._from_channel(FdChannel(ours), "forkserver.early()", pid)
        tpl._pidfd = open_pidfd(pid)
        tpl._main_ok = True
        _default.template = tpl


def _alive(tpl: Template) -> bool:
    """Non-blocking check that the default template is usable (consumes its HELLO)."""
    with tpl._lock:
        if tpl._status in ("closed", "broken", "running"):
            return False
        try:
            frame = tpl._chan.receive()
        except (BrokenChannelError, ProtocolError) as exc:
            tpl._broken(exc, "check")
            return False
        if frame is not None:
            if frame.kind != P.HELLO or tpl._status != "starting":
                tpl._broken(ProtocolError("unexpected frame"), "check")
                return False
            tpl._hello(frame)
        return True


_default = _Default()
os.register_at_fork(after_in_child=_default.after_fork_child)


def _at_exit() -> None:
    """Interpreter exit: templates end (and are reaped); kill_on_exit workers die.

    Other running workers are left running: they are yours, as with subprocess.
    """
    for child in list(_kill_on_exit):
        child.kill()
        child.wait()
    for tpl in list(_live):
        if tpl is not _default.template and tpl._status not in ("running", "closed"):
            tpl.close()
    _default.shutdown()


atexit.register(_at_exit)


def default_template() -> Template:
    """The shared default template of this process, started on first use."""
    return _default.get()
