"""``Popen`` of ``forkserver.mp_context()``: one multiprocessing child, in the parent.

The interface is the one ``multiprocessing.process.BaseProcess`` drives
(``popen_fork.Popen``'s): ``pid``, ``sentinel``, ``returncode``,
``poll``/``wait``/``terminate``/``kill``/``close``, and for pickling
``duplicate_for_child`` and ``DupFd``.  What is different:

* the child is a clone of the context's template (``TemplateContext._clone``),
  made with ``clone(CLONE_PARENT)``: it is our child, reaped by us with
  ``waitpid``, so ``returncode`` is its exact status (negative for a
  signal) -- there is no server in between that could lose it;
* ``sentinel`` is a pidfd: readable once the child has exited, pollable by
  ``multiprocessing.connection.wait``, and it never names a later process
  that reuses the pid;
* fds are passed as multiprocessing's forkserver passes them: by index
  (``duplicate_for_child``), sent along with the fork (``send_fh``).
"""
from __future__ import annotations

import io
import os
import signal
from multiprocessing import reduction, resource_tracker, spawn, util
from multiprocessing.context import set_spawning_popen
from typing import TYPE_CHECKING, Any, List, Optional

from .._errors import BrokenChannelError
from .._fds import FdChannel
from .._wait import drain, wait_readable
from ._mp_worker import DupFd

_PAYLOAD = 1  # the frame's kind (the only one)

if TYPE_CHECKING:  # pragma: no cover
    from .._process import Child
    from ._mp import TemplateContext


class Popen:
    """Start ``process_obj`` as a clone of ``context``'s template (``BaseProcess.start``)."""

    method = "forkserver"  # as get_start_method() (see TemplateContext)
    DupFd = DupFd

    def __init__(self, process_obj: Any, context: "TemplateContext") -> None:
        util._flush_std_streams()  # type: ignore[attr-defined]  # CPython's, not in typeshed
        self.returncode: Optional[int] = None
        self.finalizer: Any = None
        self.pid: Optional[int] = None
        self.sentinel: Optional[int] = None
        self._child: Optional["Child"] = None
        self._context = context
        self._owner = os.getpid()
        self._fds: List[int] = []
        self._launch(process_obj, context)

    def duplicate_for_child(self, fd: int) -> int:
        """Send ``fd`` to the child with the fork; the index its ``DupFd`` finds it by."""
        self._fds.append(fd)
        return len(self._fds) - 1

    def _launch(self, process_obj: Any, context: "TemplateContext") -> None:
        prep = spawn.get_preparation_data(process_obj._name)
        context._prepare_main(prep)
        stdio = _open_stdio()
        payload = io.BytesIO()
        header = (stdio, *context._env_changes())
        reduction.pickle.dump(header, payload, protocol=reduction.pickle.HIGHEST_PROTOCOL)  # type: ignore[attr-defined]  # reduction's own pickle
        set_spawning_popen(self)
        try:
            reduction.dump(prep, payload)
            reduction.dump(process_obj, payload)
        finally:
            set_spawning_popen(None)
        fds = [_tracker_fd(), *stdio, *self._fds]
        child = None
        sent = False
        try:
            child, was_waiting = context._take_child()
            self._adopt(child)
            _send(child, payload.getbuffer(), fds)
            sent = True
            # Only now: the thread takes the GIL for ~0.1 ms when it starts
            # on the next child (see _mp_warm, "When the next one is made").
            if was_waiting:
                context._warm.request(after=child.pid)
            else:
                context._warm.request(back_to_back=True)
        except BaseException:
            if child is not None and not sent:
                self._abort(child)  # it never got its payload: it ran nothing
            elif sent:
                _started_anyway(process_obj, self)  # it runs: keep it reachable
            raise

    def _adopt(self, child: "Child") -> None:
        self._child = child
        self.pid = child.pid
        self.sentinel = os.pidfd_open(child.pid)  # ours: the Child closes its pidfd once reaped
        self.finalizer = util.Finalize(self, _close, (self.sentinel, child))

    def _abort(self, child: "Child") -> None:
        """``start()`` failed after the child was taken: end it, reap it, close everything."""
        child.kill()
        child.wait()
        self.returncode = child.returncode
        if self.finalizer is not None:
            self.finalizer()
            return
        if self.sentinel is not None:
            os.close(self.sentinel)
        child.close()

    # -- what BaseProcess calls --------------------------------------------------

    def poll(self, flag: int = os.WNOHANG) -> Optional[int]:
        """The exit code if the child has exited (reaping it), else None; ``flag=0`` waits.

        Raises ``forkserver.ReapedElsewhereError`` if something else
        in this process reaped the child (a ``waitpid(-1)``, SIGCHLD
        ignored): its status is lost, and no code is made up for it.  In a
        forked copy of this process the child is not ours: None, as
        ``popen_fork`` answers there.
        """
        if self.returncode is None:
            if self._owner != os.getpid():
                return None
            if flag != os.WNOHANG:
                return self.wait()
            assert self._child is not None
            self.returncode = self._child.poll()
            if self.returncode is not None:
                self._context._warm.exited(self._child.pid)  # the next waiting child may come
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        """Wait up to ``timeout`` seconds (None: for ever) for the exit; the exit code or None."""
        if self.returncode is None:
            assert self.sentinel is not None
            if self._owner != os.getpid() or not wait_readable(self.sentinel, timeout):
                return None
            return self.poll()
        return self.returncode

    def _send_signal(self, sig: int) -> None:
        if self.returncode is None and self._child is not None:
            self._child.send_signal(sig)  # through its pidfd; a no-op once reaped

    def terminate(self) -> None:
        self._send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self._send_signal(signal.SIGKILL)

    def interrupt(self) -> None:  # Process.interrupt(), Python 3.14
        self._send_signal(signal.SIGINT)

    def close(self) -> None:
        if self.finalizer is not None:
            self.finalizer()


def _started_anyway(process_obj: Any, popen: Popen) -> None:
    """Record ``popen`` on its process as ``BaseProcess.start`` would have.

    For an interrupt after the child got its payload: ``start()`` raises it,
    and the process can still be joined, terminated and reaped.
    """
    from multiprocessing import process

    process_obj._popen = popen
    process_obj._sentinel = popen.sentinel
    process._children.add(process_obj)  # type: ignore[attr-defined]  # CPython's, not in typeshed


def _tracker_fd() -> int:
    """The resource tracker's fd, started if need be (``resource_tracker.getfd()``).

    ``getfd()`` checks the tracker is alive by writing to it, which wakes it
    up -- another process on the CPUs just as the child starts.  The
    tracker is our child: when it has not exited (``waitid`` without reaping
    it), its fd is good.
    """
    tracker = resource_tracker._resource_tracker
    fd, pid = getattr(tracker, "_fd", None), getattr(tracker, "_pid", None)
    if fd is not None and pid is not None:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
                return fd
        except ChildProcessError:
            pass  # not ours (a forked copy of the process that started it)
    return resource_tracker.getfd()  # type: ignore[return-value]  # getfd() starts it: an fd


def _open_stdio() -> List[int]:
    """The caller's stdio fds that are open now: the child gets them as 0-2 (as under spawn)."""
    found = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            continue
        found.append(fd)
    return found


def _send(child: "Child", payload: memoryview, fds: List[int]) -> None:
    """Send the payload and fds to the child, which waits for them before anything else."""
    control = child.control
    assert control is not None
    chan = FdChannel(control)
    try:
        chan.send(_PAYLOAD, payload, fds)
        drain(chan)
    except BrokenChannelError:
        chan.close()  # the child was killed meanwhile: its exit status says so
    except BaseException:
        chan.close()  # interrupted: the fds it queued go too (start() kills the child)
        raise


def _close(sentinel: int, child: "Child") -> None:
    os.close(sentinel)
    child.close()
