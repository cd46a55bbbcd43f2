"""``Template``: a not-yet-run process, driven from the parent.

Each template is a process sitting in the command loop of
``forkserver/_server/_loop.py`` on its own unnamed AF_UNIX socket.  Commands
are pipelined: ``send_arg``, ``send_fh`` and ``fork`` return at once;
``require``, ``eval`` and ``run`` wait for their reply, and raise any error
of an earlier pipelined command.  Each ``Template`` serialises its own calls
with a lock, so many threads may use many templates (or one) at once.

Interrupted calls (Ctrl-C, ``KeyboardInterrupt``; see docs/reliability.md).
A call takes the interrupt at a point where everything is consistent --
while it waits, or when it ends -- and leaves:

* ``require``/``eval``: the command still runs in the template; its reply
  is dropped by the next call, which gets its own (replies stay in step).
  The template stays usable.
* ``run``: no worker is left unreachable.  If the interrupt comes before
  ``run()`` returned its ``Child``, the worker (or the process told to
  become it) is SIGKILLed and reaped, and the template is consumed.
* ``Template()``: nothing is left behind; the default template stays usable.
* ``close()``: the template is closed all the same; if it had not exited
  yet, the reaper thread SIGKILLs it after the grace period and reaps it.

Any other exception in the middle of a call (``MemoryError``) leaves the
template either usable or broken (``BrokenTemplateError`` on its next use,
its process reaped); never a reply out of step, a lost pid or a double close.

Size (~550 lines): about half is the docstrings of ``Template``'s verbs, which are the
reference the docs render; the mechanics live in ``_link``, ``_running`` and
``_cloning``.
"""
from __future__ import annotations

import atexit
import itertools
import os
import pickle
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
from ._errors import BrokenChannelError, BrokenTemplateError
from ._fds import FdChannel, Frame
from ._interrupts import deferred
from ._link import AGAIN, CLOSE_GRACE, WAIT, Link
from ._process import Child
from ._running import Running, _kill_on_exit

Handle = Union[int, socket.socket, Any]
Target = Union[str, Callable[..., Any]]

_CLOSE_GRACE = CLOSE_GRACE
_WAIT, _AGAIN = WAIT, AGAIN  # for forkserver.aio
_HELLO_READ = AGAIN  # the older name
_KEEPS_STATE = (P.FORK, P.SPAWN)  # commands that leave the template as it was
_ids = itertools.count(1)  # call ids (next() is atomic under the GIL)


class Template(Link, Running, Cloning):
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

    A ``KeyboardInterrupt`` during a call leaves the template usable (or, for
    ``run``, consumed with its worker killed): see the module docs.
    """

    # Defaults of an object whose _adopt() was cut short: it owns nothing.
    _chan: Optional[FdChannel] = None
    _pidfd: Optional[int] = None
    _status = "closed"
    _run_sent = False
    _owner: Optional[int] = None
    _spare: Optional[Template] = None
    _prelude: Any = ()
    _pending: Any = ()
    _base: Optional[Template] = None
    _refill_after_run: Optional[Template] = None

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
        opened = context[2]
        self._adopt(None, "Template()")
        try:
            with deferred():
                for attempt in (1, 2, 3):
                    base = default_template()
                    with base._lock:
                        clone, was_spare = base._clone()
                    self._take_over(clone)
                    self._keep_spare = spare
                    try:
                        self._read_hello()
                        self._read_available()  # a spare that greeted long ago may have died since
                        self._setup(context[0], context[1])
                        break
                    except BrokenTemplateError:
                        # EOF instead of the greeting, or the spare we took is dead:
                        # try a fresh clone.  Else the default template died before
                        # it could fork (nothing was created): start a new one, once.
                        if not was_spare:
                            _default.discard(base)
                        if attempt == 3:
                            raise
        except BaseException:
            self._abandon()  # whatever process it had goes to the reaper
            raise
        finally:
            while opened:  # the template has its own copies (or never will)
                os.close(opened.pop())

    # -- construction ----------------------------------------------------------

    @classmethod
    def _from_channel(
        cls, chan: Optional[FdChannel], origin: str, pid: Optional[int] = None, pidfd: Optional[int] = None
    ) -> "Template":
        self = cls.__new__(cls)
        self._adopt(chan, origin, pid, pidfd)
        return self

    def _adopt(
        self, chan: Optional[FdChannel], origin: str, pid: Optional[int] = None, pidfd: Optional[int] = None
    ) -> None:
        self._chan = None
        self._pidfd = pidfd
        if chan is not None:
            if pid is not None:
                chan.peer_pid = pid
            self._own(chan)
        self._origin = origin
        self._lock = threading.RLock()
        self._status = "starting"  # pending, starting, ready, running, closed, broken
        self._run_sent = False  # a RUN went to its process: abandoned, it is killed
        self._owner = os.getpid()
        # A fork() is deferred until it is needed ("pending"): its first
        # send_arg/send_fh calls ride along with the FORK command, and a
        # run() fuses with it, so the clone starts the worker at once.
        self._base = None
        self._prelude: List[tuple] = []  # (kind, payload, dup'd fds)
        self._pending: "weakref.WeakSet[Template]" = weakref.WeakSet()
        self._main_ok = False  # True when the template has the caller's __main__ (early())
        # After its first fork(), a template keeps one clone of itself ready:
        # the next fork() takes it instead of waiting for a clone to be made.
        self._keep_spare = True
        self._spare = None
        # The base to ask for its next spare after the run's reply, and
        # whether that clone waits for the worker's exit (see "When the next
        # spare is made").
        self._refill_after_run = None
        self._refill_after_exit = False
        _live.add(self)  # last: a template ended at exit is a whole one

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
        ctx: Dict[str, Any] = {"cwd": os.fspath(cwd) if cwd is not None else os.getcwd()}
        if sys_path is not None:
            ctx["sys_path"] = list(sys_path)
        ctx["gc_freeze"] = gc_freeze
        with deferred():
            tpl = _exec_template(cls, python or sys.executable, env, "Template.new_exec()")
            try:
                tpl._keep_spare = spare
                tpl._setup(ctx)
            except BaseException:
                tpl._abandon()
                raise
        return tpl

    def _setup(self, ctx: Dict[str, Any], fds: Sequence[int] = (), opened: Optional[List[int]] = None) -> None:
        """Send the context; ``opened`` are fds we opened for it and close once sent."""
        try:
            self._send(P.SETUP, P.dumps(ctx), fds)
        finally:
            while opened:
                os.close(opened.pop())

    # -- state -----------------------------------------------------------------

    @property
    def pid(self) -> int:
        """The template process's pid (waits for it to greet us if need be)."""
        with deferred(), self._lock:
            if self._status == "pending":
                self._materialize()
            if self._status == "starting":
                self._check_open("pid")
                self._read_hello()
            if self._pid is None:
                self._check_open("pid")
            assert self._pid is not None
            return self._pid

    def __repr__(self) -> str:
        pid = f"pid={self._pid} " if self._pid is not None else ""
        return f"<forkserver.Template {pid}{self._status} from {self._origin}>"

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
            with deferred():  # never half a frame in the socket
                try:
                    self._chan.send(kind, payload, fds)  # type: ignore[union-attr]  # set once open
                except BrokenChannelError as exc:
                    raise self._broken(exc, P.NAMES[kind]) from exc
                except BaseException as exc:
                    if self._chan is not None and self._chan.closed:  # a partial send
                        self._broken(exc, P.NAMES[kind])
                    raise

    def _call(self, kind: int, payload: bytes) -> Frame:
        call_id = next(_ids)
        with deferred(), self._lock:
            self._send(kind, P.with_call(call_id, payload))
            frame = self._next_frame(P.NAMES[kind], call_id)
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

        Interrupted (Ctrl-C), the code still runs to its end in the template;
        the next call drops its reply.
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
        with deferred():
            self._send(P.SEND_ARG, payload)
        return self

    def send_fh(self, *handles: Handle) -> "Template":
        """Send sockets, file objects or int fds as the worker's next arguments.

        They are duplicated at once: close your copies whenever you like.  The
        worker receives the same kind (socket, file object with the same mode,
        int).  Returns self.
        """
        described = [P.describe_handle(h) for h in handles]
        with deferred():
            self._send(P.SEND_FH, P.dumps([d for _, d in described]), [fd for fd, _ in described])
        return self

    def fork(self) -> "Template":
        """A new template: a clone of this one with everything loaded and sent so far.

        The clone is made when first needed (any waiting call on it, or any
        further command to this template), so ``t.fork().send_arg(x).run(f)``
        costs one command and one reply.  If this template keeps a spare
        clone ready (see the class docs), that clone is used.
        """
        with deferred(), self._lock:
            self._check_open("fork")
            if self._status == "pending":
                self._materialize()
            tpl = Template._from_channel(None, f"{self._origin}.fork()")
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

        Interrupted (Ctrl-C) before it returns, ``run`` leaves no worker
        running that you could not reach: the process it started (or that
        was about to start the target) is SIGKILLed and reaped, and the
        template is consumed, as after a run.
        """
        run = self._run_spec(target, die_with_parent)
        call_id = next(_ids)
        with deferred(), self._lock:
            child = None
            refilled = False
            try:
                self._start_run(run, call_id)
                frame = self._next_frame("run", call_id)
                child = self._finish_run(frame, f"{run[0]}:{run[1]}", check, timeout)
                if kill_on_exit:
                    _kill_on_exit.add(child)
                refilled = True
                self._refill_base(child)
            except BaseException:
                self._run_interrupted(child)
                if not refilled:
                    self._refill_base(None)
                raise
            self._child = None  # it is the caller's now
        return child

    # -- closing -----------------------------------------------------------------

    def close(self) -> None:
        """Discard the template: its process exits and is reaped. Idempotent.

        Interrupted (Ctrl-C) while it waits for the exit, the template is
        closed all the same: the reaper thread SIGKILLs the process after
        the rest of the grace period and reaps it.
        """
        with deferred(), self._lock:
            if self._status == "running" or self._owner != os.getpid():
                return
            if self._status == "closed":
                if self._chan is not None or self._pidfd is not None:
                    self._hand_over(kill_after=_CLOSE_GRACE)  # an earlier close was cut short
                return
            spare, self._spare = self._spare, None
            if spare is not None:
                spare.close()
            if self._status == "pending":  # never created: nothing to end
                if self._base is not None:
                    self._base._pending.discard(self)
                self._status = "closed"
                self._close_prelude()
                return
            status, self._status = self._status, "closed"
            try:
                self._end_process(waited=status == "starting")
            except BaseException:
                self._hand_over(kill_after=_CLOSE_GRACE)
                raise

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            self._pidfd = os.close(self._pidfd)  # type: ignore[func-returns-value]  # os.close returns None

    def __del__(self) -> None:
        # Dropped without close(): end the process and let the reaper wait for it.
        try:
            if self._owner == os.getpid():
                self._abandon()
        except Exception:
            pass  # interpreter shutdown: the kernel reparents what is left

    def __enter__(self) -> "Template":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _exec_template(cls: Any, python: str, env: Optional[Mapping[str, str]], origin: str) -> Template:
    """A template object owning a freshly exec'd interpreter (see ``_boot``)."""
    tpl = cls._from_channel(None, origin)
    try:
        exec_interpreter(python, dict(os.environ if env is None else env), tpl)
    except BaseException:
        tpl._abandon()  # a process made before the error goes to the reaper
        raise
    return tpl


_live: "weakref.WeakSet[Template]" = weakref.WeakSet()  # templates to end at exit


def default_template() -> Template:
    """The shared default template of this process, started on first use."""
    return _default.get(_start_default)


def _start_default() -> Template:
    return _exec_template(Template, sys.executable, None, "the default template")


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
