"""Restart latency of a pre-forked server: worker SIGKILLed -> its replacement answering.

One worker serves a tiny WSGI app on a listening socket; a sample kills it
and times how long a request sent right after the kill takes to be answered
by the replacement (the request waits in the listener's backlog meanwhile).
The same listener setup, the same app, the same probe for both contenders:

* forkserver: a ``Supervisor`` keeping one worker forked from a template
  that holds the listener -- the exit is seen on a pidfd, the replacement
  is the template's ready spare clone;
* gunicorn's arbiter (``gunicorn --workers 1 --preload``, sync worker) on
  the same socket (``--bind fd://3``): SIGCHLD, ``waitpid``, ``os.fork``,
  worker boot.

Runs in ``python -m forkserver bench`` (scenario ``supervise``) and
``benchmarks/supervise.py``.  gunicorn is optional: ``pip install
'forkserver[bench]'``.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any, List, Optional

from . import _core as B

TITLE = "restart latency: worker SIGKILLed -> replacement answering"
FS, GUNICORN = "forkserver.Supervisor", "gunicorn arbiter (sync)"
MAX_SAMPLES = 40  # gunicorn takes tens of ms a sample; the table needs no more
_REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"


def app(environ: dict, start_response: Any) -> List[bytes]:
    """The app both servers run (WSGI): answers with the worker's pid."""
    body = str(os.getpid()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def serve(control: socket.socket, listener: socket.socket) -> None:
    """forkserver's worker: one request per connection, answered by ``app``."""
    from .._supervise._member_worker import heartbeat

    heartbeat()  # "up": the supervisor restarts a worker that came up at once
    listener.setblocking(True)
    while True:
        conn, _ = listener.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
            status: List[str] = []
            environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/"}
            body = b"".join(app(environ, lambda s, headers, status=status: status.append(s)))
            conn.sendall(
                b"HTTP/1.1 %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                % (status[0].encode(), len(body), body)
            )


def probe(port: int, timeout: float = B.TIMEOUT) -> int:
    """One request on a new connection; the pid that answered."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(_REQUEST)
        data = b""
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise ConnectionError(f"bad answer {data[:80]!r}")
    return int(body)


def restart_ms(port: int, kill: Any = os.kill) -> float:
    """Kill the worker answering on ``port``; ms until a new worker answers."""
    victim = probe(port)
    t0 = time.perf_counter()
    kill(victim, signal.SIGKILL)
    while True:
        try:
            pid = probe(port)
        except (ConnectionError, OSError):
            continue  # accepted by the victim as it died: ask again
        if pid != victim:
            return (time.perf_counter() - t0) * 1e3


class Ours:
    """A Supervisor of one worker forked from a template that holds the listener."""

    def __init__(self) -> None:
        from .._supervise._supervisor import Supervisor
        from .._template import Template

        listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = listener.getsockname()[1]
        self.tpl = Template().require(__name__).send_fh(listener)
        listener.close()
        self.sup = Supervisor((self.tpl, f"{__name__}:serve"), crash_loop=None, grace=1.0)
        self.sup.wait_state("running", timeout=B.TIMEOUT)

    def once(self) -> float:
        ms = restart_ms(self.port)
        # Untimed: until the supervisor has read the replacement's heartbeat
        # (it came up), so the next kill restarts at once.
        self.sup.wait_until(lambda s: s.members[0].up, timeout=B.TIMEOUT)
        return ms

    def close(self) -> None:
        self.sup.stop()
        self.tpl.close()


class Gunicorn:
    """gunicorn's arbiter with one sync worker, the app preloaded, on a socket we opened."""

    def __init__(self) -> None:
        listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = listener.getsockname()[1]
        fd = listener.fileno()
        os.set_inheritable(fd, True)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "--workers",
                "1",
                "--preload",
                "--bind",
                f"fd://{fd}",
                "--log-level",
                "critical",
                "--graceful-timeout",
                "1",
                f"{__name__}:app",
            ],
            pass_fds=[fd],
            env=env,
            stdin=subprocess.DEVNULL,
        )
        listener.close()
        deadline = time.monotonic() + B.TIMEOUT
        while True:  # our request waits in the backlog until gunicorn's first worker answers
            try:
                probe(self.port, timeout=1.0)
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    code = self.proc.returncode
                    raise RuntimeError(f"gunicorn did not start (exit status {code})") from None

    def once(self) -> float:
        return restart_ms(self.port)

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(B.TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def have_gunicorn() -> bool:
    return importlib.util.find_spec("gunicorn") is not None


def run(bench: Any, scenario: Any) -> Any:
    """Fill ``scenario`` (a ``_scenarios.Scenario``) with both contenders, interleaved."""
    rounds = max(3, min(bench.s.rounds, MAX_SAMPLES))
    ours: Optional[Ours] = None
    theirs: Optional[Gunicorn] = None
    try:
        ours = Ours()
        scenario.contenders.append(B.Contender(FS, ours.once))
        if have_gunicorn():
            theirs = Gunicorn()
            scenario.contenders.append(B.Contender(GUNICORN, theirs.once))
        else:
            scenario.contenders.append(
                B.Contender(
                    GUNICORN,
                    None,
                    note="gunicorn is not installed (pip install 'forkserver[bench]')",
                )
            )
        bench.measure(scenario.contenders, rounds=rounds)
    finally:
        for server in (theirs, ours):
            if server is not None:
                server.close()
    scenario.notes.append(
        "one worker, the same WSGI app and listener; a request sent right "
        "after the SIGKILL waits in the backlog for the replacement"
    )
    scenario.notes.append("gunicorn: --workers 1 --preload --bind fd://N, its sync worker")
    ours_ms, theirs_ms = scenario.median(FS), scenario.median(GUNICORN)
    scenario.goals.append(dict(
        text=f"restart latency: {FS} <= 0.5x gunicorn's arbiter",
        value=None if ours_ms is None or theirs_ms is None else ours_ms / theirs_ms,
        limit=0.5, unit="x"))
    return scenario


def supervise(bench: Any) -> Any:
    """The ``supervise`` scenario: restart latency vs gunicorn's arbiter, and its goal."""
    return run(bench, B.Scenario("supervise", TITLE, "ms"))
