"""How template processes come to exist (parent side): exec'd interpreters, ``early()``'s fork.

They know nothing of ``Template``, which wraps what they make
(``_template.py``).  ``exec_interpreter`` attaches our end of the command
socket to its *owner* (a template object) before the process exists, and
records the pid in it in the statement that spawns, so no interruption can
come between the process's birth and an owner that can reap it.

* ``exec_interpreter``: ``os.posix_spawn`` (vfork semantics: cheap and safe
  from a big, threaded parent) of ``python -c <boot>`` with the command
  socket on fd 3.  The default template and ``Template.new_exec`` start so.
* ``fork_this_process``: ``os.fork`` of the caller itself, for
  ``forkserver.early()``; the child never returns into the program.
"""
from __future__ import annotations

import fcntl
import os
import sys
from typing import Any, Dict, Tuple

from ._fds import FdChannel, socketpair
from ._interrupts import deferred
from ._slots import FD as SLOTS_FD, region
from ._wait import open_pidfd

_BOOT = (  # the command socket is fd 3, the pid slots fd 4; nothing else inherited stays open
    "import sys; sys.path.insert(0, {path!r}); "
    "from forkserver._server._loop import close_inherited, main, finish; "
    "close_inherited(3, 4); finish(main(3, 4))"
)

Parts = Tuple[FdChannel, int, int]  # our channel, the pid, its pidfd


def exec_interpreter(python: str, env: Dict[str, str], owner: Any) -> None:
    """posix_spawn a fresh template interpreter with its command socket on fd 3.

    ``owner`` (a template object) gets the channel, with the pid as its
    ``peer_pid``, and a pidfd.
    """
    ours, theirs = socketpair()
    child_fd = theirs.fileno()
    slots_fd = region.fileno()
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    argv = [python, "-c", _BOOT.format(path=pkg_parent)]
    try:
        ours.setblocking(False)
        chan = FdChannel(ours)
        owner._own(chan)  # from here on the owner ends whatever is made
        if child_fd in (3, 4):  # dup2(n, n) would leave close-on-exec set; 4 is the slots' place
            child_fd = fcntl.fcntl(child_fd, fcntl.F_DUPFD_CLOEXEC, 5)
        if slots_fd in (3, 4):
            slots_fd = fcntl.fcntl(slots_fd, fcntl.F_DUPFD_CLOEXEC, 5)
        with deferred():
            chan.peer_pid = os.posix_spawn(
                python,
                argv,
                env,
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_DUP2, child_fd, 3),
                    (os.POSIX_SPAWN_DUP2, slots_fd, SLOTS_FD),
                ],
            )
            owner._pidfd = open_pidfd(chan.peer_pid)
    finally:
        if child_fd != theirs.fileno():
            os.close(child_fd)
        if slots_fd != region.fileno():
            os.close(slots_fd)
        theirs.close()


def fork_this_process() -> Parts:
    """Fork the caller into a template process serving a new socket (``early()``).

    The caller checked that it is single-threaded.  In the child this never
    returns: it serves commands until EOF, or becomes a worker, then exits.
    """
    from ._server._loop import finish, main

    region.fileno()  # the pid slots exist before the fork: the new template shares them
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
