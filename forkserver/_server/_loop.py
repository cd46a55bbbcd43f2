"""The template command loop (runs inside template processes).

A template reads commands from its blocking command socket, one frame at a
time, until ``RUN`` turns it into a worker or EOF tells it to exit.  On
``FORK`` it clones itself with ``fork_sibling``: the clone drops the old
socket, greets the parent on the new one and goes on in this same loop as a
template of its own — the stack does not grow.  ``SPAWN`` starts an external
program (``_exec.py``).
"""
from __future__ import annotations

# Imported now, in the template: a module's first import in a worker would
# cost it copy-on-write faults on its way out (``atexit`` is built in, but
# nothing imports it at start-up; importing it in ``finish`` cost a worker
# ~90 faults, 0.26 ms).  ``_signal`` is ``signal`` without the enum wrappers.
import _signal
import atexit
import gc
import importlib
import itertools
import linecache
import os
import re
import select
import signal
import socket
import sys
from typing import Any, Callable, List, NoReturn, Optional, Tuple

from .. import _protocol as P
from .._errors import BrokenChannelError, ForkserverError
from .._fds import FdChannel, Frame, drop_reserve, fork_sibling
from ._exec import do_spawn
from ._hygiene import check_single_threaded, set_title, thread_count, thread_limits, watch_parent

Work = Tuple[Callable[..., Any], List[Any], dict]  # func, sent items, run options
_eval_counter = itertools.count(1)
_SIGINT = int(signal.SIGINT)
_REHEARSAL = Frame(P.RUN, P.dumps((__name__, "_noop", {})), [])


class _State:
    """Everything a template has; a clone inherits all of it."""

    def __init__(self, chan: FdChannel) -> None:
        self.chan = chan
        self.sent: List[Any] = []  # send_arg/send_fh items, in call order
        self.namespace: dict = {"__name__": "__forkserver_eval__"}
        self.broken: Optional[bytes] = None  # encoded first error of a pipelined command
        self.culprits: List[str] = []  # require/eval calls that started threads
        self.gc_freeze = True
        # True from a thread check that found one thread until the next
        # command other than a bare FORK: nothing else runs code that could
        # start a thread, so the spare clones asked for in a row skip it.
        self.single_threaded = False

    def reply_error(self, exc: BaseException, context: str) -> None:
        self.chan.send(P.ERROR, P.encode_error(exc, context))


def _greet(chan: FdChannel) -> None:
    chan.send(P.HELLO, P.HELLO_FORMAT.pack(P.VERSION, os.getpid()))


def _import_checked(state: _State, what: str, func: Callable[[], Any]) -> Any:
    """Run an import/eval under thread-pool limits; remember it if it started threads."""
    before = thread_count()
    with thread_limits():
        result = func()
    if thread_count() > before:
        state.culprits.append(what)
    return result


def _do_setup(state: _State, frame: Frame) -> None:
    ctx = P.loads(frame.payload)
    fds = iter(frame.fds)
    for target in ctx.get("stdio", ()):
        fd = next(fds)
        os.dup2(fd, target)  # dup2 makes the target inheritable, as stdio must be
        os.close(fd)
    if ctx.get("env") is not None:
        os.environ.clear()
        os.environ.update(ctx["env"])
    if ctx.get("cwd") is not None:
        os.chdir(ctx["cwd"])
    if ctx.get("sys_path") is not None:
        sys.path[:] = ctx["sys_path"]
        importlib.invalidate_caches()
    if "gc_freeze" in ctx:
        state.gc_freeze = ctx["gc_freeze"]
        if not state.gc_freeze:
            gc.unfreeze()  # what the default template froze is collectable again


def _do_require(state: _State, frame: Frame) -> None:
    names = P.loads(frame.payload)
    for name in names:
        _import_checked(state, f"require({name!r})", lambda: importlib.import_module(name))


def _do_eval(state: _State, frame: Frame) -> None:
    source, args = P.loads(frame.payload)
    # Register the source so remote tracebacks show the failing line.
    filename = f"<forkserver eval {next(_eval_counter)}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    code = compile(source, filename, "exec")
    state.namespace["args"] = args
    short = source if len(source) < 40 else source[:37] + "..."
    _import_checked(state, f"eval({short!r})", lambda: exec(code, state.namespace))


def _do_send_arg(state: _State, frame: Frame) -> None:
    state.sent.extend(P.loads(frame.payload))


def _do_send_fh(state: _State, frame: Frame) -> None:
    descs = P.loads(frame.payload)
    state.sent.extend(P.rebuild_handle(fd, desc) for fd, desc in zip(frame.fds, descs))


def _resolve(state: _State, frame: Frame) -> Tuple[Callable[..., Any], dict]:
    module_name, qualname, opts = P.loads(frame.payload)
    return _resolve_target(state, module_name, qualname), opts


def _resolve_target(state: _State, module_name: str, qualname: str) -> Callable[..., Any]:
    obj: Any = sys.modules.get(module_name)
    if obj is None:  # the hot path (module preloaded) touches nothing else
        obj = _import_checked(
            state, f"run({module_name!r})", lambda: importlib.import_module(module_name)
        )
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AttributeError(
                f"module {module_name!r} has no attribute {qualname!r}; check the name passed to run()"
            ) from None
    if not callable(obj):
        raise TypeError(f"{module_name}:{qualname} is {obj!r}, which is not callable")
    return obj


def _do_fork(state: _State, frame: Frame) -> Optional[Work]:
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
    func = None
    try:
        if state.broken is not None:
            raise _Refused(state.broken)
        spec = P.loads(frame.payload) if frame.payload else {}
        prelude, run, spare = spec.get("prelude", ()), spec.get("run"), spec.get("spare", False)
        if prelude:
            extra, handles = _decode_prelude(prelude, frame.fds[1:])
        if run is not None:
            module_name, qualname, opts = run
            func = _resolve_target(state, module_name, qualname)
            # The clone inherits our name: no /proc write on its side.
            set_title("fs:" + getattr(func, "__name__", "worker"))
            opts = dict(opts, titled=True)
        if spec.get("after") is not None and not _wait_for_reap(spec["after"], state.chan, new_sock):
            new_chan.close()  # the parent gave this spare up before it was made
            return None
        if prelude or run is not None or not state.single_threaded:
            check_single_threaded(state.culprits)
            state.single_threaded = True
        sys.stdout.flush()  # else the clone would print our buffered output again
        sys.stderr.flush()
        if state.gc_freeze:
            gc.freeze()  # keep preloaded objects' pages shared with the clones
        pid = fork_sibling()
    except BaseException as exc:
        if func is not None:
            set_title("fs:template")
        _close_handles(handles)
        payload = exc.args[0] if isinstance(exc, _Refused) else P.encode_error(exc, "fork()")
        new_chan.send(P.ERROR, payload)
        new_chan.close()
        return None
    if pid:
        if func is not None:
            set_title("fs:template")
        new_chan.close()
        _close_handles(handles)  # the clone has its own copies
        return None
    # In the clone: close our copy of the template's socket (else the parent
    # would not see EOF when the template dies), serve the new one.
    os.close(state.chan.sock.detach())
    state.chan = new_chan
    state.sent.extend(extra)
    if func is not None:
        state.chan.send(P.RUNNING, P.HELLO_FORMAT.pack(P.VERSION, os.getpid()))
        return func, state.sent, opts
    if spare:
        _rehearse(state)  # first: a spare's greeting tells the parent it is ready
    _greet(state.chan)
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


def _rehearse(state: _State) -> None:
    """Walk a worker's start-up and exit path once, unless a command is waiting."""
    try:
        if state.chan.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
            return  # EOF: the loop ends at its next receive
    except BlockingIOError:
        pass  # nothing waiting: idle time
    except OSError:
        return  # the loop's receive reports it
    else:
        return  # a command is waiting: serve it first
    _resolve(state, _REHEARSAL)
    set_title("fs:template")
    _signal.signal(_SIGINT, _signal.SIG_IGN)
    atexit._ncallbacks()
    _flush_std()


def _noop() -> None:
    """The target ``_rehearse`` resolves."""


def _wait_for_reap(pid: int, chan: FdChannel, new_sock: socket.socket) -> bool:
    """Wait until the worker ``pid`` is reaped (exited, on older kernels), or
    ``chan`` or ``new_sock`` has input.

    False if ``new_sock`` reached EOF meanwhile: the parent no longer wants
    the clone (it shuts its end down for writing when it gives up a spare
    whose greeting it has not read), so none is made.

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
        return True  # gone already (ESRCH), or no pidfds here: clone now
    try:
        poller = select.poll()
        poller.register(pidfd, 0 if _HUP_ON_REAP else select.POLLIN)  # POLLHUP is always reported
        for fd in (chan.fileno(), new_sock.fileno()):
            poller.register(fd, select.POLLIN)
        poller.poll()
    finally:
        os.close(pidfd)
    try:
        return new_sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except OSError:  # BlockingIOError: nothing sent yet, as it should be
        return True


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
        _close_handles(handles)
        raise
    return items, handles


def _close_handles(handles: List[Any]) -> None:
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


_HANDLERS = {
    P.SETUP: _do_setup,
    P.SEND_ARG: _do_send_arg,
    P.SEND_FH: _do_send_fh,
}
_REPLYING = {P.REQUIRE: _do_require, P.EVAL: _do_eval}


def serve(state: _State) -> Optional[Work]:
    """Serve commands until RUN (returns the work to do) or EOF (returns None)."""
    while True:
        try:
            frame = state.chan.receive()
        except BrokenChannelError:
            return None  # the parent closed our socket or died: exit quietly
        assert frame is not None  # blocking channel
        kind = frame.kind
        if kind != P.FORK:
            state.single_threaded = False  # the command may run code that starts threads
        if kind == P.FORK:
            work = _do_fork(state, frame)
            if work is not None:
                return work
            continue
        if kind == P.SPAWN:  # replies on its own pipe, errors included
            do_spawn(state, frame)
            continue
        name = P.NAMES.get(kind, f"kind {kind}")
        if kind in _HANDLERS:
            if state.broken is None:
                try:
                    _HANDLERS[kind](state, frame)
                except BaseException as exc:
                    state.broken = P.encode_error(exc, name)
            else:
                for fd in frame.fds:
                    os.close(fd)
            continue
        if state.broken is not None:
            state.chan.send(P.ERROR, state.broken)
            continue
        if kind in _REPLYING:
            try:
                _REPLYING[kind](state, frame)
            except BaseException as exc:
                state.reply_error(exc, name)
            else:
                state.chan.send(P.RESULT)
            continue
        if kind == P.RUN:
            try:
                func, opts = _resolve(state, frame)
            except BaseException as exc:
                state.reply_error(exc, name)
                continue
            state.chan.send(P.RUNNING)
            return func, state.sent, opts
        raise ForkserverError(f"template {os.getpid()}: unknown command kind {kind}")


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
            threading._shutdown()  # type: ignore[attr-defined]
        if atexit._ncallbacks():
            atexit._run_exitfuncs()
    finally:
        _flush_std()
        os._exit(code)


def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


def close_inherited(keep: int) -> None:
    """Close every fd but 0-2 and ``keep``: what a freshly exec'd template inherited.

    posix_spawn (like exec) passes on every fd of the parent not marked
    close-on-exec.  A template holding one -- say the write end of a pipe of
    the user's, or a listening socket -- would keep it open in every worker
    cloned from it for as long as they live: a reader would never see EOF, a
    port would stay taken.  ``subprocess`` closes them too (``close_fds``).
    """
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd != keep:
            try:
                os.close(fd)
            except OSError:
                pass  # the fd listdir used, closed already


def main(fd: int = 3) -> int:
    """Entry point of a template: serve the command socket on ``fd``.

    Returns 0 when the socket reaches EOF; a worker never returns (it exits).
    """
    # Ctrl-C in the terminal reaches every process of the foreground group;
    # a template waiting for commands must not die of it. Workers restore it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.set_inheritable(fd, False)
    for std in (0, 1, 2):  # keep 0-2 taken, so no socket or received fd lands there
        try:
            os.fstat(std)
        except OSError:
            os.open(os.devnull, os.O_RDWR)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fileno=fd)
    sock.setblocking(True)
    chan = FdChannel(sock)
    _greet(chan)
    state = _State(chan)
    set_title("fs:template")
    work = serve(state)
    if work is None:
        return 0
    # Exit from here: returning would drop ``state`` and finalise the control
    # socket, whose ResourceWarning would format its repr (two syscalls).
    finish(_work(state.chan, work))
