"""Framed messages with file descriptors over an AF_UNIX stream socket.

The only importer of the C module ``forkserver._fdpass``; used by the parent
(non-blocking sockets) and by template processes (blocking sockets).

Wire format of one frame::

    header  8 bytes: payload length (u32), fd count (u16), kind (u8), pad
    payload  `length` bytes
    carrier  ceil(nfds / 253) times: the byte b"F" sent with up to 253 fds

Kernel facts this relies on (net/unix/af_unix.c, unix_stream_read_generic):

* A ``sendmsg`` with SCM_RIGHTS attaches the fds to the first skb of that
  send.  The receiver gets them with the *first* ``recvmsg`` that consumes any
  byte of that skb.
* A ``recvmsg`` on a stream socket glues the bytes of earlier skbs to the
  bytes of an fd-carrying skb (it stops *after* it).  A reader that asks for
  more than the current unit can therefore receive fds together with bytes of
  an earlier frame.  So we never read past the unit we are in: the header,
  then exactly the payload, then exactly one carrier byte per fd batch; the
  sender starts every fd-carrying ``sendmsg`` with its carrier byte.
* If the receiver's descriptor table is full, the kernel closes the fds it
  could not install and sets MSG_CTRUNC: they are lost.  Before receiving a
  carrier we therefore make room by closing *sentinel* descriptors reserved
  beforehand (the close-dup trick of AnyEvent::FDpasser); if we cannot even
  reserve them, we leave the fds queued in the kernel and retry later.
* ``MSG_CMSG_CLOEXEC`` marks received fds close-on-exec atomically.
* SCM_MAX_FD is 253: a batch with more fds fails with EINVAL, so larger
  lists are split over several carriers.

Channels are not thread-safe; callers serialise access.
"""
from __future__ import annotations

import _thread  # not threading: templates stay free of its at-fork work (see _server)
import errno
import fcntl
import os
import socket
import struct
import time
from collections import deque
from typing import Deque, Iterable, List, NamedTuple, Optional, Tuple, Union

from ._errors import BrokenChannelError, ClosedError, FdTableFullError, ProtocolError
from ._fdpass import ffi, lib

__all__ = [
    "MAX_FDS_PER_MESSAGE",
    "Frame",
    "FdChannel",
    "fork_sibling",
    "gettid",
    "spawn_sibling",
]

MAX_FDS_PER_MESSAGE: int = lib.FDP_MAX_FDS
HEADER = struct.Struct("=IHBx")
MAX_PAYLOAD = (1 << 32) - 1
MAX_FDS_PER_FRAME = (1 << 16) - 1
_CARRIER = b"F"
_NOSIGNAL = int(socket.MSG_NOSIGNAL)  # plain ints: IntFlag arithmetic is slow
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
_TABLE_FULL = (errno.EMFILE, errno.ENFILE)
_BROKEN = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ESHUTDOWN)
_BACKOFF_FIRST = 0.001
_BACKOFF_MAX = 0.1

FdLike = Union[int, "socket.socket", object]


class Frame(NamedTuple):
    """One received message: its ``kind`` byte, ``payload`` and owned ``fds``."""

    kind: int
    payload: bytes
    fds: List[int]


def _fileno(obj: FdLike) -> int:
    if isinstance(obj, int):
        return obj
    fileno = getattr(obj, "fileno", None)
    if fileno is None:
        raise TypeError(f"expected an int fd or an object with fileno(), got {obj!r}")
    return int(fileno())


class _Reserve:
    """Process-wide sentinel descriptors that keep slots free for incoming fds.

    Shared by every channel of the process: the standing reserve is the
    largest batch seen so far (at most 253 fds), not 253 per channel.  The
    dup/close loops run in C: two syscalls per fd is the price of the trick.

    Limit: the lock orders our own channels only.  Another thread of the
    process that opens an fd between ``release`` and the ``recvmsg`` can take
    a freed slot; if the table is then full, the kernel drops fds and the
    channel raises ``ProtocolError``.
    """

    def __init__(self) -> None:
        self.lock = _thread.allocate_lock()
        self._spare = ffi.new("int[]", MAX_FDS_PER_MESSAGE)
        self._count = 0
        self._model = -1
        self.inherit = False  # set around fork_sibling: a template clone keeps the reserve

    def held(self) -> List[int]:
        """The sentinel fds currently held (for leak checks)."""
        fds = [self._spare[i] for i in range(self._count)]
        return fds + ([self._model] if self._model >= 0 else [])

    def _after_fork_child(self) -> None:
        # The lock may have been held by another thread of the parent.
        self.lock = _thread.allocate_lock()
        if not self.inherit:
            self.drop()

    def drop(self) -> None:
        """Close every sentinel: a process that is done with channels needs none.

        A forked child of the user's program (os.fork) should not carry them
        around, nor should a template clone that becomes a worker.  A clone
        that stays a template keeps them: it needs the same reserve.
        """
        lib.fdp_close_many(self._spare, self._count)
        self._count = 0
        if self._model >= 0:
            os.close(self._model)
            self._model = -1

    def ensure(self, n: int) -> bool:
        """Hold at least ``n`` sentinels; False if the table is full.  Lock held."""
        missing = n - self._count
        if missing <= 0:
            return True
        try:
            if self._model < 0:
                fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
                try:  # keep the model out of 0-2: a process may close its stdio
                    self._model = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
                finally:
                    os.close(fd)
        except OSError as exc:
            if exc.errno in _TABLE_FULL:
                return False
            raise
        got = lib.fdp_dup_many(self._model, self._spare + self._count, missing)
        self._count += got
        if got < missing:
            err = ffi.errno
            if err in _TABLE_FULL:
                return False
            raise OSError(err, f"dup of a sentinel fd: {os.strerror(err)}")
        return True

    def release(self, n: int) -> None:
        """Close ``n`` sentinels so the kernel can install ``n`` fds.  Lock held."""
        self._count -= n
        lib.fdp_close_many(self._spare + self._count, n)


_reserve = _Reserve()
os.register_at_fork(after_in_child=_reserve._after_fork_child)


def _raise_errno(what: str, chan: "FdChannel") -> None:
    err = ffi.errno
    if err in _BROKEN:
        raise BrokenChannelError(f"{what} failed on {chan!r}: the peer is gone ({os.strerror(err)})")
    raise OSError(err, f"{what} on {chan!r}: {os.strerror(err)}")


class FdChannel:
    """A bidirectional, queued channel of frames and fds over an AF_UNIX stream socket.

    ``send`` never blocks on a non-blocking socket: what the kernel does not
    take now stays queued (call ``flush`` when the socket is writable).
    ``receive`` returns one complete frame or ``None`` when nothing complete
    is available yet.  On a blocking socket both calls block instead.
    fds are sent and received in strict FIFO order and never lost.
    """

    def __init__(self, sock: socket.socket, *, fd_wait: float = 10.0) -> None:
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise ValueError(f"an FdChannel needs an AF_UNIX SOCK_STREAM socket, got {sock!r}")
        self.sock = sock
        self._fd = sock.fileno()
        self._blocking = sock.getblocking()
        self.fd_wait = fd_wait
        self._out: Deque[List] = deque()  # [bytearray, fds or None, bytes already sent]
        # receive state
        self._hdr = bytearray(HEADER.size)
        self._hdr_c = ffi.from_buffer(self._hdr)  # never resized, so a lasting export is fine
        self._hdr_got = 0
        self._kind = 0
        self._nfds = 0
        self._payload: Optional[bytearray] = None
        self._payload_got = 0
        self._rx_fds: List[int] = []
        self._cfds = ffi.new("int[]", MAX_FDS_PER_MESSAGE)
        self._cnfds = ffi.new("int *")
        self._cflags = ffi.new("int *")
        self._carrier = bytearray(1)
        self._carrier_c = ffi.from_buffer(self._carrier)
        self._backoff = 0.0
        self.stalled_until: Optional[float] = None
        self._stall_deadline: Optional[float] = None  # blocking sockets only
        self.closed = False

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self._fd}"
        return f"<forkserver.FdChannel {state}>"

    def fileno(self) -> int:
        """The socket's fd (for selectors and event loops)."""
        return self._fd

    # -- sending -----------------------------------------------------------------

    def send(self, kind: int, payload: bytes = b"", fds: Iterable[FdLike] = ()) -> None:
        """Send one frame, queueing what the socket does not take now.

        The caller may close its own copies of ``fds`` as soon as this
        returns: whatever is not handed to the kernel at once is duplicated.
        """
        if self.closed:
            raise ClosedError(f"send on {self!r}: the channel was closed; open a new one")
        if len(payload) > MAX_PAYLOAD:
            raise ValueError(f"payload of {len(payload)} bytes is larger than {MAX_PAYLOAD}")
        fdlist = [fd if type(fd) is int else _fileno(fd) for fd in fds]
        if len(fdlist) > MAX_FDS_PER_FRAME:
            raise ValueError(f"{len(fdlist)} fds in one frame; at most {MAX_FDS_PER_FRAME}")
        units = [(HEADER.pack(len(payload), len(fdlist), kind) + payload, None)]
        for i in range(0, len(fdlist), MAX_FDS_PER_MESSAGE):
            units.append((_CARRIER, fdlist[i : i + MAX_FDS_PER_MESSAGE]))
        done = 0
        if not self._out:
            # Fast path: hand the caller's own fds to the kernel, no dups.  A
            # sendmsg takes its fds with its first byte or not at all.
            for data, unit_fds in units:
                n = self._sendmsg(data, 0, unit_fds)
                if n < 0:
                    break
                done += 1
                if n < len(data):
                    self._out.append([bytearray(data[n:]), None, 0])
                    break
        for data, unit_fds in units[done:]:
            dups = None
            if unit_fds:
                try:
                    dups = [os.dup(fd) for fd in unit_fds]
                except OSError:
                    if done:  # part of the frame is in the stream: it is unusable now
                        self.close()
                    raise
            if dups is None:
                self._queue(data, None)
            else:
                self._out.append([bytearray(data), dups, 0])

    def _sendmsg(self, data, offset: int, fds: Optional[List[int]]) -> int:
        """One sendmsg from ``data[offset:]`` with ``fds``; bytes sent, or -1 for EAGAIN."""
        nfds = len(fds) if fds else 0
        cfds = ffi.new("int[]", fds) if nfds else ffi.NULL
        with ffi.from_buffer(data) as buf:
            while True:
                n = lib.fdp_send(self._fd, buf + offset, len(data) - offset, cfds, nfds, _NOSIGNAL)
                if n >= 0:
                    return n
                err = ffi.errno
                if err == errno.EINTR:
                    continue
                if err in (errno.EAGAIN, errno.EWOULDBLOCK):
                    return -1
                _raise_errno("sendmsg", self)

    def _queue(self, data: bytes, fds: Optional[List[int]]) -> None:
        # Bytes without fds may join the previous unit: an fd-carrying sendmsg
        # still starts with its own carrier byte, which is all the reader needs.
        if self._out:
            self._out[-1][0] += data
        else:
            self._out.append([bytearray(data), fds, 0])

    @property
    def pending_output(self) -> bool:
        """True while queued bytes or fds have not been handed to the kernel."""
        return bool(self._out)

    def flush(self) -> bool:
        """Send as much of the queue as the socket takes; True once it is empty."""
        out = self._out
        while out:
            unit = out[0]
            data, fds, offset = unit
            n = self._sendmsg(data, offset, fds)
            if n < 0:
                return False
            if fds:
                # The kernel holds its own references now.
                lib.fdp_close_many(ffi.new("int[]", fds), len(fds))
                unit[1] = None
            unit[2] += n
            if unit[2] == len(data):
                out.popleft()
        return True

    # -- receiving ---------------------------------------------------------------

    def receive(self) -> Optional[Frame]:
        """Return the next complete frame, or ``None`` if none is complete yet.

        On a blocking socket this waits for a frame (and raises
        ``FdTableFullError`` if fd slots stay unavailable for ``fd_wait``
        seconds, losing nothing).  Raises ``BrokenChannelError`` when the peer
        has closed the channel, ``ProtocolError`` on a malformed stream.
        """
        if self.closed:
            raise ClosedError(f"receive on {self!r}: the channel was closed; open a new one")
        while True:
            if self._hdr_got < HEADER.size:
                if not self._read_header():
                    return None
                continue
            if self._payload is not None and self._payload_got < len(self._payload):
                if not self._read_payload():
                    return None
                continue
            if len(self._rx_fds) < self._nfds:
                if not self._read_carrier():
                    return None
                continue
            return self._complete()

    def _complete(self) -> Frame:
        payload = bytes(self._payload) if self._payload is not None else b""
        frame = Frame(self._kind, payload, self._rx_fds)
        self._hdr_got = 0
        self._payload = None
        self._payload_got = 0
        self._rx_fds = []
        self._nfds = 0
        return frame

    def _recv(self, buf, length: int, maxfds: int) -> int:
        """One recvmsg; returns bytes read, -1 for EAGAIN; raises on EOF/errors."""
        while True:
            n = lib.fdp_recv(self._fd, buf, length, self._cfds, maxfds, self._cnfds, self._cflags, 0)
            if n >= 0:
                break
            if ffi.errno == errno.EINTR:
                continue
            if ffi.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                return -1
            _raise_errno("recvmsg", self)
        if self._cflags[0] & _MSG_CTRUNC:
            got = ffi.unpack(self._cfds, self._cnfds[0])
            self._fail(got, "fds were truncated (MSG_CTRUNC): more than announced, or lost")
        if n == 0:
            where = "between frames" if self._hdr_got == 0 else "in the middle of a frame"
            raise BrokenChannelError(f"{self!r}: the peer closed the channel {where}")
        return n

    def _fail(self, fds: List[int], why: str) -> None:
        for fd in fds + self._rx_fds:
            os.close(fd)
        self._rx_fds = []
        raise ProtocolError(f"{self!r}: {why}; close this channel")

    def _read_header(self) -> bool:
        n = self._recv(self._hdr_c + self._hdr_got, HEADER.size - self._hdr_got, 0)
        if n < 0:
            return False
        self._hdr_got += n
        if self._hdr_got == HEADER.size:
            length, self._nfds, self._kind = HEADER.unpack(self._hdr)
            self._payload = bytearray(length) if length else None
        return True

    def _read_payload(self) -> bool:
        assert self._payload is not None
        with ffi.from_buffer(self._payload) as buf:
            n = self._recv(buf + self._payload_got, len(self._payload) - self._payload_got, 0)
        if n < 0:
            return False
        self._payload_got += n
        return True

    def _read_carrier(self) -> bool:
        if self.stalled_until is not None:
            now = time.monotonic()
            if now < self.stalled_until and not self._wait_stall(now):
                return False
            self.stalled_until = None
        want = min(self._nfds - len(self._rx_fds), MAX_FDS_PER_MESSAGE)
        with _reserve.lock:
            if not _reserve.ensure(want):
                self._stall()
                return self._blocking  # a blocking channel sleeps through it and retries
            _reserve.release(want)
            try:
                n = self._recv(self._carrier_c, 1, want)
            finally:
                _reserve.ensure(want)  # best effort; checked again before the next carrier
        if n < 0:
            return False
        got = ffi.unpack(self._cfds, self._cnfds[0])
        if self._carrier != _CARRIER or len(got) != want:
            self._fail(got, f"expected a carrier with {want} fds, got {bytes(self._carrier)!r} with {len(got)}")
        self._backoff = 0.0
        self._stall_deadline = None
        self._rx_fds.extend(got)
        return True

    def _stall(self) -> None:
        self._backoff = min(_BACKOFF_MAX, self._backoff * 2 or _BACKOFF_FIRST)
        self.stalled_until = time.monotonic() + self._backoff
        if self._blocking and self._stall_deadline is None:
            self._stall_deadline = time.monotonic() + self.fd_wait

    def _wait_stall(self, now: float) -> bool:
        """Blocking sockets sleep through the backoff; non-blocking ones return False."""
        if not self._blocking:
            return False
        assert self._stall_deadline is not None and self.stalled_until is not None
        if now >= self._stall_deadline:
            self._stall_deadline = None
            self.stalled_until = None
            raise FdTableFullError(
                f"{self!r}: no descriptor slots for incoming fds for {self.fd_wait}s; "
                "close some fds or raise RLIMIT_NOFILE, then receive again (nothing was lost)"
            )
        time.sleep(self.stalled_until - now)
        return True

    # -- closing -----------------------------------------------------------------

    def close(self) -> None:
        """Close the socket and every fd still queued or half-received.  Idempotent."""
        if self.closed:
            return
        self.closed = True
        for _, fds, _ in self._out:
            for fd in fds or ():
                os.close(fd)
        self._out.clear()
        for fd in self._rx_fds:
            os.close(fd)
        self._rx_fds = []
        self.sock.close()

    def __enter__(self) -> "FdChannel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def fork_sibling() -> int:
    """Create a process whose parent is our parent (``clone(CLONE_PARENT)``).

    Returns the new pid in the caller and 0 in the new process, like
    ``os.fork()``.  Only safe in a single-threaded process: the caller checks.
    """
    _reserve.inherit = True
    try:
        pid = lib.fdp_fork_sibling()
    finally:
        _reserve.inherit = False
    if pid < 0:
        err = ffi.errno
        raise OSError(err, f"clone(CLONE_PARENT) failed: {os.strerror(err)}")
    return pid


#: where a failed spawn stopped (``spawn_sibling``'s third result)
STAGE_SESSION: int = lib.FDP_STAGE_SESSION
STAGE_FDS: int = lib.FDP_STAGE_FDS
STAGE_CWD: int = lib.FDP_STAGE_CWD
STAGE_EXEC: int = lib.FDP_STAGE_EXEC


def spawn_sibling(
    strings: bytes,
    counts: Tuple[int, int, int],
    cwd: Optional[bytes],
    fd_map: List[Tuple[int, int]],
    keep: List[int],
    new_session: bool,
    pgid: int,
    dfl_sigs: int,
) -> Tuple[int, int, int]:
    """Start a program as a child of our parent, vfork-style: ``(pid, errno, stage)``.

    ``strings`` holds the candidate paths, the argv and the environment,
    each string NUL-terminated, back to back; ``counts`` says how many of
    each.  The paths are tried in turn like ``execvpe``.  ``fd_map`` lists
    ``(source fd, target fd)`` pairs (source -1: the target is closed; no
    source may also be a target); ``keep`` the targets above 2, ascending;
    every other fd is closed at exec.  If the child failed before or in
    ``execve``, errno is non-zero and the pid is still that of an exited
    child the caller's parent must reap.
    Raises ``OSError`` only if the clone itself failed.
    """
    nfd = len(fd_map)
    a = ffi.new("struct fdp_spawn_args *")
    # A struct field does not keep its cdata alive: these locals do, until we return.
    buf = ffi.from_buffer(strings)
    ptrs = ffi.new("char *[]", sum(counts) + 3)
    a.strings, a.ptrs = buf, ptrs
    a.npaths, a.nargv, a.nenv = counts
    cwd_c = ffi.new("char[]", cwd) if cwd is not None else ffi.NULL
    a.cwd = cwd_c
    src = ffi.new("int[]", [s for s, _ in fd_map] or [0])
    dst = ffi.new("int[]", [d for _, d in fd_map] or [0])
    keep_c = ffi.new("int[]", keep or [0])
    a.src, a.dst, a.nfd = src, dst, nfd
    a.keep, a.nkeep = keep_c, len(keep)
    a.new_session = bool(new_session)
    a.pgid = pgid
    a.dfl_sigs = dfl_sigs
    pid = lib.fdp_spawn_sibling(a)
    if pid < 0:
        err = ffi.errno
        raise OSError(err, f"clone(CLONE_VM|CLONE_VFORK|CLONE_PARENT) failed: {os.strerror(err)}")
    return pid, a.err, a.stage


def gettid() -> int:
    """The calling thread's kernel thread id."""
    return lib.fdp_gettid()


def set_name(name: bytes) -> bool:
    """Set the calling thread's name (the process's, from the main thread); False on failure."""
    return lib.fdp_set_name(name) == 0


def drop_reserve() -> None:
    """Close the sentinel fds (see ``_Reserve.drop``)."""
    with _reserve.lock:
        _reserve.drop()


def socketpair() -> Tuple[socket.socket, socket.socket]:
    """An unnamed AF_UNIX stream socketpair, both ends close-on-exec."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
