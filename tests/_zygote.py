"""Test helpers for the zygote: a private socket directory per test, and nothing left behind.

Other helpers' tests run on this machine at the same time, so no test uses
the default per-user directory: ``FORKSERVER_RUNTIME_DIR`` points every
client and daemon of a test at its own ``tmp_path`` directory.  A daemon is
not our child (it runs in a session of its own), so ``no_leaks`` cannot see
it: the fixture stops every zygote at the end, then checks that no process
carrying the test's directory in its environment is left (daemon, template,
run), killing and reporting any.
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

FORKSERVER = os.path.join(os.path.dirname(sys.executable), "forkserver")
DEADLINE = 30.0


def processes_with(marker: bytes) -> List[int]:
    """Pids of the processes whose environment holds ``marker`` (b"NAME=value")."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if marker in env:
            found.append(int(name))
    return found


def wait_gone(pids: List[int], timeout: float) -> List[int]:
    """Wait until the processes ``pids`` (not necessarily ours) have exited; the ones left."""
    fds = {}
    for pid in pids:
        try:
            fds[os.pidfd_open(pid)] = pid
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + timeout
    try:
        while fds:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            ready, _, _ = select.select(list(fds), [], [], left)
            for fd in ready:
                os.close(fd)
                del fds[fd]
        return sorted(fds.values())
    finally:
        for fd in fds:
            os.close(fd)


def zombie_or_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] in ("Z", "X")
    except OSError:
        return True


class Zygotes:
    """A test's zygote directory, environment and command runners."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.env = dict(os.environ)
        self.env.pop("FORKSERVER_PRELOAD", None)
        self.env["FORKSERVER_RUNTIME_DIR"] = str(directory)
        self.marker = f"FORKSERVER_RUNTIME_DIR={directory}".encode()
        self.sockets: List[str] = []  # --socket paths outside the directory, stopped at the end

    def socket(self, path: Any) -> str:
        """An explicit ``--socket`` path, whose zygote the fixture stops too."""
        self.sockets.append(str(path))
        return str(path)

    def cmd(self, *args: str) -> List[str]:
        return [FORKSERVER, *args]

    def run(self, *args: str, timeout: float = DEADLINE, check_output: bool = True,
            **kw: Any) -> subprocess.CompletedProcess:
        """``forkserver run ARGS``, output captured (text)."""
        kw.setdefault("env", self.env)
        if check_output:
            kw.setdefault("capture_output", True)
            kw.setdefault("text", True)
        return subprocess.run(self.cmd("run", *args), timeout=timeout, **kw)

    def cli(self, *args: str, timeout: float = DEADLINE, **kw: Any) -> subprocess.CompletedProcess:
        kw.setdefault("env", self.env)
        return subprocess.run(self.cmd(*args), timeout=timeout, capture_output=True, text=True,
                              **kw)

    def status(self) -> List[Dict[str, Any]]:
        out = self.cli("status", "--json")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def daemon(self) -> Dict[str, Any]:
        """The one running zygote daemon's status."""
        live = [s for s in self.status() if not s.get("stale")]
        assert len(live) == 1, live
        return live[0]

    def logs(self) -> str:
        return "".join(p.read_text() for p in sorted(self.dir.glob("*.log")))

    def close(self) -> None:
        """Stop every zygote; fail if any process of this test's zygotes is left."""
        if self.dir.is_dir():
            self.cli("stop", "--wait")
        for path in self.sockets:
            self.cli("stop", "--wait", "--socket", path)
        left = wait_gone(processes_with(self.marker), DEADLINE)
        left = [pid for pid in left if not zombie_or_gone(pid)]
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert not left, f"processes of this test's zygotes left running: {left}"


@pytest.fixture
def zygotes(tmp_path: Path, no_leaks):
    """A private zygote directory (``FORKSERVER_RUNTIME_DIR``); everything stopped after.

    ``no_leaks`` is set up first and checked last: after the zygotes are stopped.
    """
    directory = tmp_path / "rt"
    directory.mkdir(mode=0o700)
    z = Zygotes(directory)
    try:
        yield z
    finally:
        z.close()


def script(tmp_path: Path, text: str, name: str = "script.py") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def wait_for(condition: Any, timeout: float = DEADLINE, what: str = "the condition") -> Any:
    """Poll ``condition()`` until it is true (returned) or ``timeout`` passes (AssertionError).

    For states the kernel reports no event for to a non-parent (a process
    stopped by a signal, say): each poll is a cheap /proc read.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        select.select([], [], [], 0.01)


def read_until(fd: int, needle: bytes, timeout: float = DEADLINE) -> bytes:
    """Read ``fd`` (a pty master, a pipe) until ``needle`` has been seen; all bytes read."""
    data = b""
    deadline = time.monotonic() + timeout
    while needle not in data:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise AssertionError(f"no {needle!r} within {timeout} s; got {data!r}")
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the pty's other side is closed
            chunk = b""
        if not chunk:
            raise AssertionError(f"EOF before {needle!r}; got {data!r}")
        data += chunk
    return data


def proc_state(pid: int) -> Optional[str]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0]
    except OSError:
        return None
