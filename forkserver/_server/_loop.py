"""The template command loop (runs inside template processes).

A template reads commands from its blocking command socket, one frame at a
time, until ``RUN`` turns it into a worker or EOF tells it to exit.  On
``FORK`` it clones itself (``_fork.py``): the clone goes on in this same loop
as a template of its own.  ``SPAWN`` starts an external program
(``_exec.py``).

Robustness.  The parent is the only peer (an unnamed socketpair), but its
frames are checked before anything runs: a frame of an unknown kind, with
the wrong number of fds, or whose call id or payload does not decode
breaks the template with a ``ProtocolError`` (every later reply-bearing
command answers with it, as after a failed pipelined command) and its fds
are closed unused.  When the stream itself is unusable (EOF or garbage in
the middle of a frame, a payload too large to allocate, a descriptor table
that stays full) the template says why with an ``ERROR`` of call id 0, if
it can, and exits.  A parent that died (EOF, EPIPE on a reply) makes it exit
quietly, status 0, with nothing on stderr.
"""
from __future__ import annotations

# Imported now, in the template: a module's first import in a worker would
# cost it copy-on-write faults on its way out (``atexit`` is built in, but
# nothing imports it at start-up; importing it in ``finish`` cost a worker
# ~90 faults, 0.26 ms).  ``_signal`` is ``signal`` without the enum wrappers.
import _signal
import atexit
import functools
import itertools
import linecache
import os
import signal
import socket
import stat
import sys
from typing import Any, NoReturn, Optional

from .. import _protocol as P
from .._errors import BrokenChannelError, ClosedError, FdTableFullError, ProtocolError
from .._fds import FdChannel, Frame, drop_reserve
from .._slots import region
from ._exec import do_spawn
from ._fork import do_fork
from ._hygiene import set_title, watch_parent
from ._namespace import bind_import
from ._setup import do_setup
from ._state import State, Work, flush_std, greet, import_checked, resolve

_eval_counter = itertools.count(1)
_SIGINT = int(signal.SIGINT)
_SIGHUP = int(signal.SIGHUP)
# Whether SIGHUP was ignored when this template started (nohup, or a caller
# that ignores it: exec keeps an ignored signal ignored); workers keep it so.
_hup_ignored = False


def _do_require(state: State, frame: Frame) -> None:
    names = P.loads(frame.payload)
    for name in names:
        import_checked(state, f"require({name!r})", functools.partial(bind_import, state.namespace, name))


def _do_eval(state: State, frame: Frame) -> None:
    source, args = P.loads(frame.payload)
    # Register the source so remote tracebacks show the failing line.
    filename = f"<forkserver eval {next(_eval_counter)}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    code = compile(source, filename, "exec")
    state.namespace["args"] = args
    short = source if len(source) < 40 else source[:37] + "..."
    import_checked(state, f"eval({short!r})", lambda: exec(code, state.namespace))


def _do_send_arg(state: State, frame: Frame) -> None:
    _expect_fds(frame, 0)
    state.sent.extend(_decode(frame))


def _do_send_fh(state: State, frame: Frame) -> None:
    descs = _decode(frame)
    _expect_fds(frame, len(descs))
    state.sent.extend(P.rebuild_handle(fd, desc) for fd, desc in zip(frame.fds, descs))


def _decode(frame: Frame) -> Any:
    """A pipelined command's payload; if it does not load, its fds are closed unused."""
    try:
        return P.loads(frame.payload)
    except BaseException:
        _close_fds(frame.fds)
        raise


def _expect_fds(frame: Frame, count: int) -> None:
    """Refuse (closing them unused) a frame that did not bring ``count`` fds."""
    if len(frame.fds) != count:
        _close_fds(frame.fds)
        raise ProtocolError(
            f"a {P.NAMES[frame.kind]} command came with {len(frame.fds)} fds, not {count}"
        )


def _checked_setup(state: State, frame: Frame) -> None:
    """SETUP, refused (its fds closed unused) if it does not load or brings the wrong fds."""
    ctx = _decode(frame)
    _expect_fds(frame, len(ctx.get("stdio", ())) if isinstance(ctx, dict) else -1)
    do_setup(state, frame, ctx)


_HANDLERS = {
    P.SETUP: _checked_setup,
    P.SEND_ARG: _do_send_arg,
    P.SEND_FH: _do_send_fh,
}
_REPLYING = {P.REQUIRE: _do_require, P.EVAL: _do_eval}  # RUN: in _dispatch


def serve(state: State) -> Optional[Work]:
    """Serve commands until RUN (returns the work to do) or EOF (returns None)."""
    while True:
        try:
            frame = state.chan.receive()
        except (BrokenChannelError, ClosedError):
            # The parent closed our socket or died (a send that failed on it closed it).
            return None
        except (ProtocolError, FdTableFullError, MemoryError) as exc:
            _last_words(state, exc)  # the stream is unusable from here on
            return None
        assert frame is not None  # blocking channel
        try:
            work = _dispatch(state, frame)
        except (BrokenChannelError, ClosedError):
            return None  # a reply could not be sent: the parent is gone
        if work is not None:
            return work


def _dispatch(state: State, frame: Frame) -> Optional[Work]:
    """Serve one frame; the work to do for a RUN that resolved."""
    kind = frame.kind
    if kind != P.FORK:
        state.single_threaded = False  # the command may run code that starts threads
    if kind == P.FORK:
        if not frame.fds or not _is_socket(frame.fds[0]):  # nowhere to greet or fail
            return _malformed(state, frame, "a fork command without a socket for the clone")
        return do_fork(state, frame)
    if kind == P.SPAWN:  # replies on its own socket, errors included
        if not frame.fds or not _is_socket(frame.fds[0]):
            return _malformed(state, frame, "a spawn command without its reply socket")
        do_spawn(state, frame)
        return None
    if kind in _HANDLERS:
        if state.broken is None:
            try:
                _HANDLERS[kind](state, frame)
            except BaseException as exc:
                state.broken = P.encode_error(exc, P.NAMES[kind])
        else:
            _close_fds(frame.fds)
        return None
    if kind not in P.REPLYING:
        return _malformed(state, frame, f"unknown command kind {kind}")
    try:
        call_id, body = P.split_call(frame.payload)
    except ValueError as exc:
        return _malformed(state, frame, str(exc))
    if frame.fds:
        _close_fds(frame.fds)
        exc = ProtocolError(f"a {P.NAMES[kind]} command came with {len(frame.fds)} fds")  # type: ignore[misc]
        state.broken = state.broken or P.encode_error(exc, P.NAMES[kind])  # type: ignore[misc]  # a new exc: the except's was deleted
    if state.broken is not None:
        state.chan.send(P.ERROR, P.with_call(call_id, state.broken))
        return None
    name = P.NAMES[kind]
    body_frame = Frame(kind, body, [])
    if kind == P.RUN:
        try:
            func, opts = resolve(state, body_frame)
        except BaseException as exc:
            state.chan.send(P.ERROR, P.with_call(call_id, P.encode_error(exc, name)))
            return None
        state.chan.send(P.RUNNING, P.with_call(call_id))
        return func, state.sent, opts
    try:
        _REPLYING[kind](state, body_frame)
    except BaseException as exc:
        state.chan.send(P.ERROR, P.with_call(call_id, P.encode_error(exc, name)))
    else:
        state.chan.send(P.RESULT, P.with_call(call_id))
    return None


def _malformed(state: State, frame: Frame, why: str) -> Optional[Work]:  # None: _dispatch returns it
    """Refuse a frame that does not follow the protocol: close its fds, break the template."""
    _close_fds(frame.fds)
    if state.broken is None:
        exc = ProtocolError(
            f"template {os.getpid()}: {why}; this template refuses every command from now on"
        )
        state.broken = P.encode_error(exc, P.NAMES.get(frame.kind, f"kind {frame.kind}"))
    return None


def _is_socket(fd: int) -> bool:
    try:
        return stat.S_ISSOCK(os.fstat(fd).st_mode)
    except OSError:
        return False


def _close_fds(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _last_words(state: State, exc: BaseException) -> None:
    """Tell the parent why we stop serving (an ERROR of call id 0), if it still listens."""
    try:
        state.chan.send(P.ERROR, P.with_call(0, P.encode_error(exc, "the command loop")))
    except BaseException:
        pass  # it does not: exiting is all that is left


def _work(chan: FdChannel, work: Work) -> int:
    """Become the worker: call func(control, *sent); return its exit status.

    0 when it returns, 1 (traceback on stderr) when it raises, the code of a
    ``SystemExit``.  ``KeyboardInterrupt`` propagates: Python then ends the
    process with SIGINT, as it would at top level.
    """
    func, sent, opts = work
    control = chan.sock  # blocking, close-on-exec
    drop_reserve()  # a worker receives no more frames: no sentinels to keep
    if not opts.get("titled"):
        set_title("fs:" + getattr(func, "__name__", "worker"))
    _signal.signal(_SIGINT, signal.default_int_handler)
    if not _hup_ignored:
        _signal.signal(_SIGHUP, _signal.SIG_DFL)
    if opts.get("die_with_parent"):
        watch_parent(opts["die_with_parent"], opts["parent"])
    try:
        func(control, *sent)
    except SystemExit as exc:
        return _exit_code(exc)
    except KeyboardInterrupt:
        raise
    except BaseException:
        import traceback

        traceback.print_exc()
        return 1
    return 0


def _exit_code(exc: SystemExit) -> int:
    """The status ``sys.exit(arg)`` gives at top level (a message is printed, status 1)."""
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def finish(code: int) -> "NoReturn":
    """End a template or worker the way multiprocessing ends its children.

    Non-daemon threads are joined and atexit callbacks run, std streams are
    flushed, then ``os._exit``: a full interpreter finalisation would cost
    milliseconds per child and tear down objects shared with the template.
    """
    threading = sys.modules.get("threading")  # never imported: no thread to join
    try:
        # Each step only when there is something to do: a worker that started
        # no thread and registered nothing exits without touching more pages.
        if threading is not None and threading.active_count() > 1:
            threading._shutdown()
        if atexit._ncallbacks():
            atexit._run_exitfuncs()
    finally:
        flush_std()
        os._exit(code)


def close_inherited(*keep: int) -> None:
    """Close every fd but 0-2 and ``keep``: what a freshly exec'd template inherited.

    posix_spawn (like exec) passes on every fd of the parent not marked
    close-on-exec.  A template holding one -- say the write end of a pipe of
    the user's, or a listening socket -- would keep it open in every worker
    cloned from it for as long as they live: a reader would never see EOF, a
    port would stay taken.  ``subprocess`` closes them too (``close_fds``).
    """
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass  # the fd listdir used, closed already


def main(fd: int = 3, slots: int = -1) -> int:
    """Entry point of a template: serve the command socket on ``fd``.

    ``slots``: the parent's pid slots memfd (``forkserver._slots``), if given.
    Returns 0 when the socket reaches EOF; a worker never returns (it exits).
    """
    if slots >= 0:
        region.attach(slots)
    # Ctrl-C in the terminal reaches every process of the foreground group,
    # and so does the hang-up of a closing terminal or a `kill -HUP` of the
    # process group (a server's usual "reload"); a template waiting for
    # commands must not die of them: it ends when its parent closes its
    # socket.  Workers get both back (_work); programs too (_exec: dfl_sigs).
    global _hup_ignored
    _hup_ignored = signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    os.set_inheritable(fd, False)
    for std in (0, 1, 2):  # keep 0-2 taken, so no socket or received fd lands there
        try:
            os.fstat(std)
        except OSError:
            os.open(os.devnull, os.O_RDWR)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fileno=fd)
    sock.setblocking(True)
    chan = FdChannel(sock)
    try:
        greet(chan)
    except BrokenChannelError:
        return 0  # the parent is gone already
    state = State(chan)
    set_title("fs:template")
    work = serve(state)
    if work is None:
        return 0
    # Exit from here: returning would drop ``state`` and finalise the control
    # socket, whose ResourceWarning would format its repr (two syscalls).
    finish(_work(state.chan, work))
