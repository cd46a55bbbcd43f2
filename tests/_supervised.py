"""Targets for supervised workers in the tests (imported in templates and workers: no threading)."""

from __future__ import annotations

import os
import select
import signal
import socket
import sys
import time

from forkserver import worker


def wait_for_eof(control: socket.socket, *args: object) -> None:
    """Idle until the supervisor's end of the control socket closes (or a signal ends us)."""
    control.recv(1)


def ready_then_wait(control: socket.socket, *args: object) -> None:
    """Send one heartbeat (so the supervisor knows we run our code), then idle until EOF."""
    worker.heartbeat()
    control.recv(1)


def exit_now(control: socket.socket, code: int = 0, *args: object) -> None:
    sys.exit(code)


def ignore_sigterm(control: socket.socket, *args: object) -> None:
    """Idle, deaf to SIGTERM (a heartbeat says so): only SIGKILL ends it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    worker.heartbeat()
    control.recv(1)


def pause_forever(control: socket.socket, *args: object) -> None:
    """Idle until a signal ends us; EOF on the control socket does not."""
    while True:
        signal.pause()


def deaf(control: socket.socket, *args: object) -> None:
    """Deaf to SIGTERM and to EOF on its control socket (a heartbeat says so): SIGKILL only."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    worker.heartbeat()
    while True:
        signal.pause()


def beat(control: socket.socket, *args: object) -> None:
    """Send a heartbeat every 60 ms, forever."""
    while True:
        worker.heartbeat()
        time.sleep(0.06)


def allocate(control: socket.socket, mib: int = 300, *args: object) -> None:
    """Touch ``mib`` MiB, then idle (the memory stays resident)."""
    ballast = b"x" * (mib << 20)  # bytes * n writes every page
    control.recv(1)
    del ballast


def allocate_then_tell(control: socket.socket, mib: int, told) -> None:
    """Touch ``mib`` MiB, write a byte to ``told`` (a pipe), then idle."""
    ballast = b"x" * (mib << 20)
    told.write(b"!")
    told.flush()
    control.recv(1)
    del ballast


def busy(control: socket.socket, *args: object) -> None:
    """Spin on the CPU until the control socket reaches EOF."""
    control.setblocking(False)
    n = 0
    while True:
        n += 1
        if n % 100000 == 0:
            try:
                if control.recv(1) == b"":
                    return
            except BlockingIOError:
                pass


def heartbeat_outside_a_supervisor(control: socket.socket) -> None:
    """Exit 3 if heartbeat() without a socket raises RuntimeError, 4 if heartbeat(control) works."""
    try:
        worker.heartbeat()
    except RuntimeError:
        worker.heartbeat(control)
        sys.exit(4)
    sys.exit(3)


def heartbeat_after_eof(control: socket.socket) -> None:
    """Wait for EOF, then exit 5 if heartbeat() raises BrokenChannelError."""
    from forkserver import BrokenChannelError

    select.select([control], [], [], 30)
    try:
        worker.heartbeat(control)
        worker.heartbeat(control)  # the first may still be accepted by a half-closed peer
    except BrokenChannelError:
        sys.exit(5)
    sys.exit(6)


def write_modules(control: socket.socket, path: str) -> None:
    """Write the names of the loaded modules to ``path`` (what this worker imported), then exit."""
    with open(path, "w") as f:
        f.write(" ".join(sorted(sys.modules)))


def pid_file(control: socket.socket, path: str) -> None:
    """Append our pid to ``path``, then idle."""
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    control.recv(1)
