"""Limits of supervised members: ``Limits``, psutil sampling, CPU throttling (parent side).

Each member is sampled about once a second (psutil: CPU time and memory).
Memory is the member's *private* memory (USS, from ``/proc/<pid>/smaps_rollup``,
~60 us): a worker forked from a big template shares most of its pages with
it, and its RSS would count them all.  A member over a limit for
``duration`` seconds is either stopped with the stop ladder
(``mode="kill"``) or, for CPU, throttled (``mode="throttle"``): the
supervisor alternates SIGSTOP and SIGCONT so that the process runs only a
fraction (its *duty*) of every 100 ms period, as cpulimit and datarhei's
supervisor do.  A stopped process cannot run at all, so its CPU share over a
window cannot exceed the duty by more than the signals' latency, whatever
the machine's load.  Memory cannot be reclaimed by pausing a process: a
memory limit always stops the member.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Optional, Tuple

import psutil

SAMPLE_EVERY = 1.0  # seconds between samples
PERIOD = 0.1  # seconds of one throttle cycle (run for duty*PERIOD, then pause)
MIN_DUTY = 0.02  # never pause a process for more than 98 % of the time
MIB = 1 << 20


@dataclass(frozen=True)
class Limits:
    """Resource limits for each member of a ``Supervisor``.

    ``cpu``: CPU share, 1.0 = one whole CPU (0.5 = half of one, 2.0 = two);
    ``memory``: private memory in bytes (e.g. ``100 * 2**20``): the USS,
    the pages only this member has -- not those it shares with its
    template and siblings, which its RSS counts too;
    ``duration``: seconds a member may stay over a limit before it is acted
    on (0: at the first sample over it); ``mode``: ``"kill"`` stops the
    member with the stop ladder (it is restarted as the restart policy
    says) and ``"throttle"`` pauses it part of the time so its CPU share
    stays at ``cpu`` (the memory limit still stops it).  Sampled about once
    a second, so a limit is noticed within about a second.
    """

    cpu: Optional[float] = None
    memory: Optional[int] = None
    duration: float = 0.0
    mode: str = "kill"

    def __post_init__(self) -> None:
        if self.cpu is not None and not (isinstance(self.cpu, (int, float)) and self.cpu > 0):
            raise ValueError(f"Limits(cpu={self.cpu!r}): a CPU share > 0 (1.0 = one whole CPU)")
        if self.memory is not None and not (isinstance(self.memory, int) and self.memory > 0):
            raise ValueError(
                f"Limits(memory={self.memory!r}): bytes, an int > 0 (e.g. 100 * 2**20)"
            )
        if not (isinstance(self.duration, (int, float)) and self.duration >= 0):
            raise ValueError(f"Limits(duration={self.duration!r}): seconds >= 0")
        if self.mode not in ("kill", "throttle"):
            raise ValueError(f"Limits(mode={self.mode!r}): 'kill' or 'throttle'")
        if self.mode == "throttle" and self.cpu is None:
            raise ValueError("Limits(mode='throttle') throttles CPU: give cpu= too")


class Sampler:
    """CPU share and RSS of one process, sampled on the supervisor's clock; throttling state."""

    def __init__(self, pid: int, now: float) -> None:
        self.pid = pid
        try:
            self._proc: Optional[psutil.Process] = psutil.Process(pid)
        except psutil.Error:
            self._proc = None  # gone already: its exit is being reported
        self._cpu_time: Optional[float] = None
        self._at = now
        self.cpu: Optional[float] = None
        self.memory: Optional[int] = None  # private (USS)
        self.memory_max: Optional[int] = None
        self.rss: Optional[int] = None
        self.over_since: Optional[float] = None  # when it first went over a limit
        self.duty = 1.0  # 1.0: not throttled
        self.paused = False
        self.next_toggle: Optional[float] = None
        # The first sample a second after the start, not at once: reading a
        # new process's smaps_rollup while it starts competes with its start
        # (measured: restart latency 7 ms with a sample at once, 3 ms without).
        self.next_sample = now + SAMPLE_EVERY

    def sample(self, now: float) -> None:
        """Read CPU time and RSS; the CPU share is over the time since the last sample."""
        self.next_sample = now + SAMPLE_EVERY
        if self._proc is None:
            return
        try:
            with self._proc.oneshot():
                times = self._proc.cpu_times()
                mem = self._proc.memory_full_info()  # smaps_rollup: ~60 us
        except psutil.Error:
            self._proc = None  # exited: the pidfd reports it
            return
        total = times.user + times.system
        if self._cpu_time is not None and now > self._at:
            self.cpu = max(0.0, (total - self._cpu_time) / (now - self._at))
        self._cpu_time, self._at = total, now
        # A member forked from a template shares the template's pages: its
        # RSS counts them all, though killing it would free none of them.
        # USS counts only the pages this process alone has: its own memory.
        self.memory, self.rss = mem.uss, mem.rss
        self.memory_max = mem.uss if self.memory_max is None else max(self.memory_max, mem.uss)

    def over(self, limits: Limits) -> Optional[Tuple[str, str]]:
        """("memory" or "cpu", in words) for the limit the last sample is over, else None.

        A throttled process is never over its CPU limit: the duty cycle holds it there.
        """
        if limits.memory is not None and self.memory is not None and self.memory > limits.memory:
            return "memory", (
                f"memory {self.memory / MIB:.0f} MiB over the limit of "
                f"{limits.memory / MIB:.0f} MiB"
            )
        if (
            limits.cpu is not None
            and self.cpu is not None
            and self.cpu > limits.cpu
            and not self.throttled
        ):
            return "cpu", f"CPU {self.cpu:.2f} over the limit of {limits.cpu:.2f}"
        return None

    # -- throttling ------------------------------------------------------------------

    @property
    def throttled(self) -> bool:
        return self.duty < 1.0

    def retune(self, limit: float, now: float, pidfd: Optional[int]) -> None:
        """After a sample while throttled: set the duty so the share comes to ``limit``.

        The process used ``cpu`` while allowed to run ``duty`` of the time,
        so it wants ``cpu / duty``; running ``limit / want`` of the time gives
        it ``limit``.  A process that wants less than its limit is released.
        """
        if self.cpu is None:
            return
        want = self.cpu / self.duty
        if want <= limit * 0.9:
            self.release(pidfd)
            return
        self.duty = min(1.0, max(MIN_DUTY, limit / want))
        if self.duty >= 1.0:
            self.release(pidfd)

    def throttle(self, limit: float, now: float, pidfd: Optional[int]) -> None:
        """Start the duty cycle (the last sample was over ``limit``)."""
        want = self.cpu if self.cpu else 1.0
        self.duty = min(1.0, max(MIN_DUTY, limit / want))
        if self.duty >= 1.0:
            self.duty = 1.0
            return
        self.paused = False
        self.next_toggle = now + self.duty * PERIOD
        self.over_since = None

    def toggle(self, now: float, pidfd: Optional[int]) -> None:
        """At ``next_toggle``: pause a running process, or let a paused one run."""
        if not self.throttled:
            return
        self.paused = not self.paused
        _signal(pidfd, signal.SIGSTOP if self.paused else signal.SIGCONT)
        length = (1.0 - self.duty) if self.paused else self.duty
        # Each phase counts from now: a late wake-up that let the process
        # run longer is not paid back with a shorter pause (the share stays
        # at or under the duty; the next sample's retune corrects the rest).
        self.next_toggle = now + length * PERIOD

    def release(self, pidfd: Optional[int]) -> None:
        """End throttling; a paused process runs again."""
        if self.paused and pidfd is not None:
            _signal(pidfd, signal.SIGCONT)
        self.duty, self.paused, self.next_toggle = 1.0, False, None


def _signal(pidfd: Optional[int], sig: int) -> None:
    if pidfd is None:
        return  # reaped already
    try:
        signal.pidfd_send_signal(pidfd, sig)
    except ProcessLookupError:
        pass  # exited meanwhile: the pidfd reports it
