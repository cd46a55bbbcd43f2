"""``forkserver serve``: become the zygote daemon, or start one in the background (parent side).

Binding is done under an ``flock`` on ``<name>.lock`` beside the socket, so
two starters never race: the one that holds the lock probes the path (a
zygote that answers is left alone; a socket nobody listens on is a stale
one, removed), binds with umask 0177 (the socket file is 0600, in a 0700
directory), listens, and only then lets go of the lock.  A client that
starts a daemon takes the lock first and hands it to the daemon
(``--lock-fd``); the daemon says "ok" on ``--ready-fd`` once it listens.
Preloading happens after that: clients queue in the listen backlog.
"""
from __future__ import annotations

import argparse
import fcntl
import logging
import logging.handlers
import os
import posix
import socket
import stat
import sys
from typing import Dict, List, Optional, Tuple

from . import _wire as W
from ._zygotes import Zygotes, _stat

log = logging.getLogger("forkserver.zygote")

DEFAULT_IDLE_TIMEOUT = 900.0  # seconds


def daemon_main(argv: List[str]) -> int:
    """Entry of a daemon started by a client (``_client.start_daemon``); returns its exit status."""
    parser = argparse.ArgumentParser(prog="forkserver zygote daemon")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--preload", default="")
    parser.add_argument("--idle-timeout", type=float, default=DEFAULT_IDLE_TIMEOUT)
    parser.add_argument("--lock-fd", type=int)
    parser.add_argument("--ready-fd", type=int)
    args = parser.parse_args(argv)
    keep = {fd for fd in (args.lock_fd, args.ready_fd) if fd is not None}
    close_inherited(keep)
    return serve(W.split_preload(args.preload), W.fsencode(args.socket), args.idle_timeout,
                 base_path=list(sys.path), lock_fd=args.lock_fd, ready_fd=args.ready_fd)


def serve(preload: List[str], path: Optional[bytes], idle_timeout: float, base_path: List[str],
          lock_fd: Optional[int] = None, ready_fd: Optional[int] = None,
          to_stderr: bool = False) -> int:
    """Be the zygote daemon for ``preload`` on ``path`` (None: the default one); exit status.

    ``base_path``: ``sys.path`` without this process's own ``sys.path[0]``.
    """
    from ._daemon import Daemon

    os.umask(0o077)  # the log and lock files: ours only
    ident = W.identity(posix.environ)
    cwd = os.getcwd()
    try:
        if path is None:
            path = W.runtime_dir() + b"/" + W.zygote_name(ident, preload) + b".sock"
        listener, inode = bind(path, lock_fd)
    except W.Unusable as exc:
        _say(ready_fd, b"error: " + W.fsencode(str(exc)))
        print(f"forkserver serve: {exc}", file=sys.stderr)
        return 1
    log_path = W.fsdecode(path[:-5] if path.endswith(b".sock") else path) + ".log"
    _logging(log_path, to_stderr)
    log.info("listening on %s (pid %d, python %s, preload %s, idle timeout %g s)",
             W.fsdecode(path), os.getpid(), sys.executable, ",".join(preload) or "(nothing)",
             idle_timeout)
    _say(ready_fd, b"ok %d" % os.getpid())
    os.chdir("/")
    zygotes = Zygotes(preload, base_path)
    daemon = None
    try:
        # The first zygote now (runs queue meanwhile), for runs from where we started.
        zygotes.for_run(cwd, cwd, dict(os.environ))
        daemon = Daemon(listener, path, inode, ident, preload, idle_timeout, zygotes,
                        own_files(), log_path)
        daemon.serve_forever()
    except BaseException:
        log.exception("the daemon failed")
        raise
    finally:
        if daemon is None:
            zygotes.close()
            from ._daemon import unlink_if_ours

            unlink_if_ours(path, inode)
            listener.close()
        log.info("stopped")
    return 0


def bind(path: bytes, lock_fd: Optional[int]) -> Tuple[socket.socket, int]:
    """Listen on ``path``, under the lock (taken here unless ``lock_fd`` holds it)."""
    directory = path.rpartition(b"/")[0] or b"."
    if not os.path.isdir(directory):
        raise W.Unusable(f"no directory {W.fsdecode(directory)} for the socket")
    stem = path[:-5] if path.endswith(b".sock") else path
    if lock_fd is None:
        lock_fd = os.open(stem + b".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
    try:
        _clear(path)
        addr, dir_fd = W.address(path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            listener.bind(addr)
            listener.listen(128)
            inode = os.stat(addr).st_ino
        except OSError as exc:
            listener.close()
            raise W.Unusable(f"cannot listen on {W.fsdecode(path)}: {exc}") from None
        finally:
            os.umask(old)
            if dir_fd is not None:
                os.close(dir_fd)
    finally:
        os.close(lock_fd)  # the socket is in place (or not): other starters may look
    return listener, inode


def _clear(path: bytes) -> None:
    """Make way at ``path``: refuse if a zygote answers there, remove a stale socket."""
    try:
        sock = W.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        pass
    else:
        try:
            pid = W.check_server(sock, path)
        finally:
            sock.close()
        raise W.Unusable(f"a zygote (pid {pid}) already listens on {W.fsdecode(path)}")
    addr, dir_fd = W.address(path)
    try:
        st = os.lstat(addr)
    except FileNotFoundError:
        return
    finally:
        if dir_fd is not None:
            os.close(dir_fd)
    if not stat.S_ISSOCK(st.st_mode):
        raise W.Unusable(f"{W.fsdecode(path)} exists and is not a socket; remove it or choose "
                         "another --socket")
    addr, dir_fd = W.address(path)
    try:
        os.unlink(addr)  # nobody listens on it: a zygote that was killed left it
    finally:
        if dir_fd is not None:
            os.close(dir_fd)


def own_files() -> Dict[str, object]:
    """forkserver's own sources and this interpreter's build of its C module, watched:
    an upgrade or edit replaces this daemon (another Python's build does not)."""
    from importlib.machinery import EXTENSION_SUFFIXES

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    suffixes = (".py", *EXTENSION_SUFFIXES)
    files: Dict[str, object] = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            if name.endswith(suffixes):
                full = os.path.join(dirpath, name)
                files[full] = _stat(full)
    return files


def close_inherited(keep: set) -> None:
    """Close every fd but 0-2 and ``keep``: a daemon holds nothing of its starter's."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass  # listdir's own fd


def _say(fd: Optional[int], what: bytes) -> None:
    if fd is None:
        return
    try:
        os.write(fd, what + b"\n")
    except OSError:
        pass
    os.close(fd)


def _logging(path: str, to_stderr: bool) -> None:
    log.setLevel(logging.INFO)
    fmt = logging.Formatter("%(asctime)s pid %(process)d %(levelname)s %(message)s")
    # One run is one line: bounded at 1 MiB and one older file.
    handler: logging.Handler = logging.handlers.RotatingFileHandler(path, maxBytes=1 << 20,
                                                                     backupCount=1)
    handler.setFormatter(fmt)
    log.addHandler(handler)
    if to_stderr:
        err = logging.StreamHandler(sys.stderr)
        err.setFormatter(fmt)
        log.addHandler(err)
    log.propagate = False
