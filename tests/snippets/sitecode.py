"""A stand-in for docs/supervise.md and README.md: a pre-forked worker, a line a connection."""

import os
import select

from forkserver.worker import heartbeat


def serve(control, listener):
    """Accept on ``listener``; heartbeat once a second; exit when the supervisor is gone."""
    listener.setblocking(False)
    while True:
        heartbeat()  # "alive" -- and, the first time, "up"
        ready, _, _ = select.select([listener, control], [], [], 1.0)
        if control in ready and not control.recv(1):
            return  # EOF: the supervisor's process is gone
        if listener in ready:
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                continue  # a sibling worker took it
            with conn:
                conn.sendall(b"hello from %d\n" % os.getpid())
