"""FORK in a template: the clone, spare clones and their rehearsal (runs inside templates).

On ``FORK`` a template clones itself with ``fork_sibling``: the clone drops
the old socket, greets the parent on the new one and goes on in the same
command loop as a template of its own -- the stack does not grow -- or, for
a fork fused with a run, becomes the worker at once.
"""
from __future__ import annotations

import _signal
import atexit
import gc
import os
import re
import select
import signal
import socket
import sys
from typing import Any, List, Optional, Tuple

from .. import _protocol as P
from .._errors import BrokenChannelError, ProtocolError
from .._fds import HEADER, FdChannel, Frame, ffi
from .._sibling import fork_sibling
from .._slots import region
from ._exec import do_spawn
from ._hygiene import check_single_threaded, set_title
from ._setup import rehearse_setup
from ._state import State, Work, flush_std, greet, resolve, resolve_target

_SIGINT = int(signal.SIGINT)


def do_fork(state: State, frame: Frame) -> Optional[Work]:
    """Clone this template; the clone continues as the template on the new socket.

    The payload (from a deferred ``fork()``) may carry the new template's
    first ``send_arg``/``send_fh`` items and a fused ``run`` target.  Both are
    decoded and resolved here, *before* the clone, so the clone does almost
    nothing before it calls the target: it returns the work to do.  A spare
    asked for ``after`` a worker is made once that worker is gone (see
    ``_wait_for_reap``).
    """
    # Family and type given: no getsockname/getsockopt probes on the hot path.
    new_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fileno=frame.fds[0])
    # Built here, not in the clone: every object the clone creates or touches
    # costs it copy-on-write page faults on its way to the target.
    new_chan = FdChannel(new_sock)
    extra: List[Any] = []
    handles: List[Any] = []  # the fd-owning items of extra
    raw = frame.fds[1:]  # the prelude's fds until _decode_prelude owns them
    func = None
    what = "fork()"  # the step an error is reported for
    call_id = 0  # a fused run's call id: its reply, or its error, carries it
    try:
        if state.broken is not None:
            raise _Refused(state.broken)
        spec = P.loads(frame.payload) if frame.payload else {}
        prelude, run, spare = spec.get("prelude", ()), spec.get("run"), spec.get("spare", False)
        call_id = spec.get("call", 0)
        if len(raw) != sum(nfds for _, _, nfds in prelude):
            raise ProtocolError(f"a fork command came with {len(raw)} fds for its first items, "
                                f"not {sum(nfds for _, _, nfds in prelude)}")
        if prelude:
            fds, raw = raw, []
            extra, handles = _decode_prelude(prelude, fds)
        if run is not None:
            module_name, qualname, opts = run
            what = f"run('{module_name}:{qualname}')"
            func = resolve_target(state, module_name, qualname)
            what = "fork()"
            # The clone inherits our name: no /proc write on its side.
            set_title("fs:" + getattr(func, "__name__", "worker"))
            opts = dict(opts, titled=True)
        if spare and not _still_wanted(spec.get("after"), state, new_sock):
            new_chan.close()  # the parent gave this spare up (or died) before it was made
            return None
        if prelude or run is not None or not state.single_threaded:
            check_single_threaded(state.culprits)
            state.single_threaded = True
        sys.stdout.flush()  # else the clone would print our buffered output again
        sys.stderr.flush()
        if state.gc_freeze:
            gc.freeze()  # keep preloaded objects' pages shared with the clones
        # The kernel writes the clone's pid in the parent's slot before the
        # clone first runs; without a slot, the clone writes it on its socket
        # before anything else (a frame the parent would wake up for).
        ptid = region.address(spec.get("slot"))
        pid = fork_sibling(-1 if ptid != ffi.NULL else new_sock.fileno(), ptid)
    except BaseException as exc:
        if func is not None:
            set_title("fs:template")
        close_handles(handles)
        for fd in raw:
            os.close(fd)
        payload = exc.args[0] if isinstance(exc, _Refused) else P.encode_error(exc, what)
        try:
            new_chan.send(P.ERROR, P.with_call(call_id, payload))
        except BrokenChannelError:
            pass  # the parent gave the clone up already
        new_chan.close()
        return None
    if pid:
        if func is not None:
            set_title("fs:template")
        new_chan.close()
        close_handles(handles)  # the clone has its own copies
        return None
    # In the clone: close our copy of the template's socket (else the parent
    # would not see EOF when the template dies), serve the new one.
    os.close(state.chan.sock.detach())
    state.chan = new_chan
    state.sent.extend(extra)
    try:
        if func is not None:
            state.chan.send(P.RUNNING, P.with_call(call_id, P.HELLO_FORMAT.pack(P.VERSION, os.getpid())))
            return func, state.sent, opts
        if spare:
            _rehearse(state)  # first: a spare's greeting tells the parent it is ready
        greet(state.chan)
    except BrokenChannelError:
        pass  # the parent is gone: the loop reads EOF next, and this clone exits quietly
    return None


# A clone made ahead of time (a spare) idles until a RUN makes it a worker.
# Everything the worker then does for the first time in this process writes
# to pages it still shares with the template -- reference counts, the
# interpreter's per-instruction counters, the type cache -- and each first
# write is a copy-on-write fault: the kernel copies the 4 KiB page before the
# write proceeds (~2.5 us each on a 2-vCPU VM; ~110 of them between the RUN
# and the target's first line, ~100 more on the way out).  Walking the same
# path once while idle takes those faults off the path that is timed (run()
# to reaped: 0.92-1.06 ms before, 0.80-0.87 after).  Only effect-free steps
# are walked: the title and SIGINT are set to the values they already have.


def _rehearse(state: State) -> None:
    """Walk a worker's start-up and exit path once, unless a command is waiting."""
    if _peek(state.chan.sock) is not None:
        return  # a command is waiting (serve it first), or EOF / an error the loop reports
    if not state.set_up:  # a spare of the default template: Template() sends SETUP first
        rehearse_setup(state)
    resolve(state, _REHEARSAL)
    set_title("fs:template")
    _signal.signal(_SIGINT, _signal.SIG_IGN)
    atexit._ncallbacks()
    flush_std()


def _noop() -> None:
    """The target ``_rehearse`` resolves."""


_REHEARSAL = Frame(P.RUN, P.dumps((__name__, "_noop", {})), [])


def _still_wanted(after: Optional[int], state: State, new_sock: socket.socket) -> bool:
    """Whether to make a spare now: after waiting for the worker ``after`` if given.

    False if the parent no longer wants it: it shuts its end of the new
    socket down for writing when it gives up a spare whose greeting it has
    not read, and a dead parent's end is closed: EOF either way.
    """
    if after is not None:
        _wait_for_reap(after, state, new_sock)
    return _peek(new_sock) != b""


def _wait_for_reap(pid: int, state: State, new_sock: socket.socket) -> None:
    """Wait until the worker ``pid`` is reaped (exited, on older kernels), or
    our command socket or ``new_sock`` has input (a command, the next run,
    EOF).  ``SPAWN`` commands are served meanwhile: they leave the template
    as it is, so the spare may still be made later.

    Why wait: a spare made while the last worker ends competes with its end
    for the CPUs -- the kernel tears down the worker's page tables, dropping
    a count on each page it shared with us, while our clone copies the same
    page tables and takes those counts again -- and with the parent's
    wake-up to reap it.  A pidfd (a sibling's too: pidfd_open checks no
    permission) reports POLLIN once the process is a zombie, after that
    teardown, and since Linux 6.9 POLLHUP once it has been reaped (the
    wait queue is woken again when the pid is released).  Our command socket
    (any command: it may need the clone first) and the new socket (the
    parent's next run, sent to the spare-to-be) end the wait early, so
    nothing ever waits on a worker that runs for long.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        return  # gone already (ESRCH), or no pidfds here: clone now
    try:
        poller = select.poll()
        poller.register(pidfd, 0 if _HUP_ON_REAP else select.POLLIN)  # POLLHUP is always reported
        for fd in (state.chan.fileno(), new_sock.fileno()):
            poller.register(fd, select.POLLIN)
        while [fd for fd, _ in poller.poll()] == [state.chan.fileno()] and _spawn_next(state):
            pass
    finally:
        os.close(pidfd)


def _spawn_next(state: State) -> bool:
    """Serve the next command if it is a complete SPAWN frame's header; False if it is not."""
    header = _peek(state.chan.sock, HEADER.size)
    if header is None or len(header) < HEADER.size or HEADER.unpack(header)[2] != P.SPAWN:
        return False  # another command (or EOF): it may need the clone first
    try:
        frame = state.chan.receive()
    except BrokenChannelError:
        return False  # EOF after all: the loop ends once the clone is made
    do_spawn(state, frame)
    return True


def _peek(sock: socket.socket, size: int = 1) -> Optional[bytes]:
    """Up to ``size`` waiting bytes, left in place; None if none yet, b"" at EOF or on an error."""
    try:
        return sock.recv(size, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return None
    except OSError:
        return b""  # e.g. ECONNRESET: the peer is gone, as at EOF


def _kernel_at_least(major: int, minor: int) -> bool:
    found = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return found is not None and (int(found[1]), int(found[2])) >= (major, minor)


_HUP_ON_REAP = _kernel_at_least(6, 9)


def _decode_prelude(prelude: List[Tuple[int, bytes, int]], fds: List[int]) -> Tuple[List[Any], List[Any]]:
    """(items, handles): the send_arg/send_fh items of a deferred fork, and the fd owners."""
    items: List[Any] = []
    handles: List[Any] = []
    start = 0
    try:
        for kind, payload, nfds in prelude:
            if kind == P.SEND_ARG:
                items.extend(P.loads(payload))
            else:
                descs = P.loads(payload)
                batch = fds[start : start + nfds]
                start += nfds
                for i, (fd, desc) in enumerate(zip(batch, descs)):
                    try:
                        handles.append(P.rebuild_handle(fd, desc))
                    except BaseException:
                        for rest in batch[i:]:
                            os.close(rest)
                        raise
                items.extend(handles[len(handles) - len(batch) :])
    except BaseException:
        for fd in fds[start:]:
            os.close(fd)
        close_handles(handles)
        raise
    return items, handles


def close_handles(handles: List[Any]) -> None:
    """Close received handles: int fds and the socket/file objects owning fds."""
    for handle in handles:
        try:
            if isinstance(handle, int):
                os.close(handle)
            else:
                handle.close()
        except OSError:
            pass


class _Refused(Exception):
    """A fork refused because an earlier pipelined command failed (payload: its error)."""
