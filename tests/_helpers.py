"""Test helpers: run a function in a forked child, wait for pids with deadlines."""
from __future__ import annotations

import os
import select
import signal
import sys
import traceback
from typing import Callable


def run_in_child(func: Callable[..., object], *args: object) -> int:
    """Fork; run ``func(*args)`` in the child and exit 0 (1 with a traceback if it raised)."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            func(*args)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def wait_status(pid: int, timeout: float = 20.0) -> int:
    """Reap ``pid`` within ``timeout`` seconds and return its raw wait status.

    On timeout the process is SIGKILLed, reaped, and AssertionError raised.
    """
    pidfd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"pid {pid} did not exit within {timeout}s")
        _, status = os.waitpid(pid, 0)
        return status
    finally:
        os.close(pidfd)


def wait_exitcode(pid: int, timeout: float = 20.0) -> int:
    """Reap ``pid`` and return its returncode (negative for a signal, like subprocess)."""
    return os.waitstatus_to_exitcode(wait_status(pid, timeout))
