"""What ``Supervisor.status()`` returns: plain, frozen, JSON-friendly snapshots (parent side).

``dataclasses.asdict(status)`` (or ``status.to_dict()``) gives dicts, lists,
strings, numbers and None only, so ``json.dumps`` takes it as it is.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

# A member's states (the datarhei process supervisor's, whose users know them):
STARTING = "starting"  # its process is being created
RUNNING = "running"  # its process runs (a worker: its target was started)
FINISHING = "finishing"  # asked to stop: the stop ladder is under way
FINISHED = "finished"  # ended as asked, or exited with status 0 on its own
FAILED = "failed"  # exited with a non-zero status, could not start, or gave up (crash loop)
KILLED = "killed"  # ended by a signal: from outside, or ours (SIGKILL, stale, over a limit)
STATES = (STARTING, RUNNING, FINISHING, FINISHED, FAILED, KILLED)


@dataclass(frozen=True)
class MemberStatus:
    """One slot of a supervisor and the process in it, at the time of the snapshot.

    Times are seconds; ``since`` is wall-clock (``time.time()``), the others
    are durations.  ``exit_code`` follows ``subprocess``: negative is the
    signal that ended the process.
    """

    slot: int  #: index of the slot (0 .. size-1; a retiring member keeps its old slot's)
    state: str  #: one of STATES
    pid: Optional[int]  #: the process now in the slot (None between processes)
    generation: int  #: which ``reload()`` the process comes from (0: the first start spec)
    since: float  #: wall-clock time of the last state change
    duration: float  #: seconds in the current state
    counts: Dict[str, int]  #: how often the slot entered each state, cumulative
    restarts: int  #: processes started in this slot after its first
    start_failures: int  #: starts that raised (a bad target, exec failure) -- not crashes
    exit_code: Optional[int]  #: returncode of the last process that ended here
    reason: Optional[str]  #: why it was last killed, failed or stopped, in words
    next_start_in: Optional[float]  #: seconds until a scheduled restart (None: none scheduled)
    uptime: Optional[float]  #: seconds the current process has been running
    idle: Optional[float]  #: seconds since its last heartbeat / accepted progress line
    up: bool  #: the process has come up: sent a heartbeat or an accepted progress line
    cpu: Optional[float]  #: CPU share in the last sample (1.0 = one whole CPU)
    memory: Optional[
        int
    ]  #: private memory (USS) in bytes, last sample: what ``Limits(memory=)`` counts
    memory_max: Optional[
        int
    ]  #: highest ``memory`` sampled (of the last process, between processes)
    rss: Optional[int]  #: resident memory (RSS, shared pages included) in bytes, last sample
    throttled: bool  #: CPU-throttled (SIGSTOP/SIGCONT duty cycle) right now
    gave_up: bool  #: no more restarts: crash loop, or the policy says no

    def to_dict(self) -> Dict[str, Any]:
        """As a dict of JSON-friendly values."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class SupervisorStatus:
    """A snapshot of a whole supervisor.

    ``state`` is ``"running"``, ``"stopping"``, ``"stopped"`` or ``"broken"``
    (the supervising thread hit an unexpected error, in ``error``; its
    members were killed and reaped).  ``members`` has one entry per slot;
    ``retiring`` are members being replaced by a reload or removed by a
    shrink, until they have exited.
    """

    state: str
    size: int
    generation: int
    reloads: int
    members: Tuple[MemberStatus, ...] = field(default_factory=tuple)
    retiring: Tuple[MemberStatus, ...] = field(default_factory=tuple)
    error: Optional[str] = None

    def count(self, state: str) -> int:
        """How many slots are in ``state``."""
        return sum(1 for m in self.members if m.state == state)

    @property
    def pids(self) -> Tuple[int, ...]:
        """Every live process of the supervisor: the slots' and the retiring ones."""
        return tuple(m.pid for m in self.members + self.retiring if m.pid is not None)

    def to_dict(self) -> Dict[str, Any]:
        """As a dict of JSON-friendly values (``json.dumps(status.to_dict())`` works)."""
        return dataclasses.asdict(self)
