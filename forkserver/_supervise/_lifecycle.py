"""What the supervising thread does with the lock held: requests, timers, starts, exits.

A mixin of ``Engine`` (``_engine.py``), kept apart for size: the methods
here work on the state ``Engine.__init__`` sets up, and run in the
supervising thread only -- except ``_start``'s process creation, which runs
without the lock (it waits for a template).
"""

from __future__ import annotations

import dataclasses
import logging
import select
from typing import TYPE_CHECKING, Any, Deque, List, Optional, Tuple

from .._errors import ClosedError, ReloadError
from .._reaper import reaper
from .._wait import ReapedElsewhere
from ._member import KILL_WAIT, Proc, Slot, all_procs, classify, retiring_status
from ._requests import Reload, Request, Resize, Stop
from ._status import FAILED, FINISHED, FINISHING, KILLED, RUNNING, STARTING

if TYPE_CHECKING:  # pragma: no cover
    import threading

    from ._limits import Limits
    from ._policy import Clock, Policy

log = logging.getLogger("forkserver.supervise")

Job = Tuple[Slot, Any, int, bool]  # slot, start spec, generation, replaces the slot's process


class Lifecycle:
    """Requests, timers, starts and exits of a supervisor's members (lock held)."""

    if TYPE_CHECKING:  # set by Engine.__init__
        cond: threading.Condition
        clock: Clock
        spec: Any
        generation: int
        _generations: int
        policy: Policy
        limits: Optional[Limits]
        stale: Optional[float]
        signals: Tuple[int, ...]
        grace: float
        progress: Any
        slots: List[Slot]
        retiring: List[Proc]
        requests: Deque[Request]
        active: Optional[Request]
        phase: str
        reloads: int
        _dirty: bool
        _stop_request: Optional[Stop]

        def _set_state(self, slot: Slot, state: str, now: float) -> None: ...

        def _emit(self, name: str, *args: Any) -> None: ...

    # -- requests ---------------------------------------------------------------------------

    def _take_requests(self, now: float) -> None:
        if self._stop_request is not None and self.phase == "running":
            self._dirty = True
            self._begin_stop(self._stop_request, now)
            return
        while self.requests and self.active is None and self.phase == "running":
            req = self.requests.popleft()
            self._dirty = True
            self.active = req
            if isinstance(req, Resize):
                self._resize(req, now)
            elif isinstance(req, Reload):
                self._begin_reload(req, now)

    def _resize(self, req: Resize, now: float) -> None:
        live = [s for s in self.slots if not s.removing]
        wall = self.clock.time()
        for slot in live[req.size :]:
            slot.removing, slot.next_start = True, None
            if slot.proc is not None:
                slot.proc.stop(self.signals, self.grace, now, FINISHED, "removed by resize()")
                self._set_state(slot, FINISHING, now)
        for _ in range(len(live), req.size):
            slot = Slot(len(self.slots), now, wall)
            self.slots.append(slot)
            req.new_slots.append(slot)
        self._drop_removed()

    def _begin_reload(self, req: Reload, now: float) -> None:
        self._generations += 1
        req.generation = req.target = self._generations
        req.old_spec, req.old_generation = self.spec, self.generation
        self.spec, self.generation = req.spec, req.generation
        self.reloads += 1
        for slot in self.slots:  # new code: failed slots get another chance
            if slot.gave_up and not slot.removing and slot.proc is None:
                slot.gave_up, slot.streak, slot.next_start = False, 0, now
                slot.exits.clear()

    def _begin_stop(self, req: Stop, now: float) -> None:
        for other in ([self.active] if self.active else []) + list(self.requests):
            other.finish(ClosedError(f"{other.kind}(): the supervisor was stopped meanwhile"))
        self.active = None
        self.requests.clear()
        self.phase = "stopping"
        self._stop_all(now, req.grace)

    def _stop_all(self, now: float, grace: float) -> None:
        for slot in self.slots:
            slot.next_start = None
            if slot.proc is not None and slot.proc.ladder is None:
                slot.proc.stop(self.signals, grace, now, FINISHED, "the supervisor stopped")
                self._set_state(slot, FINISHING, now)

    def _check_requests(self, now: float) -> None:
        req = self.active
        if req is None:
            return
        busy = any(s.starting for s in self.slots)
        if isinstance(req, Resize):
            removing = any(s.removing for s in self.slots)
            if not removing and all(s.attempts and not s.starting for s in req.new_slots):
                self._done(req)
        elif isinstance(req, Reload):
            moved = all(s.proc is None or s.proc.generation == req.target for s in self.slots)
            if moved and not busy and not self.retiring:
                self._done(req, ReloadError(f"reload(): {req.cause}") if req.cause else None)

    def _done(self, req: Request, error: Optional[BaseException] = None) -> None:
        if error is not None and isinstance(req, Reload):
            error.__cause__ = req.cause
        req.finish(error)
        self.active = None
        self._dirty = True

    def _maybe_stopped(self) -> bool:
        if self.phase != "stopping":
            return False
        assert self._stop_request is not None
        if any(s.starting for s in self.slots) or all_procs(self.slots, self.retiring):
            # A member whose start finished meanwhile gets its ladder too.
            self._stop_all(self.clock.monotonic(), self._stop_request.grace)
            return False
        return True

    # -- timers --------------------------------------------------------------------------------

    def _timers(self, now: float) -> None:
        for proc in all_procs(self.slots, self.retiring):
            ladder = proc.ladder
            if ladder is not None:
                if ladder.deadline <= now:
                    ladder.fire(proc, now)
                    if ladder.abandoned:
                        self._abandon(proc, now)
                continue
            if self.stale is not None and proc.watched and now - proc.last_progress >= self.stale:
                self._enforce(
                    proc,
                    now,
                    f"stale: no heartbeat or progress for {now - proc.last_progress:.1f} s",
                )
                continue
            self._sample(proc, now)

    def _sample(self, proc: Proc, now: float) -> None:
        s = proc.sampler
        if s.next_toggle is not None and s.next_toggle <= now:
            s.toggle(now, proc.pidfd)
        if s.next_sample > now:
            return
        s.sample(now)
        self._dirty = True
        limits = self.limits
        if limits is None:
            return
        if s.throttled and limits.cpu is not None:
            s.retune(limits.cpu, now, proc.pidfd)
        over = s.over(limits)
        if over is None:
            s.over_since = None
            return
        kind, what = over
        if s.over_since is None:
            s.over_since = now
        if now - s.over_since < limits.duration:
            return
        if kind == "cpu" and limits.mode == "throttle" and limits.cpu is not None:
            s.throttle(limits.cpu, now, proc.pidfd)
            log.info("pid %d: %s; throttled to %.0f %% of the time", proc.pid, what, 100 * s.duty)
        else:
            self._enforce(proc, now, f"{what} for {now - s.over_since:.1f} s")

    def _enforce(self, proc: Proc, now: float, reason: str) -> None:
        """Stop a member that is stale or over a limit; it ends ``killed``, with the reason."""
        log.warning("pid %d: %s; stopping it", proc.pid, reason)
        proc.stop(self.signals, self.grace, now, KILLED, reason)
        slot = self._slot_of(proc)
        if slot is not None:
            slot.reason = reason
            self._set_state(slot, FINISHING, now)

    def _slot_of(self, proc: Proc) -> Optional[Slot]:
        for slot in self.slots:
            if slot.proc is proc:
                return slot
        return None

    def _deadline(self) -> Optional[float]:  # lock held
        times: List[float] = []
        for proc in all_procs(self.slots, self.retiring):
            if proc.ladder is not None:
                times.append(proc.ladder.deadline)
                continue
            s = proc.sampler
            times.append(s.next_sample)
            if s.next_toggle is not None:
                times.append(s.next_toggle)
            if self.stale is not None and proc.watched:
                times.append(proc.last_progress + self.stale)
        if self.phase == "running":
            times += [
                s.next_start for s in self.slots if s.next_start is not None and s.proc is None
            ]
        return min(times) if times else None

    # -- starting members -----------------------------------------------------------------------

    def _jobs(self, now: float) -> List[Job]:
        if self.phase != "running":
            return []
        jobs: List[Job] = []
        for slot in self.slots:
            if slot.proc is None and not slot.starting and not slot.removing and not slot.gave_up:
                if slot.next_start is not None and slot.next_start <= now:
                    slot.next_start, slot.starting = None, True
                    self._set_state(slot, STARTING, now)
                    jobs.append((slot, self.spec, self.generation, False))
        req = self.active
        if isinstance(req, Reload) and not any(s.starting for s in self.slots):
            for slot in self.slots:
                proc = slot.proc
                if proc is None or proc.ladder is not None or slot.removing:
                    continue
                if proc.generation != req.target:
                    slot.starting = True
                    spec = req.spec if req.target == req.generation else req.old_spec
                    jobs.append((slot, spec, req.target, True))
                    break  # one at a time: a rolling reload
        return jobs

    def _start(self, job: Job) -> None:
        """Start one process (without the lock: it waits for the template) and record it."""
        slot, spec, generation, replacing = job
        child = error = None
        try:
            child = spec.start()
        except Exception as exc:
            error = exc
        with self.cond:
            now = self.clock.monotonic()
            slot.starting = False
            self._dirty = True
            if error is not None:
                self._start_failed(slot, error, replacing, now)
                return
            assert child is not None
            proc = Proc(child, spec, generation, slot.index, now)
            old = slot.proc
            slot.proc, slot.generation, slot.next_start = proc, generation, None
            if old is not None:  # a reload's replacement is running: retire its predecessor
                old.retired_at = (now, self.clock.time())
                old.stop(self.signals, self.grace, now, FINISHED, "replaced by reload()")
                self.retiring.append(old)
            if slot.attempts:
                slot.restarts += not replacing
            slot.attempts += 1
            if slot.state != RUNNING:
                self._set_state(slot, RUNNING, now)
            self._emit("on_start", slot.status(now))
            if slot.removing:  # shrunk away while it started
                proc.stop(self.signals, self.grace, now, FINISHED, "removed by resize()")
                self._set_state(slot, FINISHING, now)

    def _start_failed(self, slot: Slot, error: BaseException, replacing: bool, now: float) -> None:
        req = self.active
        if replacing and not isinstance(req, Reload):
            return  # the reload was ended by stop(): the slot keeps its process
        if replacing and isinstance(req, Reload):
            log.warning(
                "reload(): a new member could not start (%s: %s); rolling back",
                type(error).__name__,
                error,
            )
            if req.cause is None:
                req.cause = error
                req.target = req.old_generation
                self.spec, self.generation = req.old_spec, req.old_generation
            else:  # the old start fails too now: stop where we are
                self._done(
                    req, ReloadError(f"reload(): {req.cause}; rolling back failed too: {error}")
                )
            return
        log.warning(
            "slot %d: could not start a member: %s: %s", slot.index, type(error).__name__, error
        )
        slot.attempts += 1
        slot.start_failures += 1
        slot.exit_code = None
        slot.reason = f"could not start: {type(error).__name__}: {error}"
        self._set_state(slot, FAILED, now)
        self._after_end(slot, FAILED, 0.0, now)

    # -- exits -------------------------------------------------------------------------------

    def _exited(self, proc: Proc, now: float) -> None:
        try:
            code = proc.child.poll()
        except ReapedElsewhere:  # a waitpid(-1) of the application's got there first
            code = None
            proc.forget_pidfd()
        else:
            if code is None:
                return  # not yet (a pidfd is readable only at exit: should not happen)
        for _ in range(16):  # the rest of its output: up to EOF, or what is there now
            if proc.watch_fd is None or not _readable(proc.watch_fd):
                break
            proc.read(now, self.progress)
        proc.close()
        self._dirty = True
        state, reason = classify(code, proc.ladder)
        if proc in self.retiring:
            self.retiring.remove(proc)
            gone = retiring_status(proc, now, self.clock.time())
            self._emit(
                "on_exit", dataclasses.replace(gone, state=state, exit_code=code, reason=reason)
            )
            return
        slot = self._slot_of(proc)
        if slot is None:  # pragma: no cover - every process is in a slot or retiring
            return
        slot.proc = None
        slot.exit_code, slot.reason = code, reason
        slot.memory_max = proc.sampler.memory_max
        self._set_state(slot, state, now)
        self._emit(
            "on_exit",
            dataclasses.replace(slot.status(now), pid=proc.pid, generation=proc.generation),
        )
        if slot.removing:
            self._drop_removed()
            return
        if self.phase != "running" or (proc.ladder is not None and proc.ladder.final == FINISHED):
            return  # a stop that was asked for: no restart
        self._after_end(slot, state, now - proc.started_at, now, proc.came_up)

    def _after_end(
        self, slot: Slot, state: str, uptime: float, now: float, came_up: bool = False
    ) -> None:
        """A member ended without being asked to: restart it (after the backoff), or give up.

        The backoff is for members that fail to boot: one that had come up
        (a heartbeat or an accepted progress line) or stayed up for the
        crash-loop window is restarted at once.  The crash-loop rule counts
        every exit, so a member that comes up and dies at once cannot make
        a hot loop either.
        """
        policy = self.policy
        if came_up or uptime >= policy.stable:
            slot.streak = 0
        slot.streak += 1
        if not policy.wants_restart(state):
            slot.gave_up = True
            return
        why = policy.crash_loop_reason(slot.exits, now)
        if why is not None:
            log.error("slot %d: %s (last: %s)", slot.index, why, slot.reason)
            slot.gave_up = True
            slot.reason = f"{why} (last: {slot.reason or 'exited'})"
            self._set_state(slot, FAILED, now)
            return
        slot.next_start = now + policy.delay(slot.streak)

    def _drop_removed(self) -> None:
        while (
            self.slots
            and self.slots[-1].removing
            and self.slots[-1].proc is None
            and not self.slots[-1].starting
        ):
            self.slots.pop()
            self._dirty = True

    def _abandon(self, proc: Proc, now: float) -> None:
        """SIGKILL did not end it within KILL_WAIT (uninterruptible sleep): the reaper takes it."""
        log.error("pid %d did not exit after SIGKILL; the reaper thread will reap it", proc.pid)
        child = proc.child
        pidfd, child._pidfd = child._pidfd, None
        reaper.adopt(proc.pid, pidfd)
        proc.close()
        ladder = proc.ladder
        assert ladder is not None
        asked = ladder.final == FINISHED  # a stop that was asked for, not a stale/limit kill
        ladder.final = KILLED
        ladder.reason = f"{ladder.reason}; still not gone {KILL_WAIT:g} s after SIGKILL"
        if proc in self.retiring:
            self.retiring.remove(proc)
            return
        slot = self._slot_of(proc)
        if slot is None:  # pragma: no cover - every process is in a slot or retiring
            return
        slot.proc, slot.exit_code, slot.reason = None, None, ladder.reason
        self._set_state(slot, KILLED, now)
        if slot.removing:
            self._drop_removed()
        elif self.phase == "running" and not asked:
            self._after_end(slot, KILLED, now - proc.started_at, now, proc.came_up)


def _readable(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))
