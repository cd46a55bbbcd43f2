"""Framed messages with file descriptors over an AF_UNIX stream socket.

The only importer of the C module ``forkserver._fdpass`` (``_sibling`` and
``_slots`` use its ``ffi, lib`` from here); used by the parent (non-blocking
sockets) and by template processes (blocking sockets).

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

Size (~600 lines): one state machine -- a channel's send queue and its three receive
cursors, with the sentinel reserve that guards every receive -- split it and each half
would reach into the other's state.
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
from typing import Any, Deque, Iterable, List, NamedTuple, Optional, Tuple, Union

from ._errors import BrokenChannelError, ClosedError, FdTableFullError, ProtocolError
from ._fdpass import ffi, lib

__all__ = [
    "MAX_FDS_PER_MESSAGE",
    "PID_KIND",
    "Frame",
    "FdChannel",
    "gettid",
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

    Policy (the reserve protects receiving; it must not starve the rest of
    the process).  Right before a receive, ``ensure(n)`` may take every
    free slot: the fds about to arrive will use them.  Between receives the
    standing reserve is only topped up while ``HEADROOM`` slots stay free
    (``top_up``): a template that was sent most of its descriptor table
    still has room to open ``/proc/self/status``, a socket, a pidfd -- to
    fork and to evaluate.  Checking that costs ``2 * HEADROOM`` cheap
    syscalls per top-up (~3 us); there is no cheaper exact count of free
    slots.

    Each count change is made in the same statement as the syscalls it
    counts, so an exception raised between statements (a signal handler's)
    never leaves a sentinel counted but closed, or held but uncounted.

    Limit: the lock orders our own channels only.  Another thread of the
    process that opens an fd between ``release`` and the ``recvmsg`` can take
    a freed slot; if the table is then full, the kernel drops fds and the
    channel raises ``ProtocolError``.
    """

    #: descriptor slots the standing reserve always leaves free
    HEADROOM = 16

    def __init__(self) -> None:
        self.lock = _thread.allocate_lock()
        self._spare = ffi.new("int[]", MAX_FDS_PER_MESSAGE + self.HEADROOM)
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
        self._count = lib.fdp_close_many(self._spare, self._count) and 0
        if self._model >= 0:
            self._model = os.close(self._model) or -1  # type: ignore[func-returns-value]  # os.close returns None

    def _have_model(self) -> bool:
        if self._model >= 0:
            return True
        try:
            fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            try:  # keep the model out of 0-2: a process may close its stdio
                self._model = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
            finally:
                os.close(fd)
        except OSError as exc:
            if exc.errno in _TABLE_FULL:
                return False
            raise
        return True

    def _dup(self, n: int) -> int:
        """Add up to ``n`` sentinels; how many were added (fewer: the table is full)."""
        before = self._count
        self._count += lib.fdp_dup_many(self._model, self._spare + self._count, n)
        got = self._count - before
        if got < n and ffi.errno not in _TABLE_FULL:
            err = ffi.errno
            raise OSError(err, f"dup of a sentinel fd: {os.strerror(err)}")
        return got

    def ensure(self, n: int) -> bool:
        """Hold at least ``n`` sentinels for an imminent receive; False if the table is full.

        Lock held.  May take the last free slots: the fds that arrive use them.
        """
        missing = n - self._count
        if missing <= 0:
            return True
        if not self._have_model():
            return False
        if self._dup(missing) == missing:
            return True
        self._leave_headroom()  # we wait for slots: leave the rest of the process its share
        return False

    def top_up(self, n: int) -> None:
        """Hold up to ``n`` sentinels between receives, leaving ``HEADROOM`` slots free.  Lock held."""
        if not self._have_model():
            return
        missing = max(0, n - self._count)
        if self._dup(missing + self.HEADROOM) == missing + self.HEADROOM:
            self.release(self.HEADROOM)  # they proved HEADROOM more slots are free
        else:
            self._leave_headroom()  # the table is full now

    def _leave_headroom(self) -> None:
        """The table is full: give up HEADROOM sentinels (or all) so that many slots are free."""
        self.release(min(self._count, self.HEADROOM))

    def release(self, n: int) -> None:
        """Close ``n`` sentinels so the kernel can install ``n`` fds.  Lock held."""
        self._count -= n + (lib.fdp_close_many(self._spare + self._count - n, n) and 0)


_reserve = _Reserve()
os.register_at_fork(after_in_child=_reserve._after_fork_child)


def _raise_errno(what: str, chan: "FdChannel") -> None:
    err = ffi.errno
    if err in _BROKEN:
        raise BrokenChannelError(f"{what} failed on {chan!r}: the peer is gone ({os.strerror(err)})")
    raise OSError(err, f"{what} on {chan!r}: {os.strerror(err)}")


# Receive cursors (struct fdp_cursor, advanced by fdp_recv itself): the
# header, the payload, the carriers (bytes = carrier bytes, nfds = fds).
_HDR, _PAY, _CAR = 0, 1, 2
_CURSORS_SIZE = ffi.sizeof("struct fdp_cursor[3]")
_NO_CURSORS = bytes(_CURSORS_SIZE)


class FdChannel:
    """A bidirectional, queued channel of frames and fds over an AF_UNIX stream socket.

    ``send`` never blocks on a non-blocking socket: what the kernel does not
    take now stays queued (call ``flush`` when the socket is writable).
    ``receive`` returns one complete frame or ``None`` when nothing complete
    is available yet.  On a blocking socket both calls block instead.
    fds are sent and received in strict FIFO order and never lost.

    ``PID`` frames (written by a new process itself, see ``fork_sibling``)
    are not returned: the channel records them as ``peer_pid``.

    Interruptions.  ``receive`` may be interrupted anywhere (an exception
    raised between two statements, say by a signal handler) and called
    again: the kernel's bytes and fds are counted by the C call that
    received them, so nothing is lost, duplicated or misread.  A ``send``
    or ``flush`` interrupted after handing part of a frame to the kernel
    closes the channel (half a frame in the stream would be misread):
    callers that must not lose the channel defer ``KeyboardInterrupt``
    around it (``forkserver._interrupts``).
    """

    #: a pid slot (``_slots``) of the fork or spawn this channel reports on, until settled
    slot: Optional[int] = None

    def __init__(self, sock: socket.socket, *, fd_wait: float = 10.0) -> None:
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise ValueError(f"an FdChannel needs an AF_UNIX SOCK_STREAM socket, got {sock!r}")
        self.sock = sock
        self._fd = sock.fileno()
        self._blocking = sock.getblocking()
        self.fd_wait = fd_wait
        self._out: Deque[List] = deque()  # [bytearray, fds or None, bytes already sent]
        self._in_send = False  # True while part of a frame may be in the kernel only
        # receive state: three cursors, the header bytes, and per frame (made
        # when its header is complete) the payload, the carrier bytes and the fds
        self._cur = ffi.new("struct fdp_cursor[3]")
        self._hdr = bytearray(HEADER.size)
        self._hdr_c = ffi.from_buffer(self._hdr)  # never resized, so a lasting export is fine
        self._payload: Optional[bytearray] = None
        self._payload_c: Any = None
        self._carriers: Any = None  # cdata char[]: one byte per fd batch
        self._rx: Any = None  # cdata int[]: the frame's fds as they arrive
        self._backoff = 0.0
        self.stalled_until: Optional[float] = None
        self._stall_deadline: Optional[float] = None  # blocking sockets only
        self.closed = False
        #: the peer process's pid, once a PID frame announced it
        self.peer_pid: Optional[int] = None

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
        units: List[Tuple[bytes, Optional[List[int]]]] = [
            (HEADER.pack(len(payload), len(fdlist), kind) + payload, None)
        ]
        for i in range(0, len(fdlist), MAX_FDS_PER_MESSAGE):
            units.append((_CARRIER, fdlist[i : i + MAX_FDS_PER_MESSAGE]))
        done = 0
        try:
            if not self._out:
                # Fast path: hand the caller's own fds to the kernel, no dups.  A
                # sendmsg takes its fds with its first byte or not at all.
                self._in_send = True
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
            self._in_send = False
        except BaseException:
            if self._in_send:
                self.close()  # part of this frame may be in the stream: the channel is broken
            raise

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
        try:
            while out:
                unit = out[0]
                data, fds, offset = unit
                self._in_send = True
                n = self._sendmsg(data, offset, fds)
                if n < 0:
                    self._in_send = False
                    return False
                if fds:
                    # The kernel holds its own references now.
                    unit[1] = None if lib.fdp_close_many(ffi.new("int[]", fds), len(fds)) else None
                unit[2] += n
                if unit[2] == len(data):
                    out.popleft()
                self._in_send = False
            return True
        except BaseException:
            if self._in_send:
                self.close()  # sent bytes may be counted as unsent: the stream is unusable
            raise

    # -- receiving ---------------------------------------------------------------

    def receive(self) -> Optional[Frame]:
        """Return the next complete frame, or ``None`` if none is complete yet.

        On a blocking socket this waits for a frame (and raises
        ``FdTableFullError`` if fd slots stay unavailable for ``fd_wait``
        seconds, losing nothing).  Raises ``BrokenChannelError`` when the peer
        has closed the channel, ``ProtocolError`` on a malformed stream.
        A ``PID`` frame is absorbed into ``peer_pid`` instead of returned.
        """
        if self.closed:
            raise ClosedError(f"receive on {self!r}: the channel was closed; open a new one")
        cur = self._cur
        while True:
            if cur[_HDR].got < HEADER.size:
                if not self._read(self._hdr_c, HEADER.size, cur + _HDR):
                    return None
                continue
            length, nfds, kind = HEADER.unpack(self._hdr)
            if cur[_PAY].got < length:
                if self._payload_c is None:
                    self._payload = bytearray(length)
                    self._payload_c = ffi.from_buffer(self._payload)
                if not self._read(self._payload_c, length, cur + _PAY):
                    return None
                continue
            if cur[_CAR].nfds < nfds:
                if self._rx is None:
                    self._carriers = ffi.new("char[]", -(-nfds // MAX_FDS_PER_MESSAGE))
                    self._rx = ffi.new("int[]", nfds)
                if not self._read_carrier(nfds):
                    return None
                continue
            payload = bytes(self._payload) if length else b""  # type: ignore[arg-type]  # made when length > 0
            if kind == PID_KIND and not nfds and length == PID_FORMAT.size:
                # Recorded in the same statement that resets the receive state.
                self.peer_pid, _ = PID_FORMAT.unpack(payload)[0], self._reset()  # type: ignore[func-returns-value]
                continue
            frame = Frame(kind, payload, ffi.unpack(self._rx, nfds) if nfds else [])
            self._reset()
            return frame

    def _reset(self) -> None:
        """Start the next frame.  One statement: no state between the old frame and the new."""
        self._payload = self._payload_c = self._carriers = self._rx = ffi.memmove(
            self._cur, _NO_CURSORS, _CURSORS_SIZE
        )

    def _recv(self, buf, length: int, fds, want: int, cur) -> int:
        """One ``fdp_recv`` (EINTR retried): its byte count, or -1 for EAGAIN; raises on errors."""
        while True:
            n = lib.fdp_recv(self._fd, buf, length, fds, want, cur, 0)
            if n >= 0:
                return n
            err = ffi.errno
            if err in (errno.EAGAIN, errno.EWOULDBLOCK):
                return -1
            if err != errno.EINTR:
                _raise_errno("recvmsg", self)

    def _read(self, buf, length: int, cur) -> bool:
        """One recvmsg into what is left of ``buf``; False for EAGAIN; raises on EOF/errors."""
        n = self._recv(buf, length, ffi.NULL, 0, cur)
        if n < 0:
            return False
        if cur.flags & _MSG_CTRUNC:  # the kernel closed fds sent with bytes we read
            self._fail("fds were attached to frame bytes, not to a carrier")
        if n == 0:
            where = "between frames" if self._cur[_HDR].got == 0 else "in the middle of a frame"
            raise BrokenChannelError(f"{self!r}: the peer closed the channel {where}")
        return True

    def _fail(self, why: str) -> None:
        """Close the fds received so far and raise: the stream is unusable."""
        car = self._cur + _CAR
        if self._rx is not None:
            car.nfds = lib.fdp_close_many(self._rx, car.nfds) and 0
        raise ProtocolError(f"{self!r}: {why}; close this channel")

    def _read_carrier(self, nfds: int) -> bool:
        car = self._cur + _CAR
        batch = car.got  # carriers received so far
        if car.nfds != min(nfds, batch * MAX_FDS_PER_MESSAGE):
            self._fail(f"expected {min(nfds, batch * MAX_FDS_PER_MESSAGE)} fds, got {car.nfds}")
        if batch and self._carriers[batch - 1] != _CARRIER:
            self._fail(f"expected a carrier byte, got {self._carriers[batch - 1]!r}")
        if self.stalled_until is not None:
            now = time.monotonic()
            if now < self.stalled_until and not self._wait_stall(now):
                return False
            self.stalled_until = None
        want = min(nfds - car.nfds, MAX_FDS_PER_MESSAGE)
        with _reserve.lock:
            if not _reserve.ensure(want):
                self._stall()
                return self._blocking  # a blocking channel sleeps through it and retries
            _reserve.release(want)
            try:
                # At most one carrier byte per call: never read past this unit.
                got = self._read_fds(batch + 1, want, car)
            finally:
                _reserve.top_up(want)  # checked again before the next carrier
        if not got:
            return False
        if car.nfds != min(nfds, (batch + 1) * MAX_FDS_PER_MESSAGE) or self._carriers[batch] != _CARRIER:
            got = car.nfds - min(nfds, batch * MAX_FDS_PER_MESSAGE)
            self._fail(f"expected a carrier with {want} fds, got {self._carriers[batch]!r} with {got}")
        self._backoff = 0.0
        self._stall_deadline = None
        return True

    def _read_fds(self, length: int, want: int, car) -> bool:
        """One recvmsg of a carrier byte with up to ``want`` fds; False for EAGAIN."""
        n = self._recv(self._carriers, length, self._rx, want, car)
        if n < 0:
            return False
        if car.flags & _MSG_CTRUNC:
            self._fail("fds were truncated (MSG_CTRUNC): more than announced, or lost")
        if n == 0:
            raise BrokenChannelError(f"{self!r}: the peer closed the channel in the middle of a frame")
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
        """Close the socket and every fd still queued or half-received.  Idempotent.

        Each fd is closed in the statement that forgets it: an interrupted
        close can be called again and never closes an fd twice.
        """
        self.closed = True
        out = self._out
        while out:
            (fds := out.popleft()[1]) and lib.fdp_close_many(ffi.new("int[]", fds), len(fds))
        car = self._cur + _CAR
        if self._rx is not None and car.nfds:
            car.nfds = lib.fdp_close_many(self._rx, car.nfds) and 0
        self.sock.close()

    def __enter__(self) -> "FdChannel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: The kind of the frame a new process writes first (``fork_sibling``,
#: ``spawn_sibling``): its pid.  FdChannel records it as ``peer_pid``.
PID_KIND = 106
PID_FORMAT = struct.Struct("=i")
_PID_PREFIX = HEADER.pack(PID_FORMAT.size, 0, PID_KIND)


def __getattr__(name: str) -> Any:  # PEP 562: the process-making calls moved to _sibling
    if name in _SIBLING:
        from . import _sibling

        return getattr(_sibling, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_SIBLING = {"fork_sibling", "spawn_sibling", "STAGE_SESSION", "STAGE_FDS", "STAGE_CWD", "STAGE_EXEC"}


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
