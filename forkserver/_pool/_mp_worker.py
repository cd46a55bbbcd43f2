"""The child side of ``forkserver.mp_context()`` (runs inside its templates and children).

A context's template imports this module once, with multiprocessing's
child-side machinery and the modules children commonly unpickle
(``CHILD_MODULES``), so a child imports none of them: ``main`` is the first
thing each child runs once the template has cloned it.  Nothing here
imports the parent side of forkserver.

A child is started before it is needed (``_mp_warm``) and waits on its
control socket for one frame (``_fds.FdChannel``) that gives it what
multiprocessing's own forkserver gives its children
(``multiprocessing.forkserver._serve_one``, ``spawn._main``):

* fds: the resource tracker's pipe, the caller's stdio fds 0-2 as they are
  at ``start()``, then every fd the pickled objects asked for
  (``Popen.duplicate_for_child``); ``DupFd(i).detach()`` returns the i-th
  of those;
* bytes: three pickles -- our header (which stdio fds came, the
  environment's changes), ``spawn.get_preparation_data()``, the
  ``Process`` object.

Meanwhile a waiting child *rehearses*: it unpickles and applies a stand-in
of that frame made when the context was built (``set_rehearsal``).  A child
touching a page it shares with the template pays a copy-on-write fault
(~2.5 us here) the first time; the real frame then finds those pages
copied already (measured: 0.75 ms of start-up work in a fresh fork, of
which 0.01 ms is computation).

The control socket stays open for the child's whole life: it is the *parent
sentinel* (``multiprocessing.parent_process().sentinel``), readable once the
parent has closed its end or died.  A child whose parent gives up on it
(an interrupted ``start()``, a closed context) reads EOF and exits at once,
having run nothing of the user's.
"""
from __future__ import annotations

import atexit
import io
import os
import select
import sys
from multiprocessing import process, reduction, resource_tracker, spawn, util
from typing import Any, List, NoReturn, Optional

from .._errors import BrokenChannelError
from .._fds import FdChannel, drop_reserve

# Imported into every context's template (after this module): what the
# children of ProcessPoolExecutor, Pool, queues, locks and shared values
# unpickle.  Each costs a child 4-9 ms to import itself (measured here).
CHILD_MODULES = (
    "multiprocessing.connection",
    "multiprocessing.queues",
    "multiprocessing.synchronize",
    "multiprocessing.sharedctypes",
    "multiprocessing.pool",
    "concurrent.futures.process",
)

_inherited: List[int] = []  # this child's fds, by DupFd index
_rehearsal: Optional[bytes] = None  # a stand-in payload (see set_rehearsal)


class DupFd:
    """An fd the parent passed to this child: ``detach()`` returns it (multiprocessing's API)."""

    def __init__(self, index: int) -> None:
        self.index = index

    def detach(self) -> int:
        return _inherited[self.index]


class TemplateProcess(process.BaseProcess):
    """A ``multiprocessing`` process started as a clone of a ``forkserver.mp_context()`` template.

    Each context has a subclass of its own (``ctx.Process``) that knows the
    context; it is pickled as this class, which is all a child needs.
    """

    # A child makes this its default start method (BaseProcess._bootstrap),
    # so a multiprocessing.Process() started there uses the standard
    # forkserver, as it does in a child of that (see docs/multiprocessing.md).
    _start_method = "forkserver"

    @staticmethod
    def _Popen(process_obj: Any) -> Any:
        raise RuntimeError(
            f"{process_obj!r} has no forkserver.mp_context(): "
            "create processes with ctx.Process(...)"
        )

    def __reduce_ex__(self, protocol: Any) -> Any:
        reduced = super().__reduce_ex__(protocol)
        cls = type(self)
        if not cls.__dict__.get("_per_context"):
            return reduced  # this class, or a subclass of the user's: importable by name
        base = next(c for c in cls.__mro__ if not c.__dict__.get("_per_context"))
        return (_new, (base,), *reduced[2:])


def _new(cls: type[TemplateProcess]) -> Any:
    """Unpickle a context's process as an instance of ``cls`` (its importable base)."""
    return cls.__new__(cls)


# -- in the template ---------------------------------------------------------------


def enter_template() -> None:
    """Mark the template as a process that is still being prepared.

    multiprocessing's rule for a child importing the main module: starting a
    process then is an error (``spawn._check_not_importing_main``), and
    ``forkserver.mp_context()`` builds nothing until it is used.  Each child
    clears the mark once it has unpickled its ``Process``, as spawn's do.
    """
    process.current_process()._inheriting = True  # type: ignore[attr-defined]


def set_rehearsal(payload: bytes) -> None:
    """Keep ``payload`` (preparation data and a process, pickled): children rehearse with it."""
    global _rehearsal
    _rehearsal = payload


def import_main(data: dict) -> None:
    """Import the caller's main module here as ``__mp_main__``, once for every child.

    ``data`` holds the keys of ``spawn.get_preparation_data()`` that
    ``spawn.prepare`` needs for it (``sys_path``, ``sys_argv``, ``dir``,
    ``orig_dir``, ``init_main_from_name`` or ``init_main_from_path``); a
    child's own ``prepare`` then finds the module in place and skips it.
    A main module that starts threads would make every fork refuse: raise.
    """
    from .._server._hygiene import check_single_threaded

    spawn.prepare(data)
    main = data.get("init_main_from_path") or data.get("init_main_from_name")
    check_single_threaded([f"importing the main module {main!r} into the template"])


# -- in each child -----------------------------------------------------------------


def main(control: Any, rehearse: bool) -> None:
    """Become the multiprocessing child: wait for the payload, bootstrap the process, exit."""
    chan = FdChannel(control)
    if rehearse:
        _rehearse(control)
    try:
        frame = chan.receive()
    except BrokenChannelError:
        os._exit(0)  # the parent gave up on this child before it was used: run nothing
    except BaseException:
        _fail()
    drop_reserve()  # no more frames: the channel's spare fds go
    sentinel = control.detach()  # kept open until we exit: the parent sentinel
    try:
        obj = _prepare(frame.payload, frame.fds)  # type: ignore[union-attr]  # a blocking channel: never None
    except BaseException:
        _fail()
    # Exit as multiprocessing's children do since 3.13 (popen_fork,
    # forkserver): the template's atexit callbacks are not ours to run, the
    # child's own are, with multiprocessing's after everything else.
    atexit._clear()
    atexit.register(util._exit_function)  # type: ignore[attr-defined]  # CPython's, not in typeshed
    code = obj._bootstrap(parent_sentinel=sentinel)
    atexit._run_exitfuncs()
    util._flush_std_streams()  # type: ignore[attr-defined]  # CPython's, not in typeshed
    os._exit(code)


def _fail() -> "NoReturn":
    sys.excepthook(*sys.exc_info())
    util._flush_std_streams()  # type: ignore[attr-defined]  # CPython's, not in typeshed
    os._exit(1)


def _prepare(payload: bytes, fds: List[int]) -> Any:
    """Apply the header, then the preparation data; return the unpickled process object."""
    stream = io.BytesIO(payload)
    stdio, env_set, env_unset = reduction.pickle.load(stream)  # type: ignore[attr-defined]  # reduction's own pickle
    tracker_fd, fds = fds[0], fds[1:]
    for target, fd in zip(stdio, fds):
        os.dup2(fd, target)
        os.close(fd)
    _inherited[:] = fds[len(stdio):]
    resource_tracker._resource_tracker._fd = tracker_fd  # type: ignore[attr-defined]  # CPython's, not in typeshed
    for name in env_unset:
        os.environ.pop(name, None)
    os.environ.update(env_set)
    return _load(stream)


def _load(stream: io.BytesIO) -> Any:
    """``spawn.prepare`` the preparation data of ``stream``, return its process object."""
    process.current_process()._inheriting = True  # type: ignore[attr-defined]
    try:
        spawn.prepare(reduction.pickle.load(stream))  # type: ignore[attr-defined]  # reduction's own pickle
        return reduction.pickle.load(stream)  # type: ignore[attr-defined]  # reduction's own pickle
    finally:
        del process.current_process()._inheriting  # type: ignore[attr-defined]


def _waiting(sock: Any) -> bool:
    """Whether the parent has sent something already (then there is no time to rehearse)."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(0))


def _receive_one() -> None:
    """Pass a frame with an fd through a socketpair: the path the real payload takes."""
    import socket

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        FdChannel(ours).send(0, b"rehearsal", [theirs.fileno()])
        for fd in FdChannel(theirs).receive().fds:  # type: ignore[union-attr]
            os.close(fd)
    finally:
        ours.close()
        theirs.close()


def _rehearse(sock: Any) -> None:
    """Walk the start-up path once with the stand-in payload: the same code, the same pages.

    Every step is one the real start-up repeats: ``prepare`` is applied
    again, stdin is replaced again.  Failures are the real payload's to
    report, so they are ignored here.
    """
    if _rehearsal is None:
        return
    try:
        for step in (_receive_one, _load_stand_in, _replace_stdin):
            if _waiting(sock):
                break  # the payload is here: serve it now
            step()
    except Exception:
        pass
    process.current_process()._inheriting = True  # type: ignore[attr-defined]


def _load_stand_in() -> None:
    assert _rehearsal is not None
    _load(io.BytesIO(_rehearsal))


def _replace_stdin() -> None:
    util._close_stdin()  # type: ignore[attr-defined]  # CPython's, not in typeshed
    fd = sys.stdin.fileno()  # opened with closefd=False: close it, or it stays open
    sys.stdin.close()
    os.close(fd)
    process._ParentProcess("rehearsal", os.getppid(), -1)  # type: ignore[attr-defined]  # CPython's, not in typeshed
