"""``spawn``: external programs started by a template (parent side).

The caller prepares everything here -- argv and environment as bytes, the
PATH candidates, the fd map -- so the template only calls the C spawn
(``forkserver/_server/_exec.py``) and answers on a reply pipe sent with the
command.  The program is the caller's direct child: ``Child`` reaps it
through its pidfd.  Stdio follows ``subprocess``: ``PIPE``, ``DEVNULL``,
``STDOUT`` (stderr only), an int fd or a file object; ``None`` inherits the
caller's *current* fd 0, 1 or 2.

Size (~570 lines): ``subprocess``'s argument surface (pipes, text, bufsize, executable,
sessions, ``pass_fds``) and the ownership of every fd it opens, from ``prepare`` to
``finish``, are one flow whose interrupt-safety is easiest to check in one place.
"""

from __future__ import annotations

import codecs
import io
import os
import signal
import subprocess
import sys
from subprocess import DEVNULL, PIPE, STDOUT
from typing import IO, TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .. import _protocol as P
from .._default import _default
from .._errors import BrokenChannelError, BrokenTemplateError, CalledProcessError, ProtocolError  # noqa: F401 - re-exported
from .._fds import FdChannel, Frame, socketpair
from .._interrupts import allowed, deferred
from .._process import Child
from .._reaper import reaper
from .._running import discard_child
from .._sibling import STAGE_CWD, STAGE_EXEC, STAGE_FDS, STAGE_SESSION
from .._slots import region, settle
from .._template import Template, default_template
from .._wait import wait_readable
from ._communicate import communicate

if TYPE_CHECKING:  # pragma: no cover
    from typing import NoReturn

__all__ = ["CalledProcessError", "spawn"]

Argv = Sequence[Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]]
StdHandle = Union[None, int, IO[Any]]

# Signals the program gets at their default even though the template ignores
# them: Python ignores SIGPIPE and SIGXFSZ (so a program in a pipeline would
# not die of a closed reader), templates ignore SIGINT (Ctrl-C) and SIGHUP (a
# hang-up) -- unless the caller ignores them too, see _dfl_sigs() -- and glibc's posix_spawn, which
# started the template, leaves its internal signals 32 and 33 ignored.
_DFL_ALWAYS = sum(1 << (s - 1) for s in (signal.SIGPIPE, signal.SIGXFSZ, 32, 33))
_AS_CALLER = (signal.SIGINT, signal.SIGHUP)


def _dfl_sigs() -> int:
    """Signals to reset to SIG_DFL in the program (a bit mask); SIGINT, SIGHUP as the caller has them."""
    mask = _DFL_ALWAYS
    for sig in _AS_CALLER:  # as subprocess: a signal the caller ignores stays ignored in children
        if signal.getsignal(sig) != signal.SIG_IGN:
            mask |= 1 << (sig - 1)
    return mask


_STAGES = {
    STAGE_SESSION: "starting its session or process group",
    STAGE_FDS: "placing its file descriptors",
    STAGE_CWD: "changing to its working directory",
}


class _Plan:
    """A spawn ready to send: payload, fds, and what the parent keeps or closes."""

    def __init__(self, args: Any, cwd: Any, executable: Any = None) -> None:
        self.args = args
        self.cwd = cwd  # as given, for the error of a bad one
        self.executable = args[0] if executable is None else executable  # the errors' filename
        self.bufsize = -1  # of our ends of the pipes, as Popen's bufsize
        # text mode: (encoding, errors, line_buffering); None: binary pipes
        self.text: Optional[Tuple[str, Optional[str], bool]] = None
        self.payload = b""
        self.send: List[int] = []  # the program's fds, in the order of the payload's indexes
        self.close_after_send: List[int] = []
        self.ours: List[Optional[int]] = [
            None,
            None,
            None,
        ]  # parent ends of stdin/stdout/stderr pipes

    def discard(self) -> None:
        """Close every fd the plan still owns (after a failure), each exactly once."""
        fds = self.close_after_send
        while fds:
            os.close(fds.pop())
        for i, fd in enumerate(self.ours):
            if fd is not None:
                # os.close returns None: closed and forgotten at once
                self.ours[i] = os.close(fd)  # type: ignore[func-returns-value]



def _encode_argv(argv: Argv) -> Tuple[List[Any], List[bytes]]:
    """(the argv as a list, the argv as bytes)."""
    if isinstance(argv, (str, bytes, os.PathLike)):
        raise TypeError(
            f"spawn({argv!r}): pass the program and its arguments as a list, e.g. "
            f"{str(argv).split()!r}; forkserver runs no shell (use ['sh', '-c', ...] for one)"
        )
    args = list(argv)
    out = [os.fsencode(arg) for arg in args]
    if not out:
        raise ValueError("spawn([]): the argument list is empty; its first item names the program")
    for arg in out:
        if b"\0" in arg:
            raise ValueError(
                f"spawn(): argument {arg!r} contains a null byte, which exec cannot pass"
            )
    return args, out


def _encode_env(env: Mapping[Any, Any]) -> List[bytes]:
    if env is os.environ:
        # Already encoded and checked by putenv when set: no 100 us of re-encoding.
        return [k + b"=" + v for k, v in os.environ._data.items()]  # type: ignore[attr-defined]
    out = []
    for key, value in env.items():
        k, v = os.fsencode(key), os.fsencode(value)
        if not k or b"=" in k or b"\0" in k:
            raise ValueError(f"spawn(): illegal environment variable name {key!r}")
        if b"\0" in v:
            raise ValueError(
                f"spawn(): the value of environment variable {key!r} contains a null byte"
            )
        out.append(k + b"=" + v)
    return out


def _encode_executable(executable: Any) -> bytes:
    program = os.fsencode(executable)
    if not program or b"\0" in program:
        raise ValueError(
            f"spawn(): executable={executable!r} must be a non-empty path without null bytes"
        )
    return program


def _candidates(program: bytes, env: Mapping[Any, Any]) -> List[bytes]:
    """The paths to try, as ``execvpe`` would, with the *program's* PATH."""
    if b"/" in program:
        return [program]
    if env is os.environ:  # get_exec_path's warnings dance costs more than this
        dirs = os.environ._data.get(b"PATH", os.defpath.encode()).split(b":")  # type: ignore[attr-defined]
    else:
        dirs = [os.fsencode(d) for d in os.get_exec_path(env)]
    return [d + b"/" + program if d else program for d in dirs]


def _caller_cwd() -> bytes:
    try:
        return os.fsencode(os.getcwd())
    except FileNotFoundError:  # our directory was removed: the link still leads to it
        return f"/proc/{os.getpid()}/cwd".encode()


def _fd_of(handle: Any, name: str) -> int:
    if isinstance(handle, bool) or not isinstance(handle, int):
        try:
            handle = handle.fileno()  # type: ignore[union-attr]  # a bool has none: TypeError below
        except (AttributeError, ValueError, OSError) as exc:
            raise TypeError(
                f"spawn(): {name}={handle!r} is not an fd, a file object with fileno() or one of "
                f"PIPE, DEVNULL{', STDOUT' if name == 'stderr' else ''} ({exc})"
            ) from None
    if handle < 0:
        raise ValueError(f"spawn(): {name}={handle!r} is not a valid fd or subprocess constant")
    os.fstat(handle)  # EBADF here, with its number, rather than in the template
    return handle


def _text_settings(
    text: Optional[bool], universal_newlines: Optional[bool], encoding: Optional[str],
    errors: Optional[str], bufsize: Any,
) -> Tuple[Optional[Tuple[str, Optional[str], bool]], int]:
    """(text mode's (encoding, errors, line_buffering) or None, the binary layer's bufsize).

    As ``Popen``: any of ``text``, ``universal_newlines``, ``encoding``,
    ``errors`` asks for text mode; ``bufsize=1`` then means line buffering
    (on the text layer; the binary layer keeps the default size).
    """
    if bufsize is None:
        bufsize = -1
    if isinstance(bufsize, bool) or not isinstance(bufsize, int):
        raise TypeError(f"spawn(): bufsize must be an integer, got {bufsize!r}")
    both = text is not None and universal_newlines is not None
    if both and bool(text) != bool(universal_newlines):
        raise subprocess.SubprocessError(
            f"spawn(): text={text!r} and universal_newlines={universal_newlines!r} disagree; "
            "pass one of them (universal_newlines is the old name of text)"
        )
    if not (text or universal_newlines or encoding or errors):
        return None, bufsize
    if encoding is None:
        encoding = _default_encoding()
    else:
        codecs.lookup(encoding)  # LookupError now, before a program is started
    line_buffering = bufsize == 1
    return (encoding, errors, line_buffering), (-1 if line_buffering else bufsize)


def _default_encoding() -> str:
    """The text encoding ``Popen`` uses when none is given (and its EncodingWarning)."""
    if getattr(sys.flags, "warn_default_encoding", 0):  # python -X warn_default_encoding
        import warnings

        frame: Any = sys._getframe(1)
        level = 2
        here = os.path.dirname(__file__)
        while frame is not None and os.path.dirname(frame.f_code.co_filename) == here:
            frame, level = frame.f_back, level + 1
        # EncodingWarning: a builtin since 3.10, as is the flag
        warnings.warn("'encoding' argument not specified.", EncodingWarning, level)  # type: ignore[name-defined]  # noqa: F821
    if sys.flags.utf8_mode:
        return "utf-8"
    import locale

    if hasattr(locale, "getencoding"):  # 3.11+
        return locale.getencoding()
    return locale.getpreferredencoding(False)


def prepare(
    argv: Argv,
    stdin: StdHandle = None,
    stdout: StdHandle = None,
    stderr: StdHandle = None,
    env: Optional[Mapping[Any, Any]] = None,
    cwd: Union[None, str, bytes, "os.PathLike[Any]"] = None,
    pass_fds: Sequence[int] = (),
    start_new_session: bool = False,
    process_group: Optional[int] = None,
    *,
    executable: Union[None, str, bytes, "os.PathLike[Any]"] = None,
    bufsize: int = -1,
    text: Optional[bool] = None,
    universal_newlines: Optional[bool] = None,
    encoding: Optional[str] = None,
    errors: Optional[str] = None,
) -> _Plan:
    """Check and encode a spawn request; open its pipes (closed again on error)."""
    text_mode, bufsize = _text_settings(text, universal_newlines, encoding, errors, bufsize)
    args, bargv = _encode_argv(argv)
    env = os.environ if env is None else env
    envp = _encode_env(env)
    program = bargv[0] if executable is None else _encode_executable(executable)
    paths = _candidates(program, env)
    if cwd is None:
        bcwd = _caller_cwd()
    else:
        bcwd = os.fsencode(cwd)
        if not bcwd.startswith(b"/"):  # relative to the caller's directory, not the template's
            bcwd = os.path.join(_caller_cwd(), bcwd)
    if start_new_session and process_group is not None:
        raise ValueError(
            "spawn(): start_new_session and process_group exclude each other; pass one"
        )
    pgid = -1 if process_group is None else int(process_group)
    if pgid < -1:
        raise ValueError(f"spawn(): process_group={process_group!r} must be >= 0")
    keep = sorted({int(fd) for fd in pass_fds})
    if keep and keep[0] < 3:
        raise ValueError(
            f"spawn(): pass_fds={tuple(pass_fds)!r} includes 0-2; use stdin/stdout/stderr for those"
        )

    plan = _Plan(args, cwd, executable)
    plan.text, plan.bufsize = text_mode, bufsize
    index: Dict[int, int] = {}  # fd to send -> its index in plan.send

    def slot(fd: int) -> int:
        if fd not in index:
            index[fd] = len(plan.send)
            plan.send.append(fd)
        return index[fd]

    fd_map: List[Tuple[int, int]] = []
    devnull = -1
    try:
        for target, (name, handle) in enumerate(
            (("stdin", stdin), ("stdout", stdout), ("stderr", stderr))
        ):
            if handle is None:
                try:
                    os.fstat(target)
                except OSError:  # the caller's own fd is closed: so is the program's
                    fd_map.append((-1, target))
                    continue
                fd_map.append((slot(target), target))
            elif handle == PIPE:
                plan.close_after_send.extend(os.pipe2(os.O_CLOEXEC))  # both ends owned at once
                # ours (stdin's write end, an output's read end) moves in one statement
                plan.ours[target] = plan.close_after_send.pop(-1 if target == 0 else -2)
                theirs = plan.close_after_send[-1]
                fd_map.append((slot(theirs), target))
            elif handle == DEVNULL:
                if devnull < 0:
                    plan.close_after_send.append(os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC))
                    devnull = plan.close_after_send[-1]
                fd_map.append((slot(devnull), target))
            elif handle == STDOUT and target == 2:
                fd_map.append((fd_map[1][0], 2))
            else:
                fd_map.append((slot(_fd_of(handle, name)), target))
        for fd in keep:
            os.fstat(fd)
            fd_map.append((slot(fd), fd))
        strings = b"\0".join(paths + bargv + envp) + b"\0"
        counts = (len(paths), len(bargv), len(envp))
        spec = (strings, counts, bcwd, fd_map, keep, bool(start_new_session), pgid, _dfl_sigs())
        plan.payload = P.dumps(spec)
    except BaseException:
        plan.discard()
        raise
    return plan


# -- talking to the template ------------------------------------------------------
#
# Interruptions.  The reply comes on a socket of its own (an ``FdChannel``):
# first the program's pid, written by the program's process itself before
# anything else (``_fds.spawn_sibling``), then the template's SPAWNED or
# ERROR frame.  Reading it can be interrupted anywhere and resumed.  A spawn
# that will not return its ``Child`` -- Ctrl-C, a cancelled coroutine, any
# error after the command was sent -- hands the reply channel to the reaper
# thread as *doomed*: the program is SIGKILLed as soon as its pid is known,
# and reaped; the call does not wait for it.  So no program is left running
# that nobody can reach, and a zombie never stays.


def send(tpl: Any, plan: _Plan) -> FdChannel:
    """Send the SPAWN command to ``tpl``; returns the channel its reply comes on.

    Once this returns, the channel must be read to its end or handed to the
    reaper (``abandon``): a program may exist.
    """
    ours, theirs = socketpair()
    reply = None
    try:
        ours.setblocking(False)
        reply = FdChannel(ours)
        reply.slot = region.take()  # the kernel writes the program's pid there (see _slots)
        with tpl._lock:
            tpl._send(P.SPAWN, P.with_slot(reply.slot, plan.payload), [theirs, *plan.send])
            tpl._drain("spawn")  # the template must get all of it before we wait
        theirs.close()
        return reply
    except BaseException:
        if reply is None:
            ours.close()
        else:
            abandon(tpl, reply)  # if nothing reached the template, EOF ends it at once
        theirs.close()
        raise


def read_reply(tpl: Any, reply: FdChannel) -> Frame:
    """Wait for the SPAWNED (or ERROR) frame; the channel is closed once it came."""
    while True:
        try:
            frame = reply.receive()
        except (BrokenChannelError, ProtocolError):
            settle(reply, ended=True)  # killed before it spoke: the slot has its pid
            frame = None
        else:
            settle(reply, ended=False)
            if frame is None:
                with allowed():
                    wait_readable(reply.fileno(), None)
                continue
        if frame is None or frame.kind not in (P.SPAWNED, P.ERROR):
            _template_died(tpl, reply)  # raises
        reply.close()
        return frame


def _template_died(tpl: Any, reply: FdChannel) -> NoReturn:
    """No reply: the template died.  Kill and reap what it started, raise BrokenTemplateError."""
    abandon(tpl, reply)
    with tpl._lock:
        if tpl._status not in ("broken", "closed"):
            err = tpl._broken(BrokenChannelError("no reply to spawn"), "spawn")
        else:
            err = BrokenTemplateError(f"spawn on {tpl!r}: the template process died; try again")
    _default.discard(tpl)
    raise err


def finish(plan: _Plan, frame: Frame, reply: FdChannel) -> Child:
    """Turn the reply into a ``Child`` (or raise the program's exec error)."""
    if frame.kind == P.ERROR:
        raise P.decode_error(frame.payload)
    pid, err, stage = P.SPAWNED_FORMAT.unpack(frame.payload)
    if err:
        reaper.adopt(pid)  # it exited 127 right after failing; it is our child
        raise _exec_error(plan, err, stage)
    child = None
    try:
        files = _open_pipes(plan)
        # The Child opens its pidfd (none if SIGCHLD=SIG_IGN reaped a fast program already):
        # from the statement that makes it, it owns the process.
        child = Child(pid, None, args=plan.args, stdin=files[0], stdout=files[1], stderr=files[2])
        if plan.text is not None:
            child.text_mode = True
            child.encoding, child.errors = plan.text[0], plan.text[1]
        child._communicate = communicate
        return child
    except BaseException:
        if child is None:
            _kill(pid)
        else:
            discard_child(child)
        raise


def _kill(pid: int) -> None:
    """A program the caller will not get (and no Child owns): SIGKILL it, let the reaper reap it."""
    try:
        os.kill(pid, signal.SIGKILL)  # still our unreaped child: the pid cannot be reused
    finally:
        reaper.adopt(pid)


def _open_pipes(plan: _Plan) -> List[Any]:
    """File objects for our ends of the pipes, as ``Popen`` makes them (buffering, text)."""
    files: List[Any] = []
    for i, fd in enumerate(plan.ours):
        if fd is None:
            files.append(None)
            continue
        f: Any
        # one statement: the file object owns the fd, the plan forgets it
        f, plan.ours[i] = open(fd, "wb" if i == 0 else "rb", plan.bufsize), None
        if plan.text is not None:
            encoding, errors, line_buffering = plan.text
            if i == 0:
                f = io.TextIOWrapper(
                    f, encoding, errors, write_through=True, line_buffering=line_buffering
                )
            else:
                f = io.TextIOWrapper(f, encoding, errors)
        files.append(f)
    return files


def _exec_error(plan: _Plan, err: int, stage: int) -> OSError:
    """The OSError ``subprocess`` would raise: the real errno and the right filename."""
    if stage == STAGE_EXEC:
        return OSError(err, os.strerror(err), os.fspath(plan.executable))
    if stage == STAGE_CWD:
        return OSError(
            err, os.strerror(err), os.fspath(plan.cwd) if plan.cwd is not None else os.getcwd()
        )
    return OSError(err, f"{os.strerror(err)} (while {_STAGES.get(stage, 'starting the program')})")


def spawn_from(tpl: Any, plan: _Plan, retry_default: bool = False) -> Child:
    """Send the plan to ``tpl``, wait for the program to start; closes the plan's fds.

    ``retry_default``: ``tpl`` is the default template; if it turns out dead
    before it started anything, start a new one and send once more.
    """
    try:  # its first statement: nothing can fail before the plan is in hand
        with deferred():
            reply = None
            try:
                for attempt in (1, 2):
                    tpl, reply = _send_retrying(tpl, plan, retry_default)
                    try:
                        frame = read_reply(tpl, reply)
                    except BrokenTemplateError:  # read_reply handed the reply over already
                        if attempt == 2 or not retry_default or reply.peer_pid is not None:
                            raise
                        # It died before it started anything: once more, on a new default template.
                        tpl = default_template()
                        continue
                    close_sent(plan)  # the program has its own copies now
                    return finish(plan, frame, reply)
                raise AssertionError("unreachable")
            except BaseException:
                if reply is not None:
                    abandon(tpl, reply)  # Ctrl-C: what it started is killed and reaped
                raise
    finally:
        plan.discard()


def _send_retrying(tpl: Any, plan: _Plan, retry_default: bool) -> Tuple[Any, FdChannel]:
    try:
        return tpl, send(tpl, plan)
    except BrokenTemplateError:
        if not retry_default:
            raise
        tpl = default_template()  # it had died: nothing reached it
        return tpl, send(tpl, plan)


def close_sent(plan: _Plan) -> None:
    """Close our copies of the fds the template now has, each in the statement that forgets it."""
    fds = plan.close_after_send
    while fds:
        os.close(fds.pop())


def abandon(tpl: Any, reply: FdChannel) -> None:
    """The caller gave up on a spawn (Ctrl-C, cancelled, an error): the reaper thread
    reads the reply channel, kills the program it names and reaps it.  Never blocks."""
    reaper.adopt_channel(reply, doomed=True)


def spawn(
    argv: Argv,
    *,
    stdin: StdHandle = None,
    stdout: StdHandle = None,
    stderr: StdHandle = None,
    env: Optional[Mapping[Any, Any]] = None,
    cwd: Union[None, str, bytes, "os.PathLike[Any]"] = None,
    pass_fds: Sequence[int] = (),
    start_new_session: bool = False,
    process_group: Optional[int] = None,
    template: Optional[Template] = None,
    executable: Union[None, str, bytes, "os.PathLike[Any]"] = None,
    bufsize: int = -1,
    text: Optional[bool] = None,
    universal_newlines: Optional[bool] = None,
    encoding: Optional[str] = None,
    errors: Optional[str] = None,
) -> Child:
    """Start the program ``argv`` (a list; no shell) from the default template.

    Returns a ``Child``, your direct child process, with ``stdin``/``stdout``
    /``stderr`` file objects for the streams given as ``subprocess.PIPE``;
    ``DEVNULL``, ``STDOUT`` (stderr only), int fds and file objects work as
    in ``subprocess``, ``None`` inherits your current fd.  ``env`` defaults
    to your *current* ``os.environ``, ``cwd`` to your current directory; the
    program gets fds 0-2 and ``pass_fds`` (same numbers) and nothing else.
    A program that cannot be executed raises the real ``OSError`` here
    (``FileNotFoundError`` with ``filename``, ...).

    As ``subprocess.Popen``: ``text=True`` (or its old name
    ``universal_newlines``, or an ``encoding`` or ``errors``) makes the pipes
    text files and ``communicate`` take and return ``str`` (newlines
    translated); the default encoding is the locale's, as ``Popen``'s.
    ``bufsize`` buffers our ends of the pipes (0: unbuffered, 1: line
    buffered in text mode, -1: the default size).  ``executable`` is the
    program to run in place of ``argv[0]``, which is still passed as the
    program's ``argv[0]`` (a name without a slash is searched in ``PATH``).

    ``template=t`` starts it from the template ``t`` instead (it stays usable:
    spawning leaves a template as it was); the program still takes *your*
    environment, directory and stdio unless overridden -- the template only
    provides the cheap process creation.
    """
    with deferred():
        plan = prepare(
            argv, stdin, stdout, stderr, env, cwd, pass_fds, start_new_session, process_group,
            executable=executable, bufsize=bufsize, text=text,
            universal_newlines=universal_newlines, encoding=encoding, errors=errors,
        )
        try:
            tpl = default_template() if template is None else template
            return spawn_from(tpl, plan, retry_default=template is None)
        finally:
            plan.discard()  # what is left of it, if spawn_from never got it (it discards it too)
