"""The zygote's subcommands: ``serve``, ``run``, ``status``, ``stop``, ``launcher`` (parent side).

``add_parsers`` adds them to ``python -m forkserver``'s parser;
``dispatch`` runs one.  The ``forkserver`` console script sends ``run``
straight to ``_client.main`` without building this parser
(``forkserver/_console.py``).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import posix
import select
import sys
import time
from typing import Any, Dict, List, Optional

from . import _client, _wire as W
from ._serve import DEFAULT_IDLE_TIMEOUT, serve

COMMANDS = ("serve", "run", "status", "stop", "launcher")
STOP_WAIT = 30.0  # seconds `stop --wait` waits for each daemon to exit


def add_parsers(sub: Any) -> None:
    """Add the zygote's commands to the subcommands ``sub`` of the CLI parser."""
    p = sub.add_parser("serve", help="start a zygote: a warm interpreter with modules preloaded",
                       description="Start a zygote for `forkserver run`: an interpreter that has "
                       "imported MOD,... and forks a copy of itself for each run.")
    _preload_socket(p)
    p.add_argument("--idle-timeout", type=float, default=DEFAULT_IDLE_TIMEOUT, metavar="S",
                   help="stop after S seconds without runs; 0: never (default %(default)g)")
    p.add_argument("--foreground", action="store_true",
                   help="serve in this process (logs on stderr too) instead of in the background")
    # Listed for --help only: `run ...` goes to _client.main before argparse sees it.
    p = sub.add_parser("run", help="run a script, -m module or -c code in a zygote",
                       add_help=False, description=_client.USAGE)
    p.add_argument("args", nargs=argparse.REMAINDER)
    p = sub.add_parser("status", help="the zygotes running for you")
    p.add_argument("--socket", metavar="PATH", help="only the zygote at PATH")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = sub.add_parser("stop", help="stop zygotes (all of yours by default); runs in progress "
                       "finish first")
    _preload_socket(p, preload_default=None)
    p.add_argument("--wait", action="store_true", help="return once each daemon has exited")
    p = sub.add_parser("launcher", help="write an executable that is `forkserver run` with a "
                       "minimal start-up (python -IS)")
    p.add_argument("path", help="where to write it, e.g. ~/.local/bin/pyz")
    _preload_socket(p)
    p.add_argument("--force", action="store_true", help="overwrite PATH")


def _preload_socket(p: argparse.ArgumentParser, preload_default: Optional[str] = "") -> None:
    default = os.environ.get("FORKSERVER_PRELOAD", "") if preload_default == "" else None
    p.add_argument("--preload", default=default, metavar="MOD,...",
                   help="modules the zygote imports once (default: $FORKSERVER_PRELOAD)")
    p.add_argument("--socket", metavar="PATH", help="the zygote's socket (default: one per "
                   "preload set and interpreter in the per-user directory)")


def dispatch(args: argparse.Namespace) -> int:
    """Run the parsed zygote command; returns the exit status."""
    try:
        if args.command == "run":
            return _client.main(args.args)
        return {"serve": cmd_serve, "status": cmd_status, "stop": cmd_stop,
                "launcher": cmd_launcher}[args.command](args)
    except W.Unusable as exc:
        print(f"forkserver {args.command}: {exc}", file=sys.stderr)
        return 1


# -- serve ---------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    preload = W.split_preload(args.preload or "")
    path = W.fsencode(os.path.abspath(args.socket)) if args.socket else None
    if args.foreground:
        base = list(sys.path) if getattr(sys.flags, "safe_path", False) else sys.path[1:]
        return serve(preload, path, args.idle_timeout, base_path=base, to_stderr=True)
    opts = _client.Options()
    opts.preload, opts.socket, opts.idle_timeout = preload, path, args.idle_timeout
    path = _client.socket_path(opts, W.identity(posix.environ))
    try:
        W.connect(path).close()
        already = True
    except (FileNotFoundError, ConnectionRefusedError):
        already = False
        _client.obtain(path, opts).close()
    info = ask(path, b"status")
    print(f"forkserver: zygote pid {info['pid']} {'already ' if already else ''}serving "
          f"{info['socket']} (log: {info['log']})")
    for z in info["zygotes"]:
        if z["error"]:
            print(f"  preloading {','.join(z['preload'])} failed: {z['error']}")
            if not already:
                ask(path, b"stop")  # ours, and of no use: not left behind
                print("  stopped it")
            return 1
        print(f"  template pid {z['pid']}: {','.join(z['preload']) or 'nothing'} preloaded in "
              f"{z['build_ms']:.0f} ms ({z['modules']} modules)")
    return 0


# -- status / stop -----------------------------------------------------------------------


def ask(path: bytes, op: bytes) -> Dict[str, Any]:
    """Send the zygote at ``path`` a status or stop request; its JSON reply."""
    sock = W.connect(path)  # a bare _socket.socket: no context manager
    try:
        W.check_server(sock, path)
        ident = W.identity(posix.environ)
        W.send_fds(sock, W.MAGIC + W.record(W.KEY, ident) + W.record(W.OP, op)
                   + W.record(W.END), [])
        reader = W.RecordReader(sock)
        reply = reader.next()
        for fd in reader.fds:
            os.close(fd)
    finally:
        sock.close()
    if reply is None or reply[0] not in (W.INFO, W.STOPPING):
        raise W.Unusable(f"the zygote at {W.fsdecode(path)} did not answer "
                         f"({reply[1].decode(errors='replace') if reply else 'it hung up'})")
    return json.loads(reply[1])


def sockets(args: argparse.Namespace) -> List[bytes]:
    """The sockets a status/stop command is about."""
    if args.socket:
        return [W.fsencode(args.socket)]
    if getattr(args, "preload", None) is not None:
        opts = _client.Options()
        opts.preload = W.split_preload(args.preload)
        return [_client.socket_path(opts, W.identity(posix.environ))]
    directory = W.fsdecode(W.runtime_dir())
    return sorted(W.fsencode(p) for p in glob.glob(os.path.join(glob.escape(directory),
                                                                "*.sock")))


def cmd_status(args: argparse.Namespace) -> int:
    found = []
    for path in sockets(args):
        try:
            found.append(ask(path, b"status"))
        except (ConnectionRefusedError, FileNotFoundError):
            found.append({"socket": W.fsdecode(path), "stale": True})
    if args.json:
        print(json.dumps(found, indent=1))
        return 0
    if not found:
        print("forkserver: no zygote is running for you")
    for info in found:
        if info.get("stale"):
            print(f"{info['socket']}: stale (nobody listens; the next run replaces it)")
            continue
        up = time.time() - info["started"]
        print(f"zygote pid {info['pid']}, up {up:.0f} s, {info['runs_started']} runs, "
              f"{len(info['running'])} running: {info['socket']}")
        print(f"  python {info['python']}, forkserver {info['version']}, log {info['log']}")
        for z in info["zygotes"]:
            state = f"failed: {z['error']}" if z["error"] else f"pid {z['pid']}"
            print(f"  template {z['generation']} ({state}): {','.join(z['preload']) or 'nothing'}"
                  f" preloaded, {z['files_watched']} files watched, {z['runs']} runs")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    paths = sockets(args)
    stopped = 0
    for path in paths:
        try:
            info = ask(path, b"stop")
        except (ConnectionRefusedError, FileNotFoundError):
            continue
        stopped += 1
        left = len(info["running"])
        more = f"; {left} run(s) finishing first" if left else ""
        print(f"forkserver: stopped zygote pid {info['pid']} ({info['socket']}){more}")
        if args.wait and not wait_gone(info["pid"], STOP_WAIT):
            print(f"forkserver stop: pid {info['pid']} still running after {STOP_WAIT:g} s",
                  file=sys.stderr)
            return 1
    if not stopped:
        print("forkserver: no zygote was running")
    return 0


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait until process ``pid`` (not our child) has exited; False on timeout."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


# -- launcher --------------------------------------------------------------------------------

LAUNCHER = """\
#!{python} -IS
# A forkserver launcher: `forkserver run{options}` with a minimal interpreter start-up
# (no site, no package import).  Made by `forkserver launcher`; make it again after
# moving or upgrading forkserver.
import sys
sys.path.insert(0, {directory!r})
from _client import launch
launch({argv!r})
"""


def cmd_launcher(args: argparse.Namespace) -> int:
    argv: List[str] = []
    if args.preload:
        argv += ["--preload", ",".join(W.split_preload(args.preload))]
    if args.socket:
        argv += ["--socket", os.path.abspath(args.socket)]
    path = os.path.expanduser(args.path)
    text = LAUNCHER.format(python=sys.executable, options="".join(f" {a}" for a in argv),
                           directory=os.path.dirname(os.path.abspath(_client.__file__)), argv=argv)
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_TRUNC if args.force else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o755)
    except FileExistsError:
        print(f"forkserver launcher: {path} exists (--force overwrites it)", file=sys.stderr)
        return 1
    with os.fdopen(fd, "w") as f:
        f.write(text)
    print(f"forkserver: wrote {path}: `{os.path.basename(path)} script.py ...` is "
          f"`forkserver run{''.join(' ' + a for a in argv)} script.py ...`")
    return 0
