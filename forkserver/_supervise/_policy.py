"""When a supervised slot restarts: restart policy, backoff with jitter, crash loops (parent side).

The rules, as the docs state them:

* ``restart="always"`` restarts after any exit, ``"on-failure"`` unless the
  process exited 0 by itself, ``"never"`` never.  A member the supervisor
  stopped for staleness or over a limit counts as a failure.
* The backoff is for members that fail to boot.  A member that *came up* --
  sent a heartbeat or a progress line its parser accepted, or stayed up for
  the crash-loop window (60 s by default) -- is restarted at once (a
  pre-forked server wants its worker back now).  Each member in a row that
  ends before it came up waits twice as long as the one before:
  0, ``backoff[0]``, ``2*backoff[0]``, ... up to ``backoff[1]``, each scaled
  by a random factor in ``1 +- jitter``.
* ``crash_loop=(N, T)``: the N-th exit within T seconds stops the restarts of
  that slot; it is marked ``failed`` with the reason.  ``crash_loop=None``
  keeps restarting, never faster than the backoff allows.
"""

from __future__ import annotations

import collections
import random
import time
from typing import Callable, Deque, Optional, Tuple

POLICIES = ("always", "on-failure", "never")
DEFAULT_WINDOW = 60.0  # the backoff's reset time when crash_loop is None


class Clock:
    """The supervisor's time: ``monotonic()`` for timers, ``time()`` for wall-clock stamps.

    Tests pass a fake clock with the same two methods and ``real = False``:
    the supervising loop then waits for events only, never for a timeout,
    and the fake clock wakes it when moved.
    """

    real = True

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()


class Policy:
    """A supervisor's restart rules (validated here, with errors in the caller's words)."""

    def __init__(
        self,
        restart: str,
        backoff: Tuple[float, float],
        jitter: float,
        crash_loop: Optional[Tuple[int, float]],
        rng: Callable[[], float] = random.random,
    ) -> None:
        if restart not in POLICIES:
            raise ValueError(
                f"Supervisor(restart={restart!r}): one of {', '.join(map(repr, POLICIES))}"
            )
        try:
            first, most = (float(x) for x in backoff)
        except (TypeError, ValueError):
            raise TypeError(
                f"Supervisor(backoff={backoff!r}): (first delay, longest delay) in seconds"
            ) from None
        if not 0 <= first <= most:
            raise ValueError(f"Supervisor(backoff={backoff!r}): 0 <= first delay <= longest delay")
        if not 0 <= jitter < 1:
            raise ValueError(
                f"Supervisor(jitter={jitter!r}): a fraction in [0, 1), e.g. 0.1 for +-10 %"
            )
        if crash_loop is not None:
            try:
                count, window = int(crash_loop[0]), float(crash_loop[1])
            except (TypeError, ValueError, IndexError):
                raise TypeError(
                    f"Supervisor(crash_loop={crash_loop!r}): (exits, seconds), or None for no limit"
                ) from None
            if count < 1 or window <= 0:
                raise ValueError(
                    f"Supervisor(crash_loop={crash_loop!r}): at least 1 exit within > 0 seconds"
                )
            crash_loop = (count, window)
        self.restart = restart
        self.backoff = (first, most)
        self.jitter = float(jitter)
        self.crash_loop = crash_loop
        self.stable = crash_loop[1] if crash_loop else DEFAULT_WINDOW
        self._rng = rng

    def wants_restart(self, state: str) -> bool:
        """After an exit the supervisor did not ask for, ending in ``state``."""
        if self.restart == "always":
            return True
        if self.restart == "on-failure":
            return state != "finished"
        return False

    def delay(self, streak: int) -> float:
        """Seconds before the restart after the ``streak``-th exit in a row (1: the first)."""
        if streak <= 1:
            return 0.0
        first, most = self.backoff
        base = min(most, first * 2.0 ** (streak - 2))
        return base * (1.0 + self.jitter * (2.0 * self._rng() - 1.0))

    def crash_loop_reason(self, exits: Deque[float], now: float) -> Optional[str]:
        """Record an exit at ``now``; the reason to give up if that makes a crash loop."""
        if self.crash_loop is None:
            return None
        count, window = self.crash_loop
        exits.append(now)
        while exits and exits[0] <= now - window:
            exits.popleft()
        if len(exits) >= count:
            return f"crash loop: {len(exits)} exits within {window:g} s; no more restarts"
        return None


def new_window() -> Deque[float]:
    """The exit times a slot keeps for crash-loop detection."""
    return collections.deque()
