"""A supervised process, its stop ladder, and the slot it lives in (parent side).

Only the supervising thread touches these, with the supervisor's lock held;
``status()`` reads them under the same lock.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .._process import Child
from ._limits import Sampler
from ._policy import new_window
from ._status import FAILED, FINISHED, FINISHING, KILLED, STATES, MemberStatus

log = logging.getLogger("forkserver.supervise")

KILL_WAIT = 5.0  # seconds to wait for a SIGKILLed process before handing it to the reaper
MAX_LINE = 1 << 16  # a progress "line" longer than this is cut there
_EOL = bytes.maketrans(b"\r", b"\n")


def signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


class Ladder:
    """Stopping one process: each signal in turn, ``grace`` seconds apart, then SIGKILL.

    ``final`` is the state the process ends in if it exits before SIGKILL:
    ``finished`` for a stop that was asked for, ``killed`` when the
    supervisor enforces staleness or a limit.
    """

    def __init__(
        self, signals: Sequence[int], grace: float, now: float, final: str, reason: str
    ) -> None:
        self.signals = list(signals)
        self._left = list(signals)
        self.grace = grace
        self.final = final
        self.reason = reason
        self.deadline = now  # the first signal goes out at once
        self.sigkilled = False
        self.abandoned = False

    def fire(self, proc: "Proc", now: float) -> None:
        """The deadline passed: the next signal, SIGKILL, or give up waiting."""
        if self.sigkilled:
            self.abandoned = True  # not even SIGKILL ended it (uninterruptible sleep)
            return
        if self._left:
            sig = self._left.pop(0)
            self.deadline = now + self.grace
        else:
            sig, self.sigkilled = signal.SIGKILL, True
            self.deadline = now + KILL_WAIT
        proc.signal(sig)
        proc.signal(signal.SIGCONT)  # a paused (throttled, or ^Z'd) process must run to exit


class Proc:
    """One member process: its Child, what the supervisor watches, how it is being stopped."""

    def __init__(self, child: Child, spec: Any, generation: int, slot: int, now: float) -> None:
        self.child = child
        self.pid = child.pid
        self.generation = generation
        self.slot = slot
        self.started_at = now
        self.last_progress = now
        self.came_up = False  # sent a heartbeat or an accepted progress line (it booted)
        self.ladder: Optional[Ladder] = None
        self.retired_at: Optional[Tuple[float, float]] = None  # (clock, wall) when replaced
        self.closed = False
        self._lines = bytearray()
        if spec.kind == "worker":
            self.watch_fd: Optional[int] = (
                child.control.fileno() if child.control is not None else None
            )
            self._is_socket = True
        else:
            self.watch_fd = spec.output_fd(child)
            self._is_socket = False
        self.watched = self.watch_fd is not None
        self.sampler = Sampler(child.pid, now)

    @property
    def pidfd(self) -> Optional[int]:
        return self.child._pidfd  # open until the Child reaps the process

    def forget_pidfd(self) -> None:
        """Close the pidfd of a process someone else reaped (its Child cannot know)."""
        child = self.child
        with child._lock:
            pidfd, child._pidfd = child._pidfd, None
        if pidfd is not None:
            os.close(pidfd)

    def signal(self, sig: int) -> None:
        try:
            self.child.send_signal(sig)
        except ProcessLookupError:
            pass  # exited meanwhile: its pidfd says so

    def stop(
        self, signals: Sequence[int], grace: float, now: float, final: str, reason: str
    ) -> None:
        """Start the stop ladder (once; a later request keeps the first ladder)."""
        if self.ladder is None:
            self.sampler.release(self.pidfd)
            self.ladder = Ladder(signals, grace, now, final, reason)

    def read(self, now: float, progress: Optional[Callable[[str], Any]]) -> None:
        """Read what the process sent: heartbeats (worker) or output lines (program)."""
        fd = self.watch_fd
        if fd is None:
            return
        try:
            if self._is_socket:
                data = self.child.control.recv(1 << 16)  # type: ignore[union-attr]
            else:
                data = os.read(fd, 1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""  # e.g. ECONNRESET: nothing more will come
        if not data:
            self.watch_fd = None  # EOF: stop watching (its exit comes through the pidfd)
            if self._lines and not self._is_socket:
                self._line(bytes(self._lines), now, progress)
                self._lines.clear()
            return
        if self._is_socket:
            self.last_progress = now  # any byte on the control socket is a heartbeat
            self.came_up = True
            return
        self._feed(data, now, progress)

    def _feed(self, data: bytes, now: float, progress: Optional[Callable[[str], Any]]) -> None:
        # "\r" ends a line too: ffmpeg redraws its progress line with it.
        buf = self._lines
        buf += data.translate(_EOL)
        while True:
            end = buf.find(b"\n")
            if end >= 0:
                line = bytes(buf[:end])
                del buf[: end + 1]
            elif len(buf) >= MAX_LINE:
                line = bytes(buf[:MAX_LINE])
                del buf[:MAX_LINE]
            else:
                return
            if line:
                self._line(line, now, progress)

    def _line(self, raw: bytes, now: float, progress: Optional[Callable[[str], Any]]) -> None:
        line = raw.decode("utf-8", "replace")
        if progress is None:
            self.last_progress, self.came_up = now, True
            return
        try:
            accepted = progress(line)
        except Exception:
            log.exception(
                "progress(%r) of pid %d raised; the line does not count as progress", line, self.pid
            )
            return
        if accepted:
            self.last_progress, self.came_up = now, True

    def close(self) -> None:
        """Close our ends of its control socket or pipes (the process has been reaped)."""
        if not self.closed:
            self.closed = True
            self.watch_fd = None
            self.child.close()


def classify(code: Optional[int], ladder: Optional[Ladder]) -> Tuple[str, Optional[str]]:
    """The state a process ended in and why, from its returncode and how it was stopped."""
    if ladder is not None:
        if ladder.final == KILLED:
            return KILLED, ladder.reason
        if ladder.sigkilled and code is not None and code < 0:
            names = ", ".join(signal_name(s) for s in ladder.signals) or "no stop signal"
            return (
                KILLED,
                f"{ladder.reason}; still running {ladder.grace:g} s after {names}: SIGKILLed",
            )
        return FINISHED, ladder.reason
    if code is None:
        return FAILED, "reaped by someone else's waitpid: its exit status is lost"
    if code == 0:
        return FINISHED, None
    if code > 0:
        return FAILED, f"exited with status {code}"
    return KILLED, f"killed by {signal_name(-code)}"


class Slot:
    """A place for one member: the process in it now and the slot's history."""

    def __init__(self, index: int, now: float, wall: float) -> None:
        self.index = index
        self.state = "starting"
        self.changed_at, self.changed_wall = now, wall
        self.counts: Dict[str, int] = {s: 0 for s in STATES}
        self.proc: Optional[Proc] = None
        self.generation = 0  # of the last process started here
        self.memory_max: Optional[int] = None  # of the last process, once it has ended
        self.next_start: Optional[float] = now
        self.starting = False  # a start is under way (outside the lock)
        self.attempts = 0
        self.restarts = 0
        self.start_failures = 0
        self.exit_code: Optional[int] = None
        self.reason: Optional[str] = None
        self.streak = 0  # exits in a row, for the backoff
        self.exits = new_window()
        self.gave_up = False
        self.removing = False  # shrunk away: ends when its process has exited

    def set_state(self, state: str, now: float, wall: float) -> Optional[str]:
        """Enter ``state``; the old state if it changed (else None)."""
        old = self.state
        if state == old and self.counts[state]:
            return None
        self.state = state
        self.counts[state] += 1
        self.changed_at, self.changed_wall = now, wall
        return None if old == state else old  # a new slot "starts" from nothing

    def status(self, now: float) -> MemberStatus:
        proc = self.proc
        return MemberStatus(
            slot=self.index,
            state=self.state,
            pid=proc.pid if proc is not None else None,
            generation=proc.generation if proc is not None else self.generation,
            since=self.changed_wall,
            duration=max(0.0, now - self.changed_at),
            counts=dict(self.counts),
            restarts=self.restarts,
            start_failures=self.start_failures,
            exit_code=self.exit_code,
            reason=self.reason,
            next_start_in=None
            if self.next_start is None or proc is not None
            else max(0.0, self.next_start - now),
            gave_up=self.gave_up,
            **dict(proc_fields(proc, now), **({} if proc else {"memory_max": self.memory_max})),
        )


def proc_fields(proc: Optional[Proc], now: float) -> Dict[str, Any]:
    """The MemberStatus fields that describe the running process."""
    if proc is None:
        return dict(
            up=False,
            uptime=None,
            idle=None,
            cpu=None,
            memory=None,
            memory_max=None,
            rss=None,
            throttled=False,
        )
    s = proc.sampler
    return dict(
        up=proc.came_up,
        uptime=max(0.0, now - proc.started_at),
        idle=max(0.0, now - proc.last_progress) if proc.watched else None,
        cpu=s.cpu,
        memory=s.memory,
        memory_max=s.memory_max,
        rss=s.rss,
        throttled=s.throttled,
    )


def retiring_status(proc: Proc, now: float, wall: float) -> MemberStatus:
    """A member on its way out (replaced by a reload)."""
    counts = {s: 0 for s in STATES}
    counts[FINISHING] = 1
    at, since = proc.retired_at or (now, wall)
    return MemberStatus(
        slot=proc.slot,
        state=FINISHING,
        pid=proc.pid,
        generation=proc.generation,
        since=since,
        duration=max(0.0, now - at),
        counts=counts,
        restarts=0,
        start_failures=0,
        exit_code=None,
        reason=proc.ladder.reason if proc.ladder else None,
        next_start_in=None,
        gave_up=True,
        **proc_fields(proc, now),
    )


def all_procs(slots: List[Slot], retiring: List[Proc]) -> List[Proc]:
    """Every live process: the slots' and the retiring ones."""
    return [s.proc for s in slots if s.proc is not None] + list(retiring)
