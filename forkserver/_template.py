"""``Template``: a not-yet-run process, driven from the parent.

Each template is a process sitting in the command loop of
``forkserver/_server/_loop.py`` on its own unnamed AF_UNIX socket.  Commands
are pipelined: ``send_arg``, ``send_fh`` and ``fork`` return at once;
``require``, ``eval`` and ``run`` wait for their reply, and raise any error
of an earlier pipelined command.  Each ``Template`` serialises its own calls
with a lock, so many threads may use many templates (or one) at once.
"""
from __future__ import annotations

import atexit
import os
import pickle
import signal
import socket
import sys
import threading
import weakref
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

from . import _protocol as P
from ._boot import exec_interpreter, fork_this_process
from ._cloning import Cloning
from ._context import caller_context, dup_all
from ._default import _default
from ._errors import BrokenChannelError, BrokenTemplateError, ClosedError, ProtocolError
from ._fds import FdChannel, Frame
from ._process import Child
from ._wait import ReapedElsewhere, open_pidfd, reap, wait_channel

Handle = Union[int, socket.socket, Any]
Target = Union[str, Callable[..., Any]]

_CLOSE_GRACE = 5.0  # seconds a closed template gets to exit before SIGKILL
_WAIT = object()  # _step: nothing complete yet, wait for the socket
_HELLO_READ = object()  # _step: the greeting was read
_KEEPS_STATE = (P.FORK, P.SPAWN)  # commands that leave the template as it was


class Template(Cloning):
    """A template process: load code and data into it, then ``fork()`` or ``run()`` it.

    ``Template()`` creates a new, empty template, cloned from the shared
    default template, that adopts the caller's *current* environment, working
    directory, ``sys.path`` and stdio (fds 0-2).  Override any of them::

        Template(env={...}, cwd="/srv", stdin=subprocess.DEVNULL, stdout=logfile)

    ``gc_freeze=False`` turns off ``gc.freeze()`` before each fork (it keeps
    the preloaded objects' memory pages shared with the children).

    **The namespace.**  A template's code lives in one module of its own,
    ``forkserver.template`` (a real module in the template's
    ``sys.modules``; see :mod:`forkserver.template`): ``require("a.b")``
    binds ``a`` there, as ``import a.b`` would; ``eval`` runs there; forks
    copy it; ``run("handler")`` -- a bare name -- calls a function defined
    there, and worker code reads it with ``from forkserver.template import
    NAME``::

        t = Template().require("mypkg.model")
        t.eval("MODEL = mypkg.model.load(args[0])", "weights.bin")
        t.eval("def handler(control, *args): control.sendall(repr(MODEL).encode())")
        child = t.fork().run("handler")        # or "forkserver.template:handler"

    What ``eval`` defines has ``__module__ == "forkserver.template"``, so
    pickle finds it in workers and forks.  (A template made by
    :func:`early` keeps your program's ``__main__`` as well: ``run(f)`` of a
    function of your script works there.)

    Once a template has been forked, it keeps one clone of itself ready (a
    *spare*, made while you do other things), so the next ``fork()`` need
    not wait for a clone to be made.  The spare is an idle process, your
    child like the others, ended with its template; any command that changes
    the template replaces it.  ``spare=False`` keeps none (forks of this
    template inherit the setting).
    """

    def __init__(
        self,
        *,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[Union[str, os.PathLike]] = None,
        stdin: Optional[Handle] = None,
        stdout: Optional[Handle] = None,
        stderr: Optional[Handle] = None,
        gc_freeze: bool = True,
        spare: bool = True,
    ) -> None:
        context = caller_context(env, cwd, (stdin, stdout, stderr), sys.path, gc_freeze)
        try:
            for attempt in (1, 2, 3):
                base = default_template()
                with base._lock:
                    clone, was_spare = base._clone()
                self._adopt(clone._chan, "Template()", clone._pid)
                self._take_over(clone)
                self._keep_spare = spare
                try:
                    self._read_hello()
                    break
                except BrokenTemplateError:
                    # EOF before the greeting.  A spare may have been killed
                    # since it was made: try a fresh clone.  Else the default
                    # template died before it could fork (nothing was
                    # created): start a new one, once.
                    if not was_spare:
                        _default.discard(base)
                    if attempt == 3:
                        raise
        except BaseException:
            for fd in context[2]:
                os.close(fd)
            raise
        self._setup(*context)

    # -- construction ----------------------------------------------------------

    @classmethod
    def _from_channel(cls, chan: FdChannel, origin: str, pid: Optional[int] = None) -> "Template":
        self = cls.__new__(cls)
        self._adopt(chan, origin, pid)
        return self

    def _adopt(self, chan: FdChannel, origin: str, pid: Optional[int] = None) -> None:
        self._chan = chan
        self._origin = origin
        self._pid = pid  # known once HELLO is read (or at spawn)
        self._pidfd: Optional[int] = None
        self._lock = threading.RLock()
        self._status = "starting"  # pending, starting, ready, running, closed, broken
        self._owner = os.getpid()
        _live.add(self)
        # A fork() is deferred until it is needed ("pending"): its first
        # send_arg/send_fh calls ride along with the FORK command, and a
        # run() fuses with it, so the clone starts the worker at once.
        self._base: Optional[Template] = None
        self._prelude: List[tuple] = []  # (kind, payload, dup'd fds)
        self._pending: "weakref.WeakSet[Template]" = weakref.WeakSet()
        self._main_ok = False  # True when the template has the caller's __main__ (early())
        # After its first fork(), a template keeps one clone of itself ready:
        # the next fork() takes it instead of waiting for a clone to be made.
        self._keep_spare = True
        self._spare: Optional[Template] = None
        # The base to ask for its next spare after the run's reply, and
        # whether that clone waits for the worker's exit (see "When the next
        # spare is made").
        self._refill_after_run: Optional[Template] = None
        self._refill_after_exit = False

    def _take_over(self, clone: "Template") -> None:
        """Take ``clone``'s process (socket, pid, pidfd, state); ``clone`` is left spent."""
        self._chan, self._pid, self._status = clone._chan, clone._pid, clone._status
        self._pidfd, clone._pidfd = clone._pidfd, None
        self._main_ok, self._keep_spare = clone._main_ok, clone._keep_spare
        clone._status = "closed"
        _live.discard(clone)

    @classmethod
    def new_exec(
        cls,
        *,
        python: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[Union[str, os.PathLike]] = None,
        sys_path: Optional[Sequence[str]] = None,
        gc_freeze: bool = True,
        spare: bool = True,
    ) -> "Template":
        """A template that is a freshly exec'd interpreter of its own.

        ``python`` defaults to ``sys.executable``; it must be able to import
        this forkserver (same Python version).  ``env`` is the environment the
        interpreter starts with (default: the caller's current one), ``cwd``
        its directory (default: the caller's).  ``sys_path`` defaults to
        what the new interpreter computes itself, plus this forkserver.
        """
        chan, pid, pidfd = exec_interpreter(python or sys.executable, dict(os.environ if env is None else env))
        tpl = cls._from_channel(chan, "Template.new_exec()", pid)
        tpl._pidfd = pidfd
        tpl._keep_spare = spare
        ctx: Dict[str, Any] = {"cwd": os.fspath(cwd) if cwd is not None else os.getcwd()}
        if sys_path is not None:
            ctx["sys_path"] = list(sys_path)
        ctx["gc_freeze"] = gc_freeze
        tpl._setup(ctx)
        return tpl

    def _setup(self, ctx: Dict[str, Any], fds: Sequence[int] = (), opened: Sequence[int] = ()) -> None:
        """Send the context; ``opened`` are fds we opened for it and close once sent."""
        try:
            self._send(P.SETUP, P.dumps(ctx), fds)
        finally:
            for fd in opened:
                os.close(fd)

    # -- state -----------------------------------------------------------------

    @property
    def pid(self) -> int:
        """The template process's pid (waits for it to greet us if need be)."""
        with self._lock:
            if self._status == "pending":
                self._materialize()
            if self._pid is None:
                self._check_open("pid")
                self._read_hello()
            assert self._pid is not None
            return self._pid

    def __repr__(self) -> str:
        pid = f"pid={self._pid} " if self._pid is not None else ""
        return f"<forkserver.Template {pid}{self._status} from {self._origin}>"

    def _check_open(self, what: str) -> None:
        if self._owner != os.getpid():
            raise ClosedError(
                f"{what} on {self!r}: it belongs to process {self._owner}, not to this forked "
                "copy; create a new Template in this process"
            )
        if self._status == "running":
            raise ClosedError(f"{what} on {self!r}: run() consumed it; fork() before run() to reuse it")
        if self._status == "closed":
            raise ClosedError(f"{what} on {self!r}: it was closed; create a new Template")
        if self._status == "broken":
            raise BrokenTemplateError(f"{what} on {self!r}: the template process is gone; create a new Template")

    def _broken(self, cause: BaseException, what: str) -> BrokenTemplateError:
        """Mark the template dead, reap it if we can, and build the error to raise."""
        self._status = "broken"
        self._chan.close()
        self._drop_spare()
        if self._pid is not None:
            self._reap(timeout=_CLOSE_GRACE)
        return BrokenTemplateError(
            f"{what} on {self!r}: the template process died or closed its socket; "
            "create a new Template (the default template restarts by itself)"
        )

    # -- wire ------------------------------------------------------------------

    def _send(self, kind: int, payload: bytes = b"", fds: Sequence[Any] = ()) -> None:
        with self._lock:
            self._check_open(P.NAMES[kind])
            if self._status == "pending":
                if kind in (P.SEND_ARG, P.SEND_FH):
                    self._prelude.append((kind, payload, dup_all(fds)))
                    return
                self._materialize()
            if kind not in _KEEPS_STATE:
                if self._pending:
                    self._start_pending_forks()  # they are snapshots of the state before it
                if self._spare is not None:
                    self._drop_spare()  # it is a copy of the state this command changes
            try:
                self._chan.send(kind, payload, fds)
            except BrokenChannelError as exc:
                raise self._broken(exc, P.NAMES[kind]) from exc

    def _next_frame(self, what: str, until_hello: bool = False) -> Optional[Frame]:
        """The next frame after HELLO (None once HELLO is read, with ``until_hello``).

        Raises the remote error for an ERROR frame.
        """
        while True:
            frame = self._step(what)
            if frame is _WAIT:
                wait_channel(self._chan, None)
                continue
            if frame is _HELLO_READ:
                if until_hello:
                    return None
                continue
            return frame  # type: ignore[return-value]

    def _step(self, what: str) -> Any:
        """One non-blocking step of reading a reply: a Frame, _WAIT or _HELLO_READ.

        Shared by the blocking calls here and the coroutines of ``forkserver.aio``.
        """
        chan = self._chan
        try:
            chan.flush()
            frame = chan.receive()
        except (BrokenChannelError, ProtocolError) as exc:
            raise self._broken(exc, what) from exc
        if frame is None:
            return _WAIT
        if frame.kind == P.HELLO and self._status == "starting":
            self._hello(frame)
            return _HELLO_READ
        if frame.kind == P.ERROR:
            if self._status == "starting":  # the fork itself failed
                self._status = "broken"
                self._chan.close()
            raise P.decode_error(frame.payload)
        return frame

    def _hello(self, frame: Frame) -> None:
        try:
            version, pid = P.HELLO_FORMAT.unpack(frame.payload)
        except Exception:
            version, pid = None, 0
        if version != P.VERSION:
            self._status = "broken"
            self._chan.close()
            raise ProtocolError(
                f"{self!r} speaks protocol {version}, we speak {P.VERSION}: "
                "the template runs another forkserver version; reinstall so both match"
            )
        if self._pid is None:
            self._pid = pid
        if self._pidfd is None:
            self._pidfd = open_pidfd(self._pid)
        self._status = "ready"

    def _read_hello(self) -> None:
        """Wait for the greeting, unless it was read already."""
        if self._status != "starting":
            return
        frame = self._next_frame("hello", until_hello=True)
        if frame is not None:
            raise ProtocolError(f"{self!r}: expected its greeting, got a {P.NAMES.get(frame.kind)} frame")

    def _call(self, kind: int, payload: bytes) -> Frame:
        with self._lock:
            self._send(kind, payload)
            frame = self._next_frame(P.NAMES[kind])
            assert frame is not None
            return frame

    # -- the public verbs --------------------------------------------------------

    def require(self, *modules: str) -> "Template":
        """Import ``modules`` in the template; an import error is raised here. Returns self.

        As ``import a.b`` would, ``require("a.b")`` binds ``a`` in the
        template's namespace (``forkserver.template``), so a later ``eval``
        can use ``a.b`` without importing it.
        """
        for name in modules:
            if not isinstance(name, str) or not name:
                raise TypeError(f"require({name!r}): module names are non-empty strings")
        self._call(P.REQUIRE, P.dumps(modules))
        return self

    def eval(self, source: str, *args: Any) -> "Template":
        """Execute ``source`` in the template with ``args`` bound as ``args``. Returns self.

        It runs as the body of the template's namespace module,
        ``forkserver.template``: the names it defines are that module's
        globals, there for later ``eval`` calls, for forks, for
        ``run("name")`` and for worker code (``from forkserver.template
        import NAME``).  A remote exception is raised here, with its type.
        """
        if not isinstance(source, str):
            raise TypeError(f"eval(): source must be a str, got {type(source).__name__}")
        self._call(P.EVAL, P.dumps((source, args)))
        return self

    def send_arg(self, *objs: Any) -> "Template":
        """Queue picklable objects as the worker's next arguments. Returns self."""
        try:
            payload = P.dumps(list(objs))
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            raise type(exc)(f"send_arg(): {exc}; only picklable objects can be sent") from exc
        self._send(P.SEND_ARG, payload)
        return self

    def send_fh(self, *handles: Handle) -> "Template":
        """Send sockets, file objects or int fds as the worker's next arguments.

        They are duplicated at once: close your copies whenever you like.  The
        worker receives the same kind (socket, file object with the same mode,
        int).  Returns self.
        """
        described = [P.describe_handle(h) for h in handles]
        self._send(P.SEND_FH, P.dumps([d for _, d in described]), [fd for fd, _ in described])
        return self

    def fork(self) -> "Template":
        """A new template: a clone of this one with everything loaded and sent so far.

        The clone is made when first needed (any waiting call on it, or any
        further command to this template), so ``t.fork().send_arg(x).run(f)``
        costs one command and one reply.  If this template keeps a spare
        clone ready (see the class docs), that clone is used.
        """
        with self._lock:
            self._check_open("fork")
            if self._status == "pending":
                self._materialize()
            tpl = Template.__new__(Template)
            tpl._adopt(None, f"{self._origin}.fork()")  # type: ignore[arg-type]
            tpl._status = "pending"
            tpl._base = self
            tpl._main_ok, tpl._keep_spare = self._main_ok, self._keep_spare
            self._pending.add(tpl)
            return tpl

    def run(
        self,
        target: Target,
        *,
        check: bool = False,
        timeout: Optional[float] = None,
        die_with_parent: Union[bool, int] = False,
        kill_on_exit: bool = False,
    ) -> Child:
        """Turn the template into a worker running ``target(control, *sent)``.

        ``target`` is ``"pkg.mod:func"``, ``"pkg.mod.func"``, a module-level
        function, or a bare ``"name"``: a function ``eval`` defined in the
        template's namespace (``"forkserver.template:name"``).  Returns once
        the process has started it; a missing module or function raises here
        (and the template stays usable).  ``check=True``: ``child.wait()``
        and the end of ``with child:`` raise ``CalledProcessError`` when the
        worker exits non-zero (``poll()`` only reports).  ``timeout`` bounds
        the wait at the end of ``with t.run(f, timeout=10) as child:``.
        ``die_with_parent=True`` (or a signal number) sends the worker
        SIGKILL (or that signal) when this process exits, even if it is
        killed; by default workers outlive their parent.  ``kill_on_exit=True``
        SIGKILLs and reaps the worker when this interpreter exits normally.
        """
        with self._lock:
            child = None
            try:
                target_names = self._start_run(target, die_with_parent)
                child = self._finish_run(self._next_frame("run"), target_names, check, timeout)
            finally:
                self._refill_base(child)
        if kill_on_exit:
            _kill_on_exit.add(child)
        return child

    def _start_run(self, target: Target, die_with_parent: Union[bool, int]) -> str:
        """Send the run (fused with a deferred fork when there is one); lock held."""
        if die_with_parent is True:
            die_with_parent = int(signal.SIGKILL)
        opts = {"die_with_parent": int(die_with_parent), "parent": os.getpid()} if die_with_parent else {}
        module, qualname = P.split_target(target, main_ok=self._main_ok)
        if self._status == "pending":
            self._check_open("run")
            self._materialize(run=(module, qualname, opts))
        else:
            self._send(P.RUN, P.dumps((module, qualname, opts)))
        return f"{module}:{qualname}"

    def _finish_run(self, frame: Any, target: str, check: bool, timeout: Optional[float]) -> Child:
        """Turn the RUNNING reply into a Child; lock held."""
        if frame is None or frame.kind != P.RUNNING:
            kind = P.NAMES.get(frame.kind) if frame is not None else None
            raise ProtocolError(f"{self!r}: expected the run acknowledgement, got {kind}")
        if self._pid is None:  # a fused fork and run: the pid comes with the reply
            self._pid = P.HELLO_FORMAT.unpack(frame.payload)[1]
            self._pidfd = open_pidfd(self._pid, gone_ok=True)  # SIGCHLD=SIG_IGN: may be gone
        self._status = "running"
        control = self._chan.sock  # the channel read exactly up to RUNNING
        pidfd, self._pidfd = self._pidfd, None
        return Child(self._pid, control, target, pidfd, check=check, exit_timeout=timeout)

    # -- closing -----------------------------------------------------------------

    def close(self) -> None:
        """Discard the template: its process exits and is reaped. Idempotent."""
        with self._lock:
            if self._status in ("closed", "running") or self._owner != os.getpid():
                return
            spare, self._spare = self._spare, None
            if spare is not None:
                spare.close()
            if self._status == "pending":  # never created: nothing to end
                if self._base is not None:
                    self._base._pending.discard(self)
                for _, _, dups in self._prelude:
                    for fd in dups:
                        os.close(fd)
                self._prelude = []
                self._status = "closed"
                return
            if self._status == "starting":
                self._give_up()
                try:
                    self._read_hello()
                except Exception:
                    pass  # it failed to start or died: nothing to wait for but the reap
            self._status = "closed"
            if self._chan is None:  # its fork failed: no process was made
                return
            self._chan.close()  # EOF: the template's loop ends
            self._reap(_CLOSE_GRACE)

    def _give_up(self) -> None:
        """Tell a template whose greeting we have not read that we send nothing more.

        A spare asked for "after" a worker may not exist yet: its template
        is waiting, and sees this EOF on the new socket instead of making a
        clone nobody wants (see _server/_fork.py, ``_still_wanted``).  A
        template that exists reads the commands sent so far, then the EOF.
        """
        try:
            self._chan.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # already gone: the greeting read that follows says so

    def _reap(self, timeout: float) -> None:
        if self._pid is None or self._pidfd is None:
            return
        try:
            if reap(self._pid, self._pidfd, timeout) is None:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
                reap(self._pid, self._pidfd, None)
        except ReapedElsewhere:
            pass  # a waitpid(-1) of the caller's got there first: gone all the same
        self._close_pidfd()

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    def __del__(self) -> None:
        # Dropped without close(): end the process and let the reaper wait for it.
        try:
            if self._owner == os.getpid():
                self._abandon()
        except Exception:
            pass  # interpreter shutdown: the kernel reparents what is left

    def _abandon(self) -> None:
        """End the process without waiting for it: the reaper thread reaps it."""
        status, self._status = self._status, "closed"
        self._drop_spare()
        if status == "pending":
            for _, _, dups in self._prelude:
                for fd in dups:
                    os.close(fd)
            self._prelude = []
        elif status in ("starting", "ready") and not self._chan.closed:
            from ._reaper import reaper

            if self._pid is None:
                self._give_up()
                reaper.adopt_greeting(self._chan)  # it reads the pid, then closes
                return
            self._chan.close()
            pidfd, self._pidfd = self._pidfd, None
            reaper.adopt(self._pid, pidfd)

    def __enter__(self) -> "Template":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_live: "weakref.WeakSet[Template]" = weakref.WeakSet()  # templates to end at exit
_kill_on_exit: "weakref.WeakSet[Child]" = weakref.WeakSet()


def default_template() -> Template:
    """The shared default template of this process, started on first use."""
    return _default.get(_start_default)


def _start_default() -> Template:
    chan, pid, pidfd = exec_interpreter(sys.executable, dict(os.environ))
    tpl = Template._from_channel(chan, "the default template", pid)
    tpl._pidfd = pidfd
    return tpl


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
    with _default.lock:
        if _default.template is not None:
            raise RuntimeError(
                "forkserver.early() must come before any other use of forkserver in this "
                "process; call it at the top of your main program"
            )
        _check_early_single_threaded()
        chan, pid, pidfd = fork_this_process()
        tpl = Template._from_channel(chan, "forkserver.early()", pid)
        tpl._pidfd = pidfd
        tpl._main_ok = True
        _default.template = tpl


def _check_early_single_threaded() -> None:
    """early() forks the caller itself: refuse, in the caller's terms, if it has threads."""
    from ._errors import ThreadedTemplateError
    from ._server._hygiene import thread_count, thread_names

    count = thread_count()
    if count > 1:
        raise ThreadedTemplateError(
            f"forkserver.early() must be called before any thread starts, and this program "
            f"already runs {count} threads ({'; '.join(thread_names())}): a fork of it would "
            "keep locks held by threads that do not exist in the copy. Call early() at the "
            "very top of your main program, before the imports or code that start threads; "
            "or do without early(): Template() works from a threaded program (it clones a "
            "freshly started interpreter instead)"
        )


def _at_exit() -> None:
    """Interpreter exit: templates end (and are reaped); kill_on_exit workers die.

    Other running workers are left running: they are yours, as with subprocess.
    """
    for child in list(_kill_on_exit):
        child.kill()
        child._wait()  # no check: we killed it
    for tpl in list(_live):
        if tpl is not _default.template and tpl._status not in ("running", "closed"):
            tpl.close()
    _default.shutdown()


atexit.register(_at_exit)
