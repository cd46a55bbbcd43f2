"""The zygote daemon's event loop: connections, runs, reaping (parent side).

One thread, one ``selectors`` loop over the listening socket, each client
connection, and a pidfd per run.  The daemon is the parent of every run
(its templates clone with ``CLONE_PARENT``), so it reaps each one and sends
the exact status -- exit code or signal -- to that run's client.

Security: a connection's peer is checked with ``SO_PEERCRED`` the moment it
is accepted; another uid's is logged and closed before a byte of it is read.
What is read is parsed as plain records (``_wire``), never unpickled.

Each run is its own process group in the daemon's session, so the group is
never orphaned (its parent, the daemon, is in the same session) and a
forwarded SIGTSTP really stops it.  A client that goes away (EOF: it
exited, or was SIGKILLed) takes its run with it -- SIGKILL to the run's
process group -- unless it asked for ``--detach``.
"""
from __future__ import annotations

import json
import logging
import os
import selectors
import signal
import socket
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

from .._errors import ForkserverError
from . import _child, _wire as W
from ._zygotes import Zygotes, changed

log = logging.getLogger("forkserver.zygote")

REQUEST_TIMEOUT = 10.0  # seconds a client has to send its whole request


class Conn:
    """One client connection: its request being read, then its run."""

    def __init__(self, sock: socket.socket, pid: int) -> None:
        self.sock = sock
        self.peer_pid = pid
        self.buf = bytearray()
        self.fds: List[int] = []
        self.deadline: Optional[float] = time.monotonic() + REQUEST_TIMEOUT
        self.run: Optional["Run"] = None
        self.open = True

    def send(self, tag: bytes, data: bytes = b"", fds: Sequence[int] = ()) -> None:
        """One reply record; a client that is gone or not reading is not waited for."""
        try:
            self.sock.setblocking(True)
            self.sock.settimeout(1.0)
            W.send_fds(self.sock, W.record(tag, data), list(fds))
        except OSError as exc:
            log.debug("client pid %d: reply not sent (%s)", self.peer_pid, exc)
        finally:
            self.sock.setblocking(False)

    def close_fds(self) -> None:
        fds, self.fds = self.fds, []
        for fd in fds:
            os.close(fd)


class Run:
    """A started run: its Child, a pidfd for the loop, the connection it reports to."""

    def __init__(self, child: Any, pidfd: int, conn: Conn, detach: bool, argv0: str) -> None:
        self.child = child
        self.pid = child.pid
        self.pidfd = pidfd
        self.conn: Optional[Conn] = conn
        self.detach = detach
        self.argv0 = argv0
        self.started = time.monotonic()
        self.reaped = False

    def signal_group(self, signo: int) -> None:
        """``signo`` to the run's process group, while it is unreaped (the pgid cannot be reused)."""
        if self.reaped:
            return
        try:
            os.killpg(self.pid, signo)
        except ProcessLookupError:
            self.child.send_signal(signo)  # not a group leader yet: the process itself
        except PermissionError:
            pass


class Daemon:
    """Serve runs on ``listener`` until stopped, or idle for ``idle_timeout`` seconds."""

    def __init__(self, listener: socket.socket, path: bytes, inode: int, ident: bytes,
                 preload: List[str], idle_timeout: float, zygotes: Zygotes,
                 own_files: Dict[str, Any], log_path: str) -> None:
        self.listener = listener
        self.path = path
        self.inode = inode  # of the socket file we bound: removed at exit only if still ours
        self.ident = ident
        self.preload = preload
        self.idle_timeout = idle_timeout
        self.zygotes = zygotes
        self.own_files = own_files
        self.log_path = log_path
        self.sel = selectors.DefaultSelector()
        self.conns: List[Conn] = []
        self.runs: Dict[int, Run] = {}
        self.retired = False
        self.started = time.time()
        self.last_active = time.monotonic()
        self.runs_started = 0
        listener.setblocking(False)
        self.sel.register(listener, selectors.EVENT_READ, self._accept)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, self._on_signal)

    # -- the loop ------------------------------------------------------------------

    def serve_forever(self) -> None:
        old = signal.set_wakeup_fd(self._wake_w.fileno())
        handlers = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT,
                                                                    signal.SIGHUP)}
        try:
            while not (self.retired and not self.runs and not self.conns):
                # Events first, deadlines after: a request that arrived while
                # a zygote was being built is read before its deadline is checked.
                for key, _ in self.sel.select(self._timeout()):
                    key.data(key.fileobj)
                if self._expire():
                    break
        finally:
            signal.set_wakeup_fd(old)
            for s, h in handlers.items():
                signal.signal(s, h)
            self.close()

    def _timeout(self) -> Optional[float]:
        now = time.monotonic()
        deadlines = [c.deadline for c in self.conns if c.deadline is not None]
        if not self.runs and not self.conns and self.idle_timeout > 0 and not self.retired:
            deadlines.append(self.last_active + self.idle_timeout)
        return None if not deadlines else max(0.0, min(deadlines) - now)

    def _expire(self) -> bool:
        """Drop requests past their deadline; True when it is time to stop (idle)."""
        now = time.monotonic()
        for conn in [c for c in self.conns if c.deadline is not None and c.deadline <= now]:
            log.warning("client pid %d sent no complete request in %g s: closed", conn.peer_pid,
                        REQUEST_TIMEOUT)
            self._drop(conn)
        if (not self.runs and not self.conns and self.idle_timeout > 0
                and now - self.last_active >= self.idle_timeout):
            log.info("idle for %g s: stopping", self.idle_timeout)
            return True
        return False

    def _on_signal(self, sock: socket.socket) -> None:
        try:
            got = sock.recv(64)
        except BlockingIOError:
            return
        for signo in got:
            if signo in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                log.info("signal %d: stopping (runs in progress finish first)", signo)
                self.retire()

    # -- connections -----------------------------------------------------------------

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: the client waits in the backlog
                log.error("accept failed: %s", exc)
                return
            pid, uid, _ = W.peer_credentials(sock)
            if uid != os.geteuid():
                log.warning("refused a connection from uid %d (pid %d): not ours; nothing read",
                            uid, pid)
                sock.close()
                continue
            sock.setblocking(False)
            conn = Conn(sock, pid)
            self.conns.append(conn)
            self.sel.register(sock, selectors.EVENT_READ, lambda s, c=conn: self._readable(c))
            self.last_active = time.monotonic()

    def _readable(self, conn: Conn) -> None:
        try:
            data = W.recv_some(conn.sock, 1 << 16, conn.fds)
        except BlockingIOError:
            return
        except (OSError, W.Unusable) as exc:
            log.warning("client pid %d: %s", conn.peer_pid, exc)
            data = b""
        if conn.run is not None:  # after the request: signals to forward, or EOF
            self._after_request(conn, data)
            return
        if not data:
            self._drop(conn)  # gone before it finished its request
            return
        conn.buf += data
        if conn.buf[:len(W.MAGIC)] != W.MAGIC[:len(conn.buf)] or len(conn.buf) > W.MAX_REQUEST:
            self._refuse(conn, "not a zygote request of this protocol version")
            return
        records, used = W.parse_records(conn.buf, len(W.MAGIC))
        end = next((i for i, (tag, _) in enumerate(records) if tag == W.END), None)
        if end is None:
            return  # more to come
        del conn.buf[:used]
        conn.deadline = None
        try:
            self._request(conn, records[:end])
        except Exception:
            log.exception("client pid %d: request failed", conn.peer_pid)
            conn.send(W.FALLBACK, b"the zygote failed on this request (see its log)")
            self._drop(conn)
            return
        if conn.run is not None:  # signals the client sent right behind its request
            self._signals(conn.run, records[end + 1:])

    def _refuse(self, conn: Conn, why: str) -> None:
        log.warning("client pid %d: %s", conn.peer_pid, why)
        conn.send(W.REPLACE, why.encode())
        self._drop(conn)

    def _drop(self, conn: Conn) -> None:
        if not conn.open:
            return
        conn.open = False
        conn.close_fds()
        self.sel.unregister(conn.sock)
        conn.sock.close()
        self.conns.remove(conn)
        self.last_active = time.monotonic()

    def _after_request(self, conn: Conn, data: bytes) -> None:
        run = conn.run
        assert run is not None
        conn.close_fds()  # nothing is sent with signals
        if not data:  # the client is gone
            self._drop(conn)
            run.conn = None
            if not run.detach and not run.reaped:
                log.info("run %d: its client went away: SIGKILL to its process group", run.pid)
                run.signal_group(signal.SIGKILL)
            return
        conn.buf += data
        records, used = W.parse_records(conn.buf)
        del conn.buf[:used]
        self._signals(run, records)

    @staticmethod
    def _signals(run: Run, records: List[tuple]) -> None:
        for tag, value in records:
            if tag == W.SIGNAL and value.isdigit():
                run.signal_group(int(value))

    # -- requests --------------------------------------------------------------------

    def _request(self, conn: Conn, records: List[tuple]) -> None:
        fields: Dict[bytes, Any] = {}
        for tag, value in records:
            if tag in (W.ARG, W.ENV):
                fields.setdefault(tag, []).append(value)
            else:
                fields[tag] = value
        op = fields.get(W.OP)
        if op == b"status":
            conn.send(W.INFO, json.dumps(self.info()).encode())
            self._drop(conn)
        elif op == b"stop":
            conn.send(W.STOPPING, json.dumps(self.info()).encode())
            self._drop(conn)
            self.retire()
        elif op == b"run":
            self._run(conn, fields)
        else:
            self._refuse(conn, f"unknown request {op!r}")

    def _run(self, conn: Conn, fields: Dict[bytes, Any]) -> None:
        if fields.get(W.KEY) != self.ident:
            self._replace(conn, "it serves another interpreter, forkserver version or "
                          "start-up environment (PYTHON*, LC_*, LANG, thread limits)")
            return
        path = changed(self.own_files)
        if path is not None:
            self._replace(conn, f"forkserver changed on disk ({path})")
            return
        wanted = W.split_preload(fields.get(W.PRELOAD, b"").decode())
        missing = [m for m in wanted if m not in self.preload]
        if missing:
            self._fallback(conn, f"the zygote at {W.fsdecode(self.path)} does not preload "
                           f"{','.join(missing)}")
            return
        spec = self._spec(fields, len(conn.fds))
        if spec is None:
            self._refuse(conn, "malformed run request")
            return
        env = spec.pop("env_str")  # for a template built now: its imports see the run's environment
        zygote, why = self.zygotes.for_run(spec["path0"], spec["cwd"], env)
        if zygote is None:
            self._fallback(conn, why)
            return
        try:
            try:
                child = zygote.start(spec, conn.fds)
            except ForkserverError as exc:  # its template died, or cannot fork (threads)
                log.warning("zygote %d: %s; building a new one", zygote.generation, exc)
                zygote = self.zygotes.rebuild(zygote, env)
                if zygote.error is not None:
                    self._fallback(conn, f"the zygote failed ({zygote.error})")
                    return
                child = zygote.start(spec, conn.fds)
        except ForkserverError as exc:
            self._fallback(conn, f"the zygote cannot fork this run ({exc})")
            return
        finally:
            conn.close_fds()  # the run has its own copies: ours must not hold a pipe open
        self._started(conn, child, spec, W.DETACH in fields)

    def _started(self, conn: Conn, child: Any, spec: Dict[str, Any], detach: bool) -> None:
        try:
            os.setpgid(child.pid, child.pid)  # as the run does: whichever comes first
        except OSError:
            pass
        child.close()  # our end of its control socket: the run closed its own
        pidfd = os.pidfd_open(child.pid)
        run = Run(child, pidfd, conn, detach, spec["target"])
        conn.run = run
        self.runs[pidfd] = run
        self.runs_started += 1
        self.sel.register(pidfd, selectors.EVENT_READ, lambda fd, r=run: self._exited(r))
        conn.send(W.STARTED, b"%d" % child.pid, [pidfd])
        log.debug("run %d started for client pid %d: %s", child.pid, conn.peer_pid, spec["target"])

    def _exited(self, run: Run) -> None:
        code = run.child.poll()
        if code is None:
            return
        run.reaped = True
        self.sel.unregister(run.pidfd)
        os.close(run.pidfd)
        del self.runs[run.pidfd]
        status = b"s%d" % -code if code < 0 else b"c%d" % code
        log.info("run %d (%s) ended: %s after %.2f ms", run.pid, run.argv0[:60],
                 status.decode(), (time.monotonic() - run.started) * 1e3)
        if run.conn is not None:
            run.conn.send(W.EXITED, status)
            self._drop(run.conn)
        self.last_active = time.monotonic()

    def _spec(self, fields: Dict[bytes, Any], nfds: int) -> Optional[Dict[str, Any]]:
        """The run's description for ``_child.main``, from the request's fields."""
        try:
            mode = fields[W.MODE].decode()
            target = W.fsdecode(fields[W.TARGET])
            stdio = [int(c) for c in fields[W.STDIO].decode()]
            env = dict(item.split(b"=", 1) for item in fields.get(W.ENV, []))
            cwd = W.fsdecode(fields[W.CWD])
            umask = int(fields[W.UMASK], 8)
            ignored = [int(n) for n in fields[W.IGNORED].split(b",") if n]
        except (KeyError, ValueError, UnicodeDecodeError):
            return None
        if mode not in ("path", "module", "code") or nfds != len(stdio) + 1 or not set(stdio) <= {0, 1, 2}:
            return None
        # The templates run this interpreter in this start-up environment: same flags.
        safe_path = bool(getattr(sys.flags, "safe_path", False))
        return {
            "mode": mode, "target": target, "args": [W.fsdecode(a) for a in fields.get(W.ARG, [])],
            "env": env, "env_str": {W.fsdecode(k): W.fsdecode(v) for k, v in env.items()},
            "cwd": cwd, "umask": umask, "ignored": ignored, "stdio": stdio,
            "path0": _child.path0(mode, target, cwd, safe_path),
        }

    def _fallback(self, conn: Conn, why: str) -> None:
        log.info("client pid %d runs plain python: %s", conn.peer_pid, why)
        conn.send(W.FALLBACK, why.encode())
        self._drop(conn)

    def _replace(self, conn: Conn, why: str) -> None:
        log.info("retiring for client pid %d: %s", conn.peer_pid, why)
        self.retire()  # the path is free for the zygote the client starts next
        conn.send(W.REPLACE, why.encode())
        self._drop(conn)

    # -- status and shutdown ------------------------------------------------------------

    def info(self) -> Dict[str, Any]:
        return {
            "pid": os.getpid(), "socket": W.fsdecode(self.path), "log": self.log_path,
            "preload": self.preload, "python": sys.executable,
            "version": W.VERSION, "started": self.started,
            "idle_timeout": self.idle_timeout, "runs_started": self.runs_started,
            "running": [r.pid for r in self.runs.values()], "retired": self.retired,
            "zygotes": self.zygotes.info(),
        }

    def retire(self) -> None:
        """Accept no more runs: free the socket path; exit once the runs in progress end."""
        if self.retired:
            return
        self.retired = True
        self.sel.unregister(self.listener)
        self.listener.close()
        unlink_if_ours(self.path, self.inode)

    def close(self) -> None:
        if not self.retired:
            self.retire()
        for conn in list(self.conns):
            self._drop(conn)
        for run in list(self.runs.values()):  # only on an error: normally none are left
            os.close(run.pidfd)
        self.runs.clear()
        self.zygotes.close()
        self.sel.close()
        self._wake_r.close()
        self._wake_w.close()


def unlink_if_ours(path: bytes, inode: int) -> None:
    """Remove the socket at ``path`` if it is still the one we bound (not a successor's)."""
    addr, fd = W.address(path)
    try:
        if os.stat(addr).st_ino == inode:
            os.unlink(addr)
    except OSError:
        pass
    finally:
        if fd is not None:
            os.close(fd)
