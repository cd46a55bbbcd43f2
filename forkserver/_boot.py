"""How template processes come to exist (parent side): exec'd interpreters, ``early()``'s fork.

Both return the raw parts of a new template process -- our end of its
command socket, its pid and a pidfd -- and know nothing of ``Template``,
which wraps them (``_template.py``).

* ``exec_interpreter``: ``os.posix_spawn`` (vfork semantics: cheap and safe
  from a big, threaded parent) of ``python -c <boot>`` with the command
  socket on fd 3.  The default template and ``Template.new_exec`` start so.
* ``fork_this_process``: ``os.fork`` of the caller itself, for
  ``forkserver.early()``; the child never returns into the program.
"""
from __future__ import annotations

import os
import sys
from typing import Dict, Tuple

from ._fds import FdChannel, socketpair
from ._wait import open_pidfd

_BOOT = (  # the command socket is fd 3; nothing else inherited stays open
    "import sys; sys.path.insert(0, {path!r}); "
    "from forkserver._server._loop import close_inherited, main, finish; "
    "close_inherited(3); finish(main(3))"
)

Parts = Tuple[FdChannel, int, int]  # our channel, the pid, its pidfd


def exec_interpreter(python: str, env: Dict[str, str]) -> Parts:
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
    return FdChannel(ours), pid, open_pidfd(pid)


def fork_this_process() -> Parts:
    """Fork the caller into a template process serving a new socket (``early()``).

    The caller checked that it is single-threaded.  In the child this never
    returns: it serves commands until EOF, or becomes a worker, then exits.
    """
    from ._server._loop import finish, main

    ours, theirs = socketpair()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the new template: never returns into the program
        ours.close()
        finish(main(theirs.detach()))
    theirs.close()
    ours.setblocking(False)
    return FdChannel(ours), pid, open_pidfd(pid)
