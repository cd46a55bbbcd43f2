"""The command protocol between the parent and template processes (shared by both).

Frames travel over ``_fds.FdChannel``.  Parent → template commands are
pipelined; only ``REQUIRE``, ``EVAL`` and ``RUN`` get a reply, and the parent
waits for it before the call returns.  A failed pipelined command (``SETUP``,
``SEND_ARG``, ``SEND_FH``) marks the template broken: every later
reply-bearing command answers with that first error, and ``FORK`` refuses —
so no error is ever silent, and it surfaces no later than the next call that
waits.  A malformed frame (an unknown kind, the wrong number of fds, a
payload that does not decode) breaks the template the same way, with a
``ProtocolError``; it is never executed.

Replies in step (version 4).  Every reply-bearing command starts with a
*call id* (``CALL``: 8 bytes, unique in the parent) and its reply --
``RESULT``, ``ERROR`` or ``RUNNING`` -- starts with the same id.  A call
that was interrupted (Ctrl-C, a cancelled coroutine) after sending its
command leaves its reply in the socket; the next call on the template reads
it, sees an id that is not its own, and drops it.  So an interruption never
shifts replies, and nothing has to be counted.  An ``ERROR`` with id 0
answers no call: the template reports that it stopped serving (its socket
broke mid-frame, its descriptor table stayed full) just before it exits.

Pids first (version 4).  The first frame a new process writes -- a clone on
its new socket, a spawned program on its reply socket -- is ``PID`` with its
own pid, written by the C code right after the clone, before any Python code
runs in it.  The parent thus knows the pid of everything it owns even if the
new process or its template dies right after (``FdChannel.peer_pid``).  And
for a process killed before its first instruction: ``FORK`` and ``SPAWN``
name a *pid slot* in memory the parent shares with its templates, where the
kernel stores the pid during the clone (``_slots``).

``SPAWN`` (fork + exec of a program) replies on its own reply socket, sent
with the command, never on the template's socket: the default template is
shared by every thread of the parent, so replies must not cross.

``FORK`` carries the command socket of the new process as its first fd (the
fds of a deferred fork's first ``send_fh`` follow).  Its payload, if any,
holds those first items (``prelude``) and a fused ``run`` target, or says
the clone is a ``spare`` (it rehearses a worker's start before it greets),
to be made ``after`` a worker pid is gone.  The template never
replies to it on its own channel: the new process greets the
parent with ``HELLO`` on the new socket, or the template writes the
``ERROR`` there instead.  After the ``RUNNING`` reply the socket belongs to
the user: the parent reads that frame exactly and nothing after it.
"""
from __future__ import annotations

import io
import os
import pickle
import socket
import struct
import sys
import traceback
from typing import Any, Callable, Dict, Optional, Tuple, Union

from ._errors import RemoteError, RemoteTraceback
from ._fds import PID_FORMAT, PID_KIND  # noqa: F401 - PID_FORMAT re-exported

VERSION = 4  # 2: SPAWN; 3: FORK's "after"; 4: call ids in replies, PID frames

# parent -> template
SETUP = 1  # pickled context dict; fds: stdin, stdout, stderr (those given)
REQUIRE = 2  # pickled tuple of module names                      -> RESULT | ERROR
EVAL = 3  # pickled (source, args)                                -> RESULT | ERROR
SEND_ARG = 4  # pickled list of objects
SEND_FH = 5  # pickled list of handle descriptions; fds: the handles
FORK = 6  # pickled {"slot"} + {"prelude", "run", "call"} or {"spare", "after"}; fds: new socket, prelude fds
RUN = 7  # pickled (module, qualname)                              -> RUNNING | ERROR
SPAWN = 8  # SLOT + pickled spawn spec; fds: reply socket, then the program's fds -> SPAWNED | ERROR

# template -> parent
HELLO = 101  # HELLO_FORMAT (version, pid): the first frame on every command socket
RESULT = 102
ERROR = 103  # encode_error()
RUNNING = 104  # the last protocol frame: user bytes follow
SPAWNED = 105  # SPAWNED_FORMAT (pid, errno, stage), on the SPAWN's reply socket
PID = PID_KIND  # 106, PID_FORMAT (pid,): the first frame a new process writes itself

HELLO_FORMAT = struct.Struct("=II")
SPAWNED_FORMAT = struct.Struct("=iii")
CALL = struct.Struct("=Q")  # the call id leading REQUIRE/EVAL/RUN and their replies
REPLIES = (RESULT, ERROR, RUNNING)
REPLYING = (REQUIRE, EVAL, RUN)

NAMES = {
    SETUP: "setup", REQUIRE: "require", EVAL: "eval", SEND_ARG: "send_arg",
    SEND_FH: "send_fh", FORK: "fork", RUN: "run", SPAWN: "spawn",
    HELLO: "hello", RESULT: "result", ERROR: "error", RUNNING: "running", SPAWNED: "spawned",
    PID: "pid",
}  # fmt: skip

# The module every template runs require()/eval() in (forkserver/_server/_namespace.py);
# a bare run("name") target names a function of it.
NAMESPACE = "forkserver.template"

# Standard thread-pool limits applied while a template imports or evaluates
# (docs/design.md): libraries size their pools from these at load time.
THREAD_LIMIT_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
)


def dumps(obj: Any) -> bytes:
    """Pickle with the highest protocol (both ends run the same interpreter)."""
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


loads = pickle.loads


def with_call(call_id: int, body: bytes = b"") -> bytes:
    """A reply-bearing command's or a reply's payload: the call id, then ``body``."""
    return CALL.pack(call_id) + body


SLOT = struct.Struct("=i")  # the pid slot (forkserver._slots) leading a SPAWN; -1: none


def with_slot(slot: Optional[int], body: bytes) -> bytes:
    """A SPAWN's payload: its pid slot (see ``_slots``), then ``body``."""
    return SLOT.pack(-1 if slot is None else slot) + body


def split_slot(payload: bytes) -> Tuple[Optional[int], bytes]:
    slot = SLOT.unpack_from(payload)[0]
    return (None if slot < 0 else slot), payload[SLOT.size :]


def split_call(payload: bytes) -> Tuple[int, bytes]:
    """(call id, body) of a payload made by ``with_call``; ValueError if it is too short."""
    if len(payload) < CALL.size:
        raise ValueError(f"a {len(payload)}-byte payload has no call id")
    return CALL.unpack_from(payload)[0], payload[CALL.size :]


# -- errors --------------------------------------------------------------------


def encode_error(exc: BaseException, context: str = "") -> bytes:
    """Serialise an exception with its formatted traceback for the parent."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        blob = dumps(exc)
        pickle.loads(blob)  # must also load on the other side
    except Exception:
        blob = b""
    return dumps(
        {
            "pickled": blob,
            "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
            "message": str(exc),
            "traceback": text,
            "context": context,
            "pid": os.getpid(),
        }
    )


def decode_error(payload: bytes) -> BaseException:
    """Rebuild a remote exception; its ``__cause__`` carries the remote traceback."""
    info = loads(payload)
    cause = RemoteTraceback(
        f"traceback in process {info['pid']}"
        + (f" during {info['context']}" if info["context"] else "")
        + ":\n"
        + info["traceback"]
    )
    exc: Optional[BaseException]
    try:
        exc = pickle.loads(info["pickled"]) if info["pickled"] else None
    except Exception:
        exc = None
    if exc is None:
        exc = RemoteError(f"{info['type']}: {info['message']}")
        exc.remote_type = info["type"]  # type: ignore[attr-defined]
    exc.__cause__ = cause
    return exc


# -- targets -------------------------------------------------------------------


def split_target(target: Union[str, Callable[..., Any]], main_ok: bool = False) -> Tuple[str, str]:
    """A run() target → (module, qualname).

    ``"pkg.mod:func"``, ``"pkg.mod.func"``, ``"func"`` or a module-level function.

    A bare name is a function of the template's namespace module
    (``NAMESPACE``: what ``require`` bound and ``eval`` defined).
    ``main_ok``: the template has the caller's ``__main__`` (``early()``).
    """
    if callable(target) and not isinstance(target, str):
        module = getattr(target, "__module__", None)
        qualname = getattr(target, "__qualname__", None)
        if not module or not qualname or "<locals>" in qualname or "<lambda>" in qualname:
            raise ValueError(
                f"run({target!r}): only module-level functions can be named in another "
                "process; define it at the top level of a module, or pass 'module:function'"
            )
        if module == "__main__" and not main_ok:
            spec = getattr(sys.modules.get("__main__"), "__spec__", None)
            if spec is None or not spec.name or spec.name == "__main__":
                raise ValueError(
                    f"run({target!r}): functions of a script run as __main__ cannot be "
                    "imported in a template; move it into a module (or start your program "
                    "with python -m, or call forkserver.early() at its top)"
                )
            module = spec.name
        return module, qualname
    if not isinstance(target, str):
        raise TypeError(f"run(): expected 'module:function', 'module.function' or a function, got {target!r}")
    if ":" in target:
        module, _, qualname = target.partition(":")
    else:
        module, _, qualname = target.rpartition(".")
        if not module and qualname.isidentifier():
            module = NAMESPACE  # a bare name: a function eval() defined in the template
    if not module or not qualname:
        raise ValueError(
            f"run({target!r}): name a function eval() defined ('handler'), or a function "
            "with its module, as 'pkg.mod:func' or 'pkg.mod.func'"
        )
    return module, qualname


# -- handles -------------------------------------------------------------------


def describe_handle(obj: Any) -> Tuple[int, Dict[str, Any]]:
    """(fd, description) for a socket, a file object or an int fd; checks the fd is open."""
    desc: Dict[str, Any]
    if isinstance(obj, bool):
        raise TypeError(f"send_fh({obj!r}): expected a socket, a file object or an int fd")
    if isinstance(obj, int):
        fd, desc = obj, {"kind": "int"}
    elif isinstance(obj, socket.socket):
        fd, desc = obj.fileno(), {"kind": "socket"}
    elif isinstance(obj, io.IOBase) or hasattr(obj, "fileno"):
        try:
            fd = obj.fileno()
        except (ValueError, io.UnsupportedOperation) as exc:
            raise ValueError(f"send_fh({obj!r}): it has no usable fd ({exc}); pass an open file") from None
        desc = {"kind": "file", "mode": getattr(obj, "mode", None)}
        if isinstance(obj, io.TextIOBase):
            desc.update(encoding=obj.encoding, errors=obj.errors)
    else:
        raise TypeError(f"send_fh({obj!r}): expected a socket, a file object or an int fd")
    if fd < 0:
        raise ValueError(f"send_fh({obj!r}): it is closed; pass an open handle")
    try:
        os.fstat(fd)
    except OSError as exc:
        raise OSError(exc.errno, f"send_fh({obj!r}): fd {fd} is not open; pass an open handle") from None
    return fd, desc


def rebuild_handle(fd: int, desc: Dict[str, Any]) -> Any:
    """The same kind of object the sender passed, owning ``fd``."""
    kind = desc["kind"]
    if kind == "socket":
        return socket.socket(fileno=fd)
    if kind == "file" and desc.get("mode"):
        mode = desc["mode"]
        if "b" in mode:
            return open(fd, mode)
        return open(fd, mode, encoding=desc.get("encoding"), errors=desc.get("errors"))
    return fd
