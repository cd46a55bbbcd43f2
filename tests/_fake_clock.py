"""A clock for supervisor tests: time moves only when the test says so."""

from __future__ import annotations

from typing import Callable, List


class FakeClock:
    """``monotonic()``/``time()`` that stand still until ``advance(seconds)``.

    ``real = False`` tells the supervising loop to wait for events only;
    ``advance`` wakes every loop attached to it.  ``settle(sup)`` returns once
    the supervisor's loop has made a full turn after the call, so it has seen
    the clock's new time.
    """

    real = False

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self._wakers: List[Callable[[], None]] = []

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return 1.7e9 + self.now

    def attach(self, wake: Callable[[], None]) -> None:
        self._wakers.append(wake)

    def advance(self, seconds: float) -> None:
        self.now += seconds
        for wake in self._wakers:
            wake()


def settle(sup, timeout: float = 20.0) -> None:
    """Wait until ``sup``'s loop has made a full turn after this call."""
    engine = sup._engine
    with engine.cond:
        target = engine.turns + 2
        engine.wake()
        if not engine.cond.wait_for(
            lambda: engine.turns >= target or not engine.thread.is_alive(), timeout
        ):
            raise AssertionError(f"the supervising loop made no turn within {timeout} s")
