"""Benchmark: file descriptors per second passed between two processes.

Measures how fast a sender process can pass fds to a receiver process over an
AF_UNIX stream socketpair, comparing two contenders in the same run:

* ``ours``   -- ``forkserver._fds.FdChannel`` (framed, with the sentinel
  reservation that keeps fds from being lost when the fd table is full);
* ``stdlib`` -- ``socket.send_fds`` / ``socket.recv_fds`` (unprotected), one
  1-byte message per batch.

Both send the same pipe fd repeatedly, ``--batch`` copies per message, until
``--fds`` fds have been sent.  The receiver (a forked child) receives and
closes every fd, counts them, and acks the count; a trial's time runs from
just before the first send to the sender receiving that ack.  After one
untimed warm-up trial each, the contenders are interleaved (A B A B ...) so
that drift in machine load affects both alike.

Run::

    python benchmarks/fdpass.py                 # 100000 fds, batch 64, 7 trials
    python benchmarks/fdpass.py --quick         # small sizes for CI (< 2 s)
    python benchmarks/fdpass.py --json out.json # also write the medians
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import struct
import sys
import time
import traceback
from typing import Callable, List, Optional

from forkserver._fds import FdChannel, socketpair

ACK = struct.Struct("=Q")  # the receiver's final fd count
GOAL_FDS_PER_S = 100_000
GOAL_RATIO = 0.5


# -- receivers (run in the forked child; must close every fd they get) ------------


def recv_ours(sock: socket.socket, n: int) -> int:
    ch = FdChannel(sock)
    sock.sendall(b"R")  # ready: the sender starts its clock after this
    count = 0
    while count < n:
        frame = ch.receive()  # blocking, but None if the fd table is full (it retries)
        if frame is None:
            continue
        for fd in frame.fds:
            os.close(fd)
        count += len(frame.fds)
    return count


def recv_stdlib(sock: socket.socket, n: int, batch: int) -> int:
    sock.sendall(b"R")
    count = 0
    while count < n:
        # One byte per recvmsg, so each call consumes exactly one message.
        msg, fds, flags, _ = socket.recv_fds(sock, 1, batch)
        for fd in fds:
            os.close(fd)
        if not msg:
            raise EOFError(f"sender closed the socket after {count} fds")
        if flags & socket.MSG_CTRUNC:
            raise RuntimeError("MSG_CTRUNC: fds were lost")
        count += len(fds)
    return count


# -- senders (run in the parent, between the clock readings) ----------------------


def send_ours(sock: socket.socket, batches: List[List[int]]) -> None:
    ch = FdChannel(sock)  # blocking socket: send() returns once all is sent
    for fds in batches:
        ch.send(1, b"", fds)
    assert not ch.pending_output


def send_stdlib(sock: socket.socket, batches: List[List[int]]) -> None:
    for fds in batches:
        socket.send_fds(sock, [b"F"], fds)


# -- one trial ---------------------------------------------------------------------


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    buf = b""
    while len(buf) < size:
        chunk = sock.recv(size - len(buf))
        if not chunk:
            raise EOFError("receiver closed the socket early")
        buf += chunk
    return buf


def trial(contender: str, n: int, batch: int, pipe_fd: int) -> float:
    """Pass ``n`` fds once with ``contender``; return the elapsed seconds."""
    batches = [[pipe_fd] * batch] * (n // batch)  # built before the clock starts
    if n % batch:
        batches.append([pipe_fd] * (n % batch))
    ours = contender == "ours"
    parent_sock, child_sock = socketpair()
    pid = os.fork()
    if pid == 0:  # receiver
        status = 1
        try:
            parent_sock.close()
            if ours:
                count = recv_ours(child_sock, n)
            else:
                count = recv_stdlib(child_sock, n, batch)
            child_sock.sendall(ACK.pack(count))
            status = 0 if count == n else 2
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(status)
    # sender
    child_sock.close()
    try:
        recv_exactly(parent_sock, 1)  # wait until the receiver is ready
        send: Callable[[socket.socket, List[List[int]]], None] = send_ours if ours else send_stdlib
        t0 = time.perf_counter()
        send(parent_sock, batches)
        (count,) = ACK.unpack(recv_exactly(parent_sock, ACK.size))
        elapsed = time.perf_counter() - t0
    finally:
        parent_sock.close()
        _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{contender} receiver failed (wait status {status})")
    assert count == n, f"{contender}: receiver closed {count} fds, expected {n}"
    return elapsed


# -- driver ------------------------------------------------------------------------


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fds", type=int, default=100_000, help="fds per trial (default 100000)")
    parser.add_argument("--batch", type=int, default=64, help="fds per message (default 64)")
    parser.add_argument("--trials", type=int, default=7, help="timed trials each (default 7)")
    parser.add_argument(
        "--quick", action="store_true", help="CI sizes: 20000 fds, 5 trials (overrides both)"
    )
    parser.add_argument("--json", metavar="PATH", help="write the medians and ratio as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.fds, args.trials = 20_000, 5
    if args.fds < 1 or args.trials < 1 or not 1 <= args.batch <= 253:
        parser.error("need --fds >= 1, --trials >= 1 and 1 <= --batch <= 253 (SCM_MAX_FD)")

    contenders = ("ours", "stdlib")
    rates = {c: [] for c in contenders}  # type: dict[str, List[float]]
    r, w = os.pipe()
    try:
        for c in contenders:  # warm-up, discarded
            trial(c, args.fds, args.batch, r)
        for _ in range(args.trials):  # interleaved: A B A B ...
            for c in contenders:
                rates[c].append(args.fds / trial(c, args.fds, args.batch, r))
    finally:
        os.close(r)
        os.close(w)

    med = {c: statistics.median(rates[c]) for c in contenders}
    ratio = med["ours"] / med["stdlib"]
    print(f"{args.fds} fds per trial, batch {args.batch}, {args.trials} trials (+1 warm-up each)")
    print(f"{'contender':<10} {'median fds/s':>14} {'min fds/s':>12} {'max fds/s':>12}")
    for c in contenders:
        print(f"{c:<10} {med[c]:>14,.0f} {min(rates[c]):>12,.0f} {max(rates[c]):>12,.0f}")
    print(f"ratio ours/stdlib: {ratio:.2f}x")
    met = med["ours"] >= GOAL_FDS_PER_S and ratio >= GOAL_RATIO
    print(f"goal: >= 100k fds/s and >= 0.5x stdlib -- {'met' if met else 'NOT met'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"ours_fds_per_s": med["ours"], "stdlib_fds_per_s": med["stdlib"], "ratio": ratio},
                f,
                indent=2,
            )
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
