"""The fd channel: order, non-blocking behaviour, peer death, full fd tables, oracle checks."""
from __future__ import annotations

import fcntl
import json
import os
import random
import resource
import select
import socket
import stat
import struct
import time

import pytest

from forkserver import BrokenChannelError, ProtocolError
from forkserver._fds import HEADER, MAX_FDS_PER_MESSAGE, FdChannel, socketpair

from ._helpers import run_in_child, wait_exitcode

pytestmark = pytest.mark.usefixtures("no_leaks")


def pipe_carrying(index: int) -> int:
    """A pipe read end with ``index`` written into it (the write end is closed)."""
    r, w = os.pipe()
    os.write(w, b"%d" % index)
    os.close(w)
    return r


def read_index(fd: int) -> int:
    data = os.read(fd, 64)
    os.close(fd)
    return int(data)


def receive_blocking(chan: FdChannel, timeout: float = 20.0):
    """Receive one frame on a non-blocking channel, waiting with a deadline."""
    deadline = time.monotonic() + timeout
    while True:
        frame = chan.receive()
        if frame is not None:
            return frame
        left = deadline - time.monotonic()
        assert left > 0, "no frame arrived before the deadline"
        if chan.stalled_until is not None:
            left = min(left, max(0.0, chan.stalled_until - time.monotonic()))
        select.select([chan], [], [], left)


def drain_output(chan: FdChannel, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not chan.flush():
        left = deadline - time.monotonic()
        assert left > 0, "output did not drain before the deadline"
        select.select([], [chan], [], left)


def nonblocking_pair():
    a, b = socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return FdChannel(a), FdChannel(b)


def test_frames_and_fds_flow_both_ways_between_two_processes():
    a, b = socketpair()

    def child_side():
        a.close()
        b.setblocking(False)
        chan = FdChannel(b)
        for i in range(200):
            chan.send(2, b"child %d" % i, [pipe_carrying(1000 + i)])
        seen = []
        while len(seen) < 200:
            frame = receive_blocking(chan)
            assert frame.kind == 1 and frame.payload == b"parent %d" % len(seen)
            seen.append(read_index(frame.fds[0]))
            chan.flush()
        drain_output(chan)
        assert seen == list(range(200))
        chan.close()

    pid = run_in_child(child_side)
    b.close()
    a.setblocking(False)
    chan = FdChannel(a)
    sent_fds = []
    for i in range(200):
        fd = pipe_carrying(i)
        sent_fds.append(fd)
        chan.send(1, b"parent %d" % i, [fd])
    for fd in sent_fds:
        os.close(fd)  # the channel holds its own duplicates
    got = []
    while len(got) < 200:
        frame = receive_blocking(chan)
        assert frame.kind == 2 and frame.payload == b"child %d" % (len(got))
        got.append(read_index(frame.fds[0]))
        chan.flush()
    drain_output(chan)
    assert got == [1000 + i for i in range(200)]
    assert wait_exitcode(pid) == 0
    chan.close()


def test_many_frames_queued_before_the_peer_reads_arrive_in_fifo_order():
    tx, rx = nonblocking_pair()
    count = 600
    for i in range(count):
        fds = [pipe_carrying(i * 3 + k) for k in range(i % 4)]  # 0..3 fds per frame
        tx.send(7, b"x" * (i * 37 % 5000), fds)
        for fd in fds:
            os.close(fd)
    assert tx.pending_output, "the socket buffer should not hold 600 frames; the test needs a queue"
    indices = []
    for i in range(count):
        while True:
            frame = rx.receive()
            if frame is not None:
                break
            tx.flush()
        assert frame.payload == b"x" * (i * 37 % 5000)
        indices.extend(read_index(fd) for fd in frame.fds)
    assert indices == [i * 3 + k for i in range(count) for k in range(i % 4)]
    assert tx.flush() and not tx.pending_output
    tx.close()
    rx.close()


def test_receive_before_send_and_send_before_receive_do_not_block():
    tx, rx = nonblocking_pair()
    assert rx.receive() is None  # nothing sent yet: returns at once
    big = os.urandom(8 << 20)  # far larger than the socket buffer
    r = pipe_carrying(5)
    tx.send(3, big, [r])  # returns although the peer is not reading
    os.close(r)
    assert tx.pending_output
    frame = None
    while frame is None:
        frame = rx.receive()
        tx.flush()
    assert frame.payload == big
    assert read_index(frame.fds[0]) == 5
    tx.close()
    rx.close()


def test_the_receiver_gets_a_clear_error_when_the_sender_dies_mid_frame():
    a, b = socketpair()

    def die_mid_frame():
        b.close()
        a.sendall(HEADER.pack(100, 0, 1) + b"only part of the payload")
        os._exit(0)

    pid = run_in_child(die_mid_frame)
    a.close()
    chan = FdChannel(b)  # blocking: would hang forever if EOF were missed
    with pytest.raises(BrokenChannelError, match="middle of a frame"):
        chan.receive()
    assert wait_exitcode(pid) == 0
    chan.close()


def test_the_receiver_gets_a_clear_error_when_the_peer_closes_between_frames():
    a, b = socketpair()
    tx = FdChannel(a)
    rx = FdChannel(b)
    tx.send(1, b"last")
    tx.close()
    assert rx.receive().payload == b"last"
    with pytest.raises(BrokenChannelError, match="between frames"):
        rx.receive()
    rx.close()


def test_the_sender_gets_a_clear_error_when_the_receiver_is_gone():
    tx, rx = nonblocking_pair()
    rx.close()
    r = pipe_carrying(1)
    with pytest.raises(BrokenChannelError, match="peer is gone"):
        tx.send(1, b"hello", [r])
    os.close(r)
    tx.close()  # closes the duplicate still queued


def test_queued_fds_are_closed_when_the_channel_is_closed_unsent():
    tx, rx = nonblocking_pair()
    r = pipe_carrying(1)
    tx.send(1, os.urandom(8 << 20), [r, r, r])
    os.close(r)
    assert tx.pending_output
    tx.close()  # no_leaks checks the three duplicates were closed
    rx.close()


def test_fds_announced_but_not_sent_are_a_protocol_error():
    a, b = socketpair()
    rx = FdChannel(b)
    a.sendall(HEADER.pack(0, 2, 1) + b"F")  # a carrier byte without fds
    with pytest.raises(ProtocolError, match="expected a carrier with 2 fds"):
        rx.receive()
    a.close()
    rx.close()


def test_more_fds_than_announced_are_closed_and_reported():
    a, b = socketpair()
    rx = FdChannel(b)
    r = pipe_carrying(1)
    a.sendall(HEADER.pack(0, 1, 1))
    socket.send_fds(a, [b"F"], [r, r, r])  # three fds where one was announced
    os.close(r)
    with pytest.raises(ProtocolError, match="MSG_CTRUNC"):
        rx.receive()
    a.close()
    rx.close()


def test_fds_attached_to_header_bytes_are_a_protocol_error():
    a, b = socketpair()
    rx = FdChannel(b)
    r = pipe_carrying(1)
    socket.send_fds(a, [HEADER.pack(0, 0, 1)], [r])
    os.close(r)
    with pytest.raises(ProtocolError):
        rx.receive()
    a.close()
    rx.close()


def test_file_status_flags_survive_passing_and_received_fds_are_cloexec(tmp_path):
    tx, rx = nonblocking_pair()
    r, w = os.pipe()
    os.set_blocking(r, False)
    path = tmp_path / "log"
    f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    tx.send(1, b"", [r, w, f])
    for fd in (r, w, f):
        os.close(fd)
    frame = receive_blocking(rx)
    r2, w2, f2 = frame.fds
    assert fcntl.fcntl(r2, fcntl.F_GETFL) & os.O_NONBLOCK
    assert not fcntl.fcntl(w2, fcntl.F_GETFL) & os.O_NONBLOCK
    assert fcntl.fcntl(f2, fcntl.F_GETFL) & os.O_APPEND
    for fd in frame.fds:
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    os.write(w2, b"through the pipe")
    assert os.read(r2, 100) == b"through the pipe"
    for fd in frame.fds:
        os.close(fd)
    tx.close()
    rx.close()


def test_a_received_fd_numbered_0_is_a_valid_fd_not_eof():
    a, b = socketpair()

    def receiver_without_stdin():
        a.close()
        os.close(0)  # the next fd installed is 0
        chan = FdChannel(b)
        frame = chan.receive()
        assert frame.fds[0] == 0, frame
        assert read_index(frame.fds[0]) == 42
        assert chan.receive().payload == b"after"

    pid = run_in_child(receiver_without_stdin)
    b.close()
    tx = FdChannel(a)
    r = pipe_carrying(42)
    tx.send(1, b"", [r])
    os.close(r)
    tx.send(1, b"after")
    assert wait_exitcode(pid) == 0
    tx.close()


def test_a_channel_socket_passed_over_a_channel_works_as_a_channel():
    tx, rx = nonblocking_pair()
    inner_a, inner_b = socketpair()
    tx.send(1, b"take this", [inner_b])
    inner_b.close()
    frame = receive_blocking(rx)
    received = socket.socket(fileno=frame.fds[0])
    assert received.family == socket.AF_UNIX and received.type == socket.SOCK_STREAM
    inner_tx, inner_rx = FdChannel(inner_a), FdChannel(received)
    inner_tx.send(9, b"over the passed socket")
    r = pipe_carrying(77)
    inner_tx.send(9, b"with an fd", [r])
    os.close(r)
    assert inner_rx.receive().payload == b"over the passed socket"
    got = inner_rx.receive()
    assert got.payload == b"with an fd" and read_index(got.fds[0]) == 77
    for c in (inner_tx, inner_rx, tx, rx):
        c.close()


def test_more_than_253_fds_in_one_frame_are_split_and_reassembled_in_order():
    tx, rx = nonblocking_pair()
    fds = [pipe_carrying(i) for i in range(600)]
    tx.send(1, b"many", fds)
    for fd in fds:
        os.close(fd)
    frame = receive_blocking(rx)
    assert len(frame.fds) == 600
    assert [read_index(fd) for fd in frame.fds] == list(range(600))
    tx.close()
    rx.close()


def _identity(fd: int):
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino)


def test_wire_format_matches_an_independent_stdlib_reader_and_writer_on_random_batches():
    """Oracle: socket.recv_fds / send_fds speak our frame format and agree on every fd."""
    rng = random.Random(1234)
    files = [pipe_carrying(i) for i in range(40)]
    try:
        for trial in range(30):
            nfds = rng.choice([0, 1, 2, 5, 100, 253, 254, 400])
            picks = [rng.choice(files) for _ in range(nfds)]
            payload = os.urandom(rng.randrange(0, 3000))
            kind = rng.randrange(256)

            # our writer -> stdlib reader
            a, b = socketpair()
            tx = FdChannel(a)
            tx.send(kind, payload, picks)
            length, count, got_kind = HEADER.unpack(_recv_exact(b, HEADER.size))
            assert (length, count, got_kind) == (len(payload), nfds, kind)
            assert _recv_exact(b, length) == payload
            received = []
            while len(received) < count:
                want = min(MAX_FDS_PER_MESSAGE, count - len(received))
                msg, fds, flags, _ = socket.recv_fds(b, 1, want)
                assert msg == b"F" and len(fds) == want and not flags & socket.MSG_CTRUNC
                received.extend(fds)
            assert [_identity(fd) for fd in received] == [_identity(fd) for fd in picks]
            for fd in received:
                os.close(fd)

            # stdlib writer -> our reader
            a.sendall(HEADER.pack(len(payload), nfds, kind) + payload)
            for i in range(0, nfds, MAX_FDS_PER_MESSAGE):
                socket.send_fds(a, [b"F"], picks[i : i + MAX_FDS_PER_MESSAGE])
            rx = FdChannel(b)
            frame = rx.receive()
            assert frame.kind == kind and frame.payload == payload
            assert [_identity(fd) for fd in frame.fds] == [_identity(fd) for fd in picks]
            for fd in frame.fds:
                os.close(fd)
            tx.close()
            rx.close()
    finally:
        for fd in files:
            os.close(fd)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        assert chunk, "EOF"
        buf += chunk
    return buf


def test_a_full_descriptor_table_delays_fds_but_never_loses_or_reorders_one():
    """The receiver runs at its RLIMIT_NOFILE and frees fds only after stalling a while."""
    total = 1000
    a, b = socketpair()
    report_r, report_w = os.pipe()

    def receiver():
        a.close()
        os.close(report_r)
        b.setblocking(False)
        chan = FdChannel(b)
        held, indices = [], []
        stalls = 0
        headroom = 8
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        in_use = len(os.listdir("/proc/self/fd"))
        # Slots are allocated lowest-first, so the limit must sit above the highest fd.
        top = max(int(n) for n in os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(in_use, top + 1) + headroom, hard))
        deadline = time.monotonic() + 60
        while len(indices) + len(held) < total:
            assert time.monotonic() < deadline, (len(indices), len(held), stalls)
            frame = chan.receive()
            if frame is not None:
                held.extend(frame.fds)  # keep every received fd open
                continue
            if chan.stalled_until is not None:
                stalls += 1
                if stalls % 3 == 0:  # "after a while": let a few retries fail first
                    indices.extend(read_index(fd) for fd in held)
                    held = []
                select.select([], [], [], max(0.0, chan.stalled_until - time.monotonic()))
            else:
                select.select([chan], [], [], 5)
        indices.extend(read_index(fd) for fd in held)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        os.write(report_w, json.dumps({"indices": indices, "stalls": stalls}).encode())

    pid = run_in_child(receiver)
    b.close()
    os.close(report_w)
    a.setblocking(False)
    tx = FdChannel(a)
    for i in range(total):
        fd = pipe_carrying(i)
        tx.send(1, struct.pack("=I", i), [fd])
        os.close(fd)
    drain_output(tx, timeout=60)
    report = b""
    while True:
        chunk = os.read(report_r, 1 << 16)
        if not chunk:
            break
        report += chunk
    os.close(report_r)
    assert wait_exitcode(pid, timeout=60) == 0
    result = json.loads(report)
    assert result["indices"] == list(range(total))
    assert result["stalls"] > 0, "the receiver never hit its fd limit: the test proved nothing"
    tx.close()


def test_socketpair_ends_are_close_on_exec():
    a, b = socketpair()
    for s in (a, b):
        assert not s.get_inheritable()
        assert stat.S_ISSOCK(os.fstat(s.fileno()).st_mode)
    a.close()
    b.close()


def test_a_blocking_receiver_with_a_full_table_raises_fd_table_full_and_loses_nothing():
    from forkserver import FdTableFullError

    a, b = socketpair()
    tx = FdChannel(a)
    r = pipe_carrying(7)
    tx.send(1, b"one", [r])
    os.close(r)

    def receiver():
        a.close()
        chan = FdChannel(b, fd_wait=0.05)  # blocking socket
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        top = max(int(n) for n in os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (top + 20, hard))  # quick to fill
        filler = []
        try:
            while True:
                filler.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            pass  # the table is full now
        with pytest.raises(FdTableFullError, match="nothing was lost"):
            chan.receive()
        for fd in filler:
            os.close(fd)
        frame = chan.receive()  # the same frame, intact
        assert frame.payload == b"one" and read_index(frame.fds[0]) == 7

    pid = run_in_child(receiver)
    b.close()
    assert wait_exitcode(pid) == 0
    tx.close()
