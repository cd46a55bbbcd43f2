"""``Supervisor``: keep N workers or programs alive (parent side).

The public face of this room: it checks the arguments, owns one ``Engine``
(``_engine.py``: the supervising thread) and turns its methods into queued
requests and waits -- blocking ones for threads, awaitable ones for asyncio.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import random
import signal
import threading
import time
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Set

from .._errors import BrokenSupervisorError, ClosedError, MemberFailedError
from .._template import Template
from ._engine import Engine
from ._limits import Limits
from ._member import KILL_WAIT
from ._policy import Clock, Policy
from ._requests import Reload, Request, Resize, Stop
from ._start import WorkerStart, start_spec
from ._status import STATES, SupervisorStatus

__all__ = ["Supervisor"]

Predicate = Callable[[SupervisorStatus], bool]
_live: Set[Engine] = set()  # supervisors to stop at interpreter exit
_live_lock = threading.Lock()


class Supervisor:
    """Keep ``size`` members running: workers forked from a template, or a program.

    ``start`` is what one member is:

    * ``(template, "module:function")`` -- each member is a fresh fork of
      ``template`` running ``function(control, *sent)``, so whatever was
      loaded or sent to the template (a listening socket, say) is in every
      member.  The supervisor loads the function's module and its own small
      worker-side module into the template when it starts (or raises the
      import error here);
    * ``["program", "arg", ...]`` -- each member is the program, started with
      ``forkserver.spawn(argv, **spawn_kwargs)``.

    Restarts: ``restart`` is ``"always"``, ``"on-failure"`` (not after a
    clean exit 0) or ``"never"``.  A member that *came up* -- sent a
    heartbeat or a progress line its parser accepted, or stayed up for the
    crash-loop window -- is restarted at once; members that end before
    coming up wait 0, then ``backoff[0]`` seconds, doubling up to
    ``backoff[1]``, each times a random ``1 +- jitter``.
    ``crash_loop=(N, T)``: the N-th exit of a slot within T seconds ends its
    restarts and marks it ``failed``, with the reason (``None``: no limit).

    Health: with ``stale_timeout``, a worker that sends no byte on its
    control socket (``forkserver.worker.heartbeat()``) for that many seconds,
    or a program that prints no line that ``progress(line)`` accepts (any
    line without ``progress``) on its ``output`` stream (``"stdout"`` or
    ``"stderr"``, read by the supervisor), is stopped and restarted.
    ``limits=Limits(cpu=, memory=, duration=, mode=)`` stops (or, for CPU,
    throttles) a member over a limit; see ``Limits``.

    Stopping a member is a ladder: each of ``stop_signals`` in turn, ``grace``
    seconds apart, then SIGKILL.  Callbacks run in this process, in the
    supervising thread, with a ``MemberStatus``: ``on_start(member)`` when a
    member runs, ``on_exit(member)`` when one has ended,
    ``on_state_change(member, old_state)`` at every state change; one that
    raises is logged (logger ``forkserver.supervise``) and ignored.

    The members start at once; one thread supervises them all.  Every method
    may be called from any thread; the ``a``-prefixed ones (``astop``,
    ``aresize``, ``areload``, ``await_state``, ``await_until``) are
    coroutines that never block the event loop.  A KeyboardInterrupt or a
    cancellation while one waits leaves the request to finish in the
    supervising thread.  ``with Supervisor(...) as sup:`` stops it at the end
    of the block; supervisors still running at interpreter exit are stopped
    then.
    """

    def __init__(
        self,
        start: Any,
        *,
        size: int = 1,
        restart: str = "always",
        backoff: Sequence[float] = (0.1, 30.0),
        jitter: float = 0.1,
        crash_loop: Optional[Sequence[float]] = (5, 60.0),
        stale_timeout: Optional[float] = None,
        limits: Optional[Limits] = None,
        stop_signals: Sequence[int] = (signal.SIGTERM,),
        grace: float = 5.0,
        on_start: Optional[Callable[..., Any]] = None,
        on_exit: Optional[Callable[..., Any]] = None,
        on_state_change: Optional[Callable[..., Any]] = None,
        progress: Optional[Callable[[str], Any]] = None,
        output: str = "stdout",
        spawn_kwargs: Optional[Mapping[str, Any]] = None,
        _clock: Optional[Clock] = None,
        _rng: Optional[Callable[[], float]] = None,
    ) -> None:
        _check_size(size, "Supervisor(size=...)")
        policy = Policy(restart, backoff, jitter, crash_loop, rng=_rng or random.random)  # type: ignore[arg-type]
        if stale_timeout is not None and not (
            isinstance(stale_timeout, (int, float)) and stale_timeout > 0
        ):
            raise ValueError(f"Supervisor(stale_timeout={stale_timeout!r}): seconds > 0, or None")
        if limits is not None and not isinstance(limits, Limits):
            raise TypeError(
                f"Supervisor(limits={limits!r}): a forkserver.Limits(cpu=..., memory=...)"
            )
        signals = tuple(_signal_number(s) for s in stop_signals)
        self._grace = _check_grace(grace)
        callbacks = {"on_start": on_start, "on_exit": on_exit, "on_state_change": on_state_change}
        for name, func in list(callbacks.items()) + [("progress", progress)]:
            if func is not None and not callable(func):
                raise TypeError(f"Supervisor({name}={func!r}): a callable, or None")
        self._watch: Dict[str, Any] = dict(
            progress=progress, stale_timeout=stale_timeout, output=output
        )
        spec = start_spec(start, spawn_kwargs=spawn_kwargs, **self._watch)
        self._spawn_kwargs = spawn_kwargs
        self._signals = signals
        self._owner = os.getpid()
        self._engine = Engine(
            spec,
            size,
            policy,
            limits,
            stale_timeout,
            signals,
            self._grace,
            progress,
            callbacks,
            _clock,
        )
        attach = getattr(_clock, "attach", None)
        if attach is not None:
            attach(self._engine.wake)  # a fake clock wakes the loop when moved
        with _live_lock:
            _live.add(self._engine)
        try:
            self._engine.thread.start()
        except BaseException:
            with _live_lock:
                _live.discard(self._engine)
            raise

    def __repr__(self) -> str:
        st = self._engine
        return f"<forkserver.Supervisor {st.phase} size={len(st.slots)} {st.spec!r}>"

    # -- looking --------------------------------------------------------------------------

    def status(self) -> SupervisorStatus:
        """A snapshot of every member (see ``SupervisorStatus``; ``.to_dict()`` for JSON)."""
        return self._engine.snapshot()

    def wait_state(
        self,
        state: str,
        *,
        slot: Optional[int] = None,
        count: Optional[int] = None,
        timeout: Optional[float] = None,
    ) -> SupervisorStatus:
        """Wait until ``slot`` is in ``state`` or, without ``slot``, until ``count`` slots
        are (default: all of them); returns the status then.

        Raises ``TimeoutError`` after ``timeout`` seconds, ``MemberFailedError``
        once a slot it needs has given up (a crash loop), ``ClosedError`` if
        the supervisor is stopped first.
        """
        return self.wait_until(self._state_predicate(state, slot, count), timeout)

    def wait_until(self, predicate: Predicate, timeout: Optional[float] = None) -> SupervisorStatus:
        """Wait until ``predicate(status)`` is true; returns that status.

        ``predicate`` is called with the supervisor's lock held: keep it quick
        and do not call the supervisor from it.  Raises ``TimeoutError`` after
        ``timeout`` seconds.
        """
        engine = self._engine
        if threading.current_thread() is engine.thread:
            raise RuntimeError(
                "wait_until()/wait_state() in a supervisor callback would wait for the thread "
                "that runs it; look at status() instead"
            )
        deadline = None if timeout is None else time.monotonic() + timeout
        with engine.cond:
            while True:
                status = engine.snapshot()
                if _satisfied(predicate, status):
                    return status
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise _timeout(timeout, status)
                engine.cond.wait(left)

    # -- changing ---------------------------------------------------------------------------

    def resize(self, size: int, *, timeout: Optional[float] = None) -> SupervisorStatus:
        """Keep ``size`` members from now on; returns once done.

        Growing starts the new slots (done when each has started once);
        shrinking stops the members of the last slots with the stop ladder
        (done when they have exited).
        """
        _check_size(size, "resize()")
        return self._call(Resize(size), timeout)

    def reload(self, start: Any, *, timeout: Optional[float] = None) -> SupervisorStatus:
        """Replace every member, one at a time, by one of ``start``; returns once done.

        ``start`` is a new template (the same target), ``(template, target)``
        or an argv.  For each member: a new one is started and, once it runs,
        the old one is stopped with the stop ladder -- so as many members run
        as before throughout, and a pre-forked server keeps accepting.
        Returns when every slot runs a new member and the old ones have
        exited.  If a new member cannot start, the members already replaced
        are replaced back and ``ReloadError`` is raised (``__cause__``: why).
        Slots that had given up start again, with the new start.
        """
        return self._call(Reload(self._new_spec(start)), timeout)

    def stop(self, grace: Optional[float] = None) -> SupervisorStatus:
        """Stop every member with the stop ladder (``grace`` overrides the
        supervisor's) and end the supervision; returns the final status.

        Never waits forever: each member gets its stop signals and ``grace``
        seconds after each, then SIGKILL; a process that survives even that
        (uninterruptible sleep) is left to forkserver's reaper thread.
        Idempotent.
        """
        grace = self._grace if grace is None else _check_grace(grace)
        bound = grace * max(1, len(self._signals)) + 2 * KILL_WAIT + 30.0
        try:
            return self._call(Stop(grace), bound)
        finally:
            if self._engine.phase in ("stopped", "broken"):
                with _live_lock:
                    _live.discard(self._engine)

    def __enter__(self) -> "Supervisor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- asyncio -------------------------------------------------------------------------------

    async def await_state(
        self,
        state: str,
        *,
        slot: Optional[int] = None,
        count: Optional[int] = None,
        timeout: Optional[float] = None,
    ) -> SupervisorStatus:
        """``wait_state`` as a coroutine."""
        return await self.await_until(self._state_predicate(state, slot, count), timeout)

    async def await_until(
        self, predicate: Predicate, timeout: Optional[float] = None
    ) -> SupervisorStatus:
        """``wait_until`` as a coroutine: the supervising thread wakes the loop at each change."""
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        engine = self._engine
        engine.add_waiter(loop, event)
        deadline = None if timeout is None else loop.time() + timeout
        try:
            while True:
                event.clear()  # before looking: a change from now on sets it again
                status = engine.snapshot()
                if _satisfied(predicate, status):
                    return status
                left = None if deadline is None else deadline - loop.time()
                if left is not None and left <= 0:
                    raise _timeout(timeout, status)
                try:
                    await asyncio.wait_for(event.wait(), left)
                except asyncio.TimeoutError:
                    pass  # looked at once more above, then raised
        finally:
            engine.remove_waiter(loop, event)

    async def aresize(self, size: int, *, timeout: Optional[float] = None) -> SupervisorStatus:
        """``resize`` as a coroutine."""
        _check_size(size, "aresize()")
        return await self._acall(Resize(size), timeout)

    async def areload(self, start: Any, *, timeout: Optional[float] = None) -> SupervisorStatus:
        """``reload`` as a coroutine (making the new spec loads code into the template: brief)."""
        return await self._acall(Reload(self._new_spec(start)), timeout)

    async def astop(self, grace: Optional[float] = None) -> SupervisorStatus:
        """``stop`` as a coroutine."""
        grace = self._grace if grace is None else _check_grace(grace)
        status = await self._acall(Stop(grace), None)
        with _live_lock:
            _live.discard(self._engine)
        return status

    # -- plumbing -------------------------------------------------------------------------------

    def _new_spec(self, start: Any) -> Any:
        self._check_owner("reload()")
        current = self._engine.spec
        if isinstance(start, Template):
            if not isinstance(current, WorkerStart):
                raise TypeError("reload(template): the members are programs; pass the new argv")
            start = (start, "%s:%s" % current.target)
        return start_spec(start, spawn_kwargs=self._spawn_kwargs, what="reload", **self._watch)

    def _call(self, req: Request, timeout: Optional[float]) -> SupervisorStatus:
        self._check_owner(req.kind + "()")
        engine = self._engine
        req = engine.submit(req)  # a second stop() waits for the first one
        if threading.current_thread() is engine.thread:
            return engine.snapshot()  # from a callback: the thread carries it out after it
        deadline = None if timeout is None else time.monotonic() + timeout
        with engine.cond:
            while not req.done:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(
                        f"{req.kind}() not done after {timeout:g} s; it goes on in the background"
                    )
                engine.cond.wait(left)
        if req.error is not None:
            raise req.error
        return engine.snapshot()

    async def _acall(self, req: Request, timeout: Optional[float]) -> SupervisorStatus:
        self._check_owner(req.kind + "()")
        req = self._engine.submit(req)
        await self.await_until(lambda status: req.done, timeout)
        if req.error is not None:
            raise req.error
        return self._engine.snapshot()

    def _check_owner(self, what: str) -> None:
        if self._owner != os.getpid():
            raise ClosedError(
                f"{what}: this Supervisor belongs to process {self._owner}, not to this fork"
            )

    def _state_predicate(self, state: str, slot: Optional[int], count: Optional[int]) -> Predicate:
        if state not in STATES:
            raise ValueError(f"wait_state({state!r}): one of {', '.join(STATES)}")
        if slot is not None and count is not None:
            raise TypeError("wait_state(): give slot= or count=, not both")

        def predicate(status: SupervisorStatus) -> bool:
            members = status.members
            if slot is not None:
                if slot >= len(members):
                    raise IndexError(
                        f"wait_state(slot={slot}): the supervisor has {len(members)} slots"
                    )
                chosen = [members[slot]]
                need = 1
            else:
                chosen, need = list(members), len(members) if count is None else count
            if sum(1 for m in chosen if m.state == state) >= need:
                return True
            lost = [m for m in chosen if m.gave_up and m.state != state and m.next_start_in is None]
            if lost and len(chosen) - len(lost) < need:
                worst = lost[0]
                raise MemberFailedError(
                    f"waiting for {need} slot(s) {state}: slot {worst.slot} gave up "
                    f"({worst.state}: {worst.reason or 'its restart policy'})"
                )
            return False

        return predicate


def _satisfied(predicate: Predicate, status: SupervisorStatus) -> bool:
    if predicate(status):
        return True
    if status.state == "broken":
        raise BrokenSupervisorError(f"the supervisor broke: {status.error}")
    if status.state == "stopped":
        raise ClosedError("the supervisor was stopped while waiting")
    return False


def _timeout(timeout: Optional[float], status: SupervisorStatus) -> TimeoutError:
    states = ", ".join(f"{m.slot}: {m.state}" for m in status.members) or "no slots"
    return TimeoutError(f"not reached within {timeout:g} s (slots {states})")


def _check_size(size: Any, what: str) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"{what}: size must be an int >= 0, got {size!r}")


def _check_grace(grace: Any) -> float:
    if not isinstance(grace, (int, float)) or grace < 0:
        raise ValueError(f"grace={grace!r}: seconds >= 0")
    return float(grace)


def _signal_number(sig: Any) -> int:
    try:
        number = int(sig)
        signal.Signals(number)
    except (TypeError, ValueError):
        raise ValueError(f"Supervisor(stop_signals=...): {sig!r} is not a signal") from None
    if number == signal.SIGKILL:
        raise ValueError(
            "Supervisor(stop_signals=...): SIGKILL always comes last by itself; "
            "list the polite ones"
        )
    return number


def _stop_all_at_exit() -> None:
    """Interpreter exit: stop the supervisors still running (their members with them)."""
    with _live_lock:
        engines = list(_live)
        _live.clear()
    for engine in engines:
        if engine.thread.is_alive():
            req = engine.submit(Stop(engine.grace))
            deadline = time.monotonic() + engine.grace * max(1, len(engine.signals)) + 2 * KILL_WAIT
            with engine.cond:
                while not req.done and time.monotonic() < deadline:
                    engine.cond.wait(max(0.0, deadline - time.monotonic()))


def _forget_after_fork() -> None:
    global _live_lock
    _live_lock = threading.Lock()  # another thread may have held it at the fork
    _live.clear()  # a forked copy of this process supervises nothing


atexit.register(_stop_all_at_exit)
os.register_at_fork(after_in_child=_forget_after_fork)
