"""A stand-in pre-forked server: each worker answers every connection with one line."""
import os
import select


def serve(control, listener, worker_no=0):
    """Accept on ``listener`` until the parent closes ``control`` (then exit 0)."""
    listener.setblocking(False)
    while True:
        ready, _, _ = select.select([listener, control], [], [])
        if control in ready:
            return  # EOF: the parent wants us gone
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            continue  # a sibling worker took this connection
        with conn:
            conn.setblocking(True)
            conn.sendall(b"hello from worker %d (pid %d)\n" % (worker_no, os.getpid()))
