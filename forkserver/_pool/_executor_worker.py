"""The worker loop of ``forkserver.Executor`` and its wire format (runs INSIDE workers).

A worker is a fork of the executor's template running :func:`serve` on its
control socket.  It reads calls, runs them one at a time in the order they
came, and writes one reply per call in the same order (events first).  It
ends at EOF: the parent closed the socket (shutdown, idle timeout,
``max_tasks_per_child``) or died.

This module is imported by every worker, so it is lean: only modules every
template has loaded already (``pickle``, ``struct``, ``socket``, ``_signal``,
``forkserver._protocol``); never ``threading`` or ``concurrent.futures``, and
nothing of the parent side.  The parent imports the wire format from here.

Wire format, both directions (a ``SOCK_STREAM`` socket)::

    header  12 bytes: kind (u8), pad, buffer count n (u16), task id (u32),
            pickle length (u32)
    sizes   n x u64: the sizes of the out-of-band buffers
    pickle  protocol 5
    buffers the n out-of-band buffers (numpy arrays, large bytes), raw

Error replies carry ``forkserver._protocol.encode_error`` bytes as the pickle.
"""
from __future__ import annotations

import _signal
import _thread
import os
import pickle
import socket
import struct
import sys
from typing import Any, Callable, List, Optional, Tuple

from .. import _protocol as P
from .._errors import ProtocolError

HEADER = struct.Struct("=BxHII")
CHUNK = 1 << 16  # bytes asked of one recv
BIG_FRAME = 1 << 20  # a frame this big is read straight into buffers of its own
OOB_MIN = 1 << 16  # buffers this big travel out of band (smaller ones inside the pickle)
MAX_PICKLE = (1 << 32) - 1

# parent -> worker
CALL = 1  # pickled (fn, args, kwargs)
# worker -> parent
RESULT = 2  # pickled result
ERROR = 3  # encode_error: the call raised, or its result could not be pickled
BAD_CALL = 4  # encode_error: the call could not be unpickled here
EVENT = 5  # pickled object given to forkserver.worker.event()
INIT_ERROR = 6  # encode_error: the initializer raised (task id 0)

_BIG_TYPES = (bytes, bytearray)
_NOSIGNAL = int(socket.MSG_NOSIGNAL)
_SIGINT = 2
Frame = Tuple[int, int, bytearray, List[bytearray]]  # kind, task id, pickle, buffers


# -- the wire (shared with the parent) -------------------------------------------


class Big:
    """A large ``bytes``/``bytearray`` argument or result, sent out of band (no copy)."""

    __slots__ = ("data",)

    def __init__(self, data: Any) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: Any) -> Any:
        return type(self.data), (pickle.PickleBuffer(self.data),)


def big(obj: Any) -> Any:
    """``obj`` wrapped in :class:`Big` if it is large bytes, else ``obj``."""
    if obj.__class__ in _BIG_TYPES and len(obj) >= OOB_MIN:
        return Big(obj)
    return obj


def encode(kind: int, task: int, obj: Any) -> List[Any]:
    """The frame carrying ``obj``: a list of byte chunks to send in order.

    Raises what pickling raises (``PicklingError``, ``TypeError``, ...).
    """
    bufs: List[Any] = []

    def out_of_band(buf: pickle.PickleBuffer) -> Optional[bool]:
        raw = buf.raw()
        if raw.nbytes < OOB_MIN:
            return True  # in band: cheaper than a buffer of its own
        bufs.append(raw)
        return None

    payload = pickle.dumps(obj, 5, buffer_callback=out_of_band)
    if len(payload) > MAX_PICKLE:
        raise ValueError(f"a pickle of {len(payload)} bytes is larger than 4 GiB; send large "
                         "data as numpy arrays or bytes (they travel out of band)")
    if not bufs:
        return [HEADER.pack(kind, 0, task, len(payload)) + payload]
    sizes = struct.pack(f"={len(bufs)}Q", *[b.nbytes for b in bufs])
    return [HEADER.pack(kind, len(bufs), task, len(payload)) + sizes + payload, *bufs]


def encode_raw(kind: int, task: int, payload: bytes) -> List[Any]:
    """A frame whose pickle is ``payload`` already (error replies)."""
    return [HEADER.pack(kind, 0, task, len(payload)) + payload]


class Reader:
    """Frames read from a stream socket: one ``recv`` may bring many small frames.

    ``fill(sock)`` reads once (blocking or not, as the socket is; 0 means
    EOF); ``next_frame()`` returns a complete frame or None.  A frame of at
    least ``BIG_FRAME`` bytes is received straight into its own buffers,
    which become the unpickled numpy arrays (no copy).
    """

    __slots__ = ("buf", "pos", "big")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.pos = 0
        self.big: Optional[list] = None  # [kind, task, segments, index, offset]

    @property
    def empty(self) -> bool:
        """No byte of a frame is buffered."""
        return self.big is None and self.pos == len(self.buf)

    def fill(self, sock: socket.socket) -> int:
        """One read from ``sock``; the number of bytes (0: EOF)."""
        big = self.big
        if big is not None:
            segs, i, off = big[2], big[3], big[4]
            with memoryview(segs[i]) as view:
                n = sock.recv_into(view[off:])
            if n:
                off += n
                while i < len(segs) and off == len(segs[i]):
                    i, off = i + 1, 0
                big[3], big[4] = i, off
            return n
        if self.pos:
            del self.buf[: self.pos]
            self.pos = 0
        data = sock.recv(CHUNK)
        self.buf += data
        return len(data)

    def next_frame(self) -> Optional[Frame]:
        """The next complete frame, or None."""
        big = self.big
        if big is not None:
            if big[3] < len(big[2]):
                return None
            self.big = None
            return big[0], big[1], big[2][0], big[2][1:]
        buf, pos = self.buf, self.pos
        avail = len(buf) - pos
        if avail < HEADER.size:
            return None
        kind, nbufs, task, length = HEADER.unpack_from(buf, pos)
        head = HEADER.size + 8 * nbufs
        if avail < head:
            return None
        sizes = struct.unpack_from(f"={nbufs}Q", buf, pos + HEADER.size) if nbufs else ()
        total = head + length + sum(sizes)
        if avail >= total:
            start = pos + head
            end = start + length
            payload = buf[start:end]
            bufs = []
            for size in sizes:
                bufs.append(buf[end : end + size])
                end += size
            self.pos = pos + total
            return kind, task, payload, bufs
        if total >= BIG_FRAME:
            self._go_big(kind, task, [length, *sizes], pos + head)
        return None

    def _go_big(self, kind: int, task: int, sizes: List[int], start: int) -> None:
        segs = [bytearray(size) for size in sizes]
        i = off = 0
        with memoryview(self.buf) as view:
            data = view[start:]
            while len(data):
                room = len(segs[i]) - off
                take = min(room, len(data))
                segs[i][off : off + take] = data[:take]
                data = data[take:]
                off += take
                if off == len(segs[i]):
                    i, off = i + 1, 0
            data.release()
        while i < len(segs) and off == len(segs[i]):  # empty buffers
            i, off = i + 1, 0
        self.buf.clear()
        self.pos = 0
        self.big = [kind, task, segs, i, off]


def process_chunk(fn: Callable[..., Any], chunk: List[tuple]) -> list:
    """Run ``fn`` on each argument tuple of ``chunk`` (``Executor.map`` with ``chunksize``)."""
    return [fn(*args) for args in chunk]


# -- the worker --------------------------------------------------------------------


class _ParentGone(Exception):
    """Our socket broke while we wrote to it: the parent closed it or died."""


class _Worker:
    """This worker's state (one per process)."""

    def __init__(self) -> None:
        self.control: Optional[socket.socket] = None
        self.lock = _thread.allocate_lock()  # one frame at a time: event() may come from threads
        self.task: Optional[int] = None  # the task running now
        self.in_task = False  # SIGINT raises KeyboardInterrupt only meanwhile
        self.sending = False
        self.interrupted = False  # a SIGINT came while a frame was being written
        self.calling = 0  # the task id of the call being handled
        self.replied = True
        self.events = False  # does the parent have an on_event?
        self.main: Optional[Tuple[str, str]] = None  # how to import the parent's __main__
        self.main_loaded = False


_w = _Worker()


def _on_sigint(signum: int, frame: Any) -> None:
    # Ctrl-C reaches the whole foreground process group, workers too.  It
    # interrupts the user's code (the task then fails with KeyboardInterrupt,
    # as in ProcessPoolExecutor), never our protocol: an idle worker stays up.
    if _w.in_task:
        if _w.sending:
            _w.interrupted = True  # raised once the frame is whole
        else:
            raise KeyboardInterrupt


def _send(chunks: List[Any], task: Optional[int] = None) -> None:
    """Write one frame; with ``task``, only while that task runs (for events)."""
    w = _w
    with w.lock:
        if task is not None and w.task != task:
            raise RuntimeError("forkserver.worker.event(): the task that called it has ended")
        w.sending = True
        try:
            _write(w.control, chunks)
        finally:
            w.sending = False
    if w.interrupted:
        w.interrupted = False
        raise KeyboardInterrupt


def _write(sock: Any, chunks: List[Any]) -> None:
    try:
        if len(chunks) == 1:
            sock.sendall(chunks[0], _NOSIGNAL)
            return
        views = [memoryview(c).cast("B") for c in chunks]
        while views:
            n = sock.sendmsg(views, (), _NOSIGNAL)
            while views and n >= len(views[0]):
                n -= len(views.pop(0))
            if n:
                views[0] = views[0][n:]
    except (BrokenPipeError, ConnectionResetError):
        raise _ParentGone from None


def send_event(obj: Any) -> None:
    """``forkserver.worker.event(obj)``: hand ``obj`` to the parent's ``on_event``."""
    task = _w.task
    if task is None:
        raise RuntimeError(
            "forkserver.worker.event() works only in a task run by forkserver.Executor "
            "(in this worker process, while the task runs)"
        )
    if _w.events:
        _send(encode(EVENT, task, obj), task)


def serve(control: socket.socket, *sent: Any) -> None:
    """The worker: run the calls that arrive on ``control`` until EOF.

    ``sent``: what the template was sent (``send_arg``/``send_fh``), then
    the executor's configuration.  The template's items go to the
    initializer, before its ``initargs``.
    """
    *items, config = sent
    w = _w
    w.control = control
    w.events = config["events"]
    w.main = config["main"]
    _signal.signal(_SIGINT, _on_sigint)
    try:
        if config["initializer"] is not None and not _initialize(config["initializer"], items):
            return
        reader = Reader()
        slot: List[Frame] = []  # hands the frame over: _call alone holds it, and frees it
        while True:
            frame = reader.next_frame()
            if frame is None:
                try:
                    if not reader.fill(control):
                        return  # EOF: shut down, recycled, or the parent is gone
                except ConnectionResetError:
                    return
                continue
            if frame[0] != CALL:
                raise ProtocolError(f"executor worker {os.getpid()}: "
                                    f"unexpected frame kind {frame[0]}")
            slot.append(frame)
            frame = None
            w.replied = False
            try:
                _call(slot)
            except KeyboardInterrupt as exc:  # between our own steps: still reply
                w.in_task = False
                w.task = None
                if not w.replied:
                    _reply(encode_raw(ERROR, w.calling, P.encode_error(exc, "the task")))
    except _ParentGone:
        return


def _initialize(blob: bytes, items: List[Any]) -> bool:
    """Run the initializer; False (and INIT_ERROR sent) if it raised."""
    _w.in_task = True
    try:
        initializer, initargs = pickle.loads(blob)
        initializer(*items, *initargs)
    except BaseException as exc:
        _w.in_task = False
        _send(encode_raw(INIT_ERROR, 0, P.encode_error(exc, "the initializer")))
        return False
    _w.in_task = False
    return True


def _call(slot: List[Frame]) -> None:
    """Run the call in ``slot`` and send its reply."""
    w = _w
    frame = slot.pop()
    task = w.calling = frame[1]
    try:
        fn, args, kwargs = _load_call(frame[2], frame[3])
    except BaseException as exc:
        _reply(encode_raw(BAD_CALL, task, P.encode_error(exc, "unpickling the task")))
        return
    del frame  # what the arguments need (their buffers) they keep alive
    w.task = task
    w.in_task = True
    try:
        result = fn(*args, **kwargs)
    except BaseException as exc:
        w.in_task = False
        w.task = None
        chunks = encode_raw(ERROR, task, P.encode_error(exc, "the task"))
    else:
        w.in_task = False
        w.task = None
        del fn, args, kwargs
        try:
            chunks = encode(RESULT, task, big(result))
        except BaseException as exc:
            chunks = encode_raw(ERROR, task, P.encode_error(exc, "pickling the result"))
        del result
    _reply(chunks)


def _reply(chunks: List[Any]) -> None:
    _send(chunks)
    _w.replied = True


def _load_call(payload: bytearray, bufs: List[bytearray]) -> Any:
    try:
        return pickle.loads(payload, buffers=bufs)
    except (AttributeError, ImportError) as exc:
        if _w.main is None or b"__main__" not in payload:
            raise
        error: BaseException = exc
    # A function (or class) of the parent's main script: import that script
    # here as __mp_main__, as multiprocessing's spawn does, once.
    if not _w.main_loaded:
        _load_main(_w.main)
        try:
            return pickle.loads(payload, buffers=bufs)
        except AttributeError as exc:
            error = exc
    if not isinstance(error, AttributeError):
        raise error
    raise AttributeError(
        f"{error}; this worker imported the parent's main script as __mp_main__, where code "
        "under `if __name__ == '__main__':` does not run: define the function at the top "
        "level of the script, or in a module"
    ) from None


def _load_main(main: Tuple[str, str]) -> None:
    """Run the parent's main module as ``__mp_main__`` and make it ``__main__`` here.

    Code under ``if __name__ == "__main__":`` does not run (that is the
    guard's purpose), so functions defined there cannot be found.
    """
    import runpy
    import types

    _w.main_loaded = True
    kind, where = main
    if kind == "name":
        namespace = runpy.run_module(where, run_name="__mp_main__", alter_sys=True)
    else:
        namespace = runpy.run_path(where, run_name="__mp_main__")
    module = types.ModuleType("__mp_main__")
    module.__dict__.update(namespace)
    sys.modules["__main__"] = sys.modules["__mp_main__"] = module
