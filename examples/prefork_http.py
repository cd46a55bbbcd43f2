"""A pre-forked HTTP/1.1 server, supervised: one listener, N workers forked from a template.

    python examples/prefork_http.py --workers 4 --port 8000
    curl -s localhost:8000/hello        # {"pid": 12345, "code": "5f3c0a1e", "path": "/hello"}
    kill -HUP <server pid>               # rolling reload onto this file's current code
    kill -TERM <server pid>              # graceful stop

The parent opens the listening socket (no SO_REUSEPORT: every worker
accepts on the same socket, inherited from the template, so the kernel's
backlog outlives any worker) and keeps it.  A ``forkserver.Supervisor``
keeps ``--workers`` forks of a template that imported this module running:
a killed worker is replaced from the template's ready spare in about a
millisecond.  ``SIGHUP`` builds a new template -- a fresh import of this file,
so edited code is picked up -- and reloads onto it one worker at a time:
a new worker runs before an old one is asked to stop.  ``SIGTERM`` stops
every worker gracefully and exits 0.

Each worker serves many keep-alive connections in one thread (a selector
loop) and calls a small WSGI app.  A worker asked to stop (SIGTERM) accepts
no more connections, finishes every request it has read, closes its idle
connections and exits.  What a client sees: a request whose response was
sent is never lost; an idle keep-alive connection may be closed under it
(a stopping or killed worker), in which case the request got no response
byte and an HTTP client retries it on a new connection, as RFC 9110 §9.2.2
allows for idempotent methods; a worker SIGKILLed *while* handling a
request loses that one exchange the same way.

Events go to stdout one per line, for scripts: ``listening on H:P``,
``member PID generation N``, ``exited PID``, ``reloaded generation N``
(or ``reload failed: ...``), ``stopped``.

This module is imported by the templates, so its top level stays lean:
no threads (a template must stay single-threaded to fork), no http.server
(it imports threading).
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import signal
import socket
import sys
import zlib

with open(__file__, "rb") as _f:
    CODE = "%08x" % zlib.crc32(_f.read())  # the version of the code this process imported
del _f

MAX_HEADER = 64 * 1024


def app(environ, start_response):
    """The application (WSGI): who answered, with which code."""
    body = json.dumps({"pid": os.getpid(), "code": CODE, "path": environ["PATH_INFO"]}).encode()
    start_response(
        "200 OK",
        [
            ("Content-Type", "application/json"),
            ("X-Worker-Pid", str(os.getpid())),
            ("X-Code", CODE),
        ],
    )
    return [body]


# -- the worker: a small HTTP/1.1 server on the inherited listener ------------------------------


class Connection:
    """One client connection: bytes in, whole responses out."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbuf = b""
        self.outbuf = b""
        self.close_after = False

    def requests(self):
        """Complete requests in the input: (method, path, version, headers, body)."""
        while True:
            end = self.inbuf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.inbuf) > MAX_HEADER:
                    raise ValueError("header too long")
                return
            head = self.inbuf[:end].decode("latin-1").split("\r\n")
            method, path, version = head[0].split(" ", 2)
            headers = {}
            for line in head[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
            if len(self.inbuf) < end + 4 + length:
                return
            body = self.inbuf[end + 4 : end + 4 + length]
            self.inbuf = self.inbuf[end + 4 + length :]
            yield method, path, version, headers, body

    def respond(self, method, path, version, headers, body, stopping: bool) -> None:
        keep = (
            headers.get("connection", "").lower() != "close"
            and version == "HTTP/1.1"
            and not stopping
        )
        environ = {
            "REQUEST_METHOD": method,
            "PATH_INFO": path.split("?")[0],
            "QUERY_STRING": path.partition("?")[2],
            "SERVER_PROTOCOL": version,
            "wsgi.input": body,
        }
        status_headers = []
        chunks = app(environ, lambda status, hdrs: status_headers.append((status, hdrs)))
        payload = b"".join(chunks)
        status, hdrs = status_headers[0]
        lines = [f"{version} {status}"] + [f"{k}: {v}" for k, v in hdrs]
        lines += [
            f"Content-Length: {len(payload)}",
            "Connection: " + ("keep-alive" if keep else "close"),
        ]
        # One buffer, one send: a worker killed now leaves a client with a
        # whole response or none, never half of one.
        self.outbuf += ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload
        self.close_after = self.close_after or not keep


class Worker:
    """One worker process: a selector loop over the listener, its connections, signals, control."""

    def __init__(self, control: socket.socket, listener: socket.socket) -> None:
        from forkserver.worker import heartbeat  # the supervisor's stale_timeout watches these

        self.heartbeat = heartbeat
        self.control, self.listener = control, listener
        self.sel = selectors.DefaultSelector()
        self.conns = {}
        self.stopping = False
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)  # SIGTERM wakes the select below
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent stops us gracefully
        listener.setblocking(False)
        self.sel.register(listener, selectors.EVENT_READ, "accept")
        self.sel.register(control, selectors.EVENT_READ, "control")
        self.sel.register(wake_r, selectors.EVENT_READ, "wake")

    def _on_term(self, signum, frame) -> None:
        self.stopping = True

    def run(self) -> None:
        while not (self.stopping and not self.conns):
            for key, events in self.sel.select(timeout=1.0):
                what = key.data
                if what == "accept":
                    self._accept()
                elif what == "control":
                    if not self.control.recv(1):  # the supervisor is gone: stop too
                        self.stopping = True
                elif what == "wake":
                    os.read(key.fd, 512)
                else:
                    self._serve(what, events)
            if self.stopping:
                self._wind_down()
            self.heartbeat()

    def _accept(self) -> None:
        for _ in range(16):
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return  # a sibling worker took it
            sock.setblocking(False)
            conn = self.conns[sock] = Connection(sock)
            self.sel.register(sock, selectors.EVENT_READ, conn)

    def _serve(self, conn: Connection, events: int) -> None:
        try:
            if events & selectors.EVENT_READ:
                data = conn.sock.recv(65536)
                if not data:
                    return self._close(conn)
                conn.inbuf += data
                for request in conn.requests():
                    conn.respond(*request, stopping=self.stopping)
            if conn.outbuf:
                sent = conn.sock.send(conn.outbuf)
                conn.outbuf = conn.outbuf[sent:]
        except BlockingIOError:
            pass
        except (OSError, ValueError):
            return self._close(conn)
        if not conn.outbuf and conn.close_after:
            return self._close(conn)
        self.sel.modify(
            conn.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.outbuf else 0), conn
        )

    def _wind_down(self) -> None:
        """Stopping: no more accepts; answer what was read, close idle connections."""
        if self.listener is not None:
            self.sel.unregister(self.listener)
            self.listener.close()  # our copy only: the siblings keep accepting
            self.listener = None
        for conn in list(self.conns.values()):
            if not conn.inbuf and not conn.outbuf:
                self._serve(conn, selectors.EVENT_READ)  # a request that just arrived is answered
                if conn.sock in self.conns and not conn.inbuf and not conn.outbuf:
                    self._close(conn)

    def _close(self, conn: Connection) -> None:
        self.sel.unregister(conn.sock)
        del self.conns[conn.sock]
        conn.sock.close()


def serve(control: socket.socket, listener: socket.socket) -> None:
    """A worker's target: serve until SIGTERM (graceful) or the supervisor's end closes."""
    Worker(control, listener).run()


# -- the parent: listener, supervisor, signals --------------------------------------------------


def main(argv=None) -> int:
    import queue

    import forkserver

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--grace", type=float, default=10.0, help="seconds a stopping worker gets")
    parser.add_argument(
        "--crash-loop",
        default="50,10",
        metavar="N,T",
        help="a slot gives up after N worker deaths within T seconds; 'none': never "
        "(for chaos tests that kill workers on purpose); default %(default)s",
    )
    args = parser.parse_args(argv)
    crash_loop = (
        None if args.crash_loop == "none" else tuple(float(x) for x in args.crash_loop.split(","))
    )

    listener = socket.create_server((args.host, args.port), backlog=1024)
    module = os.path.splitext(os.path.basename(__file__))[0]  # this file, imported by name

    def new_template() -> "forkserver.Template":
        return forkserver.Template().require(module).send_fh(listener)

    say = lambda text: print(text, flush=True)  # noqa: E731
    events: "queue.SimpleQueue[str]" = queue.SimpleQueue()
    for signum, what in (
        (signal.SIGHUP, "reload"),
        (signal.SIGTERM, "stop"),
        (signal.SIGINT, "stop"),
    ):
        signal.signal(signum, lambda *_, what=what: events.put(what))  # put() is signal-safe
    template = new_template()
    sup = forkserver.Supervisor(
        (template, f"{module}:serve"),
        size=args.workers,
        stale_timeout=10,
        grace=args.grace,
        # Workers heartbeat as soon as they run, so a killed one comes back at
        # once (the backoff is for workers that fail to boot).
        crash_loop=crash_loop,
        on_start=lambda m: say(f"member {m.pid} generation {m.generation}"),
        on_exit=lambda m: say(f"exited {m.pid}"),
    )
    sup.wait_state("running", timeout=60)
    host, port = listener.getsockname()[:2]
    say(f"listening on {host}:{port}")
    while True:
        what = events.get()
        if what == "reload":
            try:
                new = new_template()
                status = sup.reload(new)
            except Exception as exc:  # bad new code: keep serving the old one
                say(f"reload failed: {type(exc).__name__}: {exc}")
                continue
            template.close()
            template = new
            say(f"reloaded generation {status.generation}")
        else:
            sup.stop()
            template.close()
            listener.close()
            say("stopped")
            return 0


if __name__ == "__main__":
    sys.exit(main())
