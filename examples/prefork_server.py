"""A pre-forked TCP server: one listener, cloned into N warm workers by a template.

    python examples/prefork_server.py --workers 4 --requests 20

The parent opens the listening socket, sends it to a template that has the
server code preloaded, and forks the workers from that template: each worker
gets the listener (the same kind of object: a socket) and its number, and
accepts connections on it until its control socket reaches EOF.  The demo
then connects a few times, shows which worker answered, and shuts down.
"""
from __future__ import annotations

import argparse
import collections
import os
import select
import socket
import sys

import forkserver


def serve(control: socket.socket, listener: socket.socket, worker_no: int) -> None:
    """Worker: answer each connection with one line until the parent closes ``control``."""
    listener.setblocking(False)
    while True:
        ready, _, _ = select.select([listener, control], [], [])
        if control in ready:
            return  # EOF from the parent: shut down cleanly (exit status 0)
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            continue  # a sibling worker won the race for this connection
        with conn:
            conn.setblocking(True)
            conn.sendall(b"hello from worker %d (pid %d)\n" % (worker_no, os.getpid()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--requests", type=int, default=20, help="demo connections to make")
    args = parser.parse_args(argv)

    listener = socket.create_server(("127.0.0.1", args.port), backlog=128)
    port = listener.getsockname()[1]
    # This file's directory is on sys.path, which the template adopts: it can
    # import this module by name ("prefork_server"), not as __main__.
    with forkserver.Template().require("prefork_server").send_fh(listener) as template:
        listener.close()  # the template holds its own copy now
        workers = [template.fork().send_arg(i).run("prefork_server:serve") for i in range(args.workers)]
    print(f"listening on 127.0.0.1:{port} with {len(workers)} workers: "
          + " ".join(str(w.pid) for w in workers), flush=True)

    answered = collections.Counter()
    try:
        for _ in range(args.requests):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
                line = conn.makefile("rb").readline().decode().strip()
            answered[line.split("(pid ")[1].rstrip(")")] += 1
            print(line, flush=True)
    finally:
        for w in workers:
            w.control.close()  # EOF: the worker returns from serve()
        codes = [w.wait(timeout=10) for w in workers]
    print(f"answers per worker pid: {dict(answered)}; exit codes: {codes}")
    return 0 if all(code == 0 for code in codes) else 1


if __name__ == "__main__":
    sys.exit(main())
