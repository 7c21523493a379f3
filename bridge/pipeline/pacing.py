"""Burst pacing: while messages arrive faster than a threshold, turn starts are rationed.

Everything the service does shares one event loop. A message's acknowledgement is cheap but has a
deadline (a platform retries one it does not get within 3 s, a person waits on the web chat's
202); a turn is expensive (a process to spawn or a runtime to drive, a reply to write and to
deliver) and has none. So during a burst (a backfill after a reconnect, a script posting in a
loop, a storm of redeliveries) the service acknowledges everything first and starts turns at a
bounded rate; when the burst is over, what waits starts at once. Nothing is dropped or
reordered: the messages are already durable in the inbox, and each conversation's lane keeps its
order while it waits here.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

WINDOW = 0.25  # seconds over which the arrival rate is measured


class BurstPacer:
    def __init__(self, *, burst_rate: float, burst_starts: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`burst_rate`: messages per second above which the service is in a burst (0: never);
        `burst_starts`: turn starts per second while it is."""
        self.burst_rate = burst_rate
        self.burst_starts = burst_starts
        self._clock = clock
        self._window_start = clock()
        self._count = 0
        self._rate = 0.0  # arrivals per second over the last complete window
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._next_start = 0.0
        self._calm: list[Callable[[], None]] = []
        self._calm_timer: asyncio.TimerHandle | None = None

    # -- arrivals ---------------------------------------------------------------------------

    def note(self) -> None:
        """One message accepted."""
        self._count += 1
        now = self._clock()
        if now - self._window_start >= WINDOW:
            self._roll(now)

    def _roll(self, now: float) -> None:
        elapsed = now - self._window_start
        self._rate = self._count / elapsed if elapsed > 0 else 0.0
        self._count = 0
        self._window_start = now

    @property
    def bursting(self) -> bool:
        """The last complete window's rate was above the threshold, or the window under way has
        already had more arrivals than the threshold allows in a whole window: a burst starts
        being paced within its first few dozen messages, not a window later (by then a burst
        over a thousand conversations had started a turn in each)."""
        if self.burst_rate <= 0:
            return False
        now = self._clock()
        if now - self._window_start >= WINDOW:
            self._roll(now)  # a quiet window ends the burst
        return self._rate > self.burst_rate or self._count > self.burst_rate * WINDOW

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    # -- turn starts ------------------------------------------------------------------------

    async def admit(self) -> bool:
        """Return when a turn may start: at once outside a burst, in arrival order within one.
        True when the turn had to wait."""
        if not self._waiters and not self.bursting:
            return False
        if not self._waiters and self._clock() >= self._next_start:
            self._next_start = self._clock() + 1.0 / self.burst_starts
            return False
        future = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        self._arm()
        try:
            await future
        except asyncio.CancelledError:
            if future in self._waiters:
                self._waiters.remove(future)
            raise
        return True

    def _arm(self) -> None:
        if self._timer is None and self._waiters:
            delay = max(0.0, self._next_start - self._clock())
            self._timer = asyncio.get_running_loop().call_later(delay, self._release)

    def _release(self) -> None:
        """One waiter per 1/burst_starts seconds during a burst; all of them once it is over (the
        burst re-checked at every release)."""
        self._timer = None
        if not self.bursting:
            while self._waiters:
                future = self._waiters.popleft()
                if not future.done():
                    future.set_result(None)
            return
        while self._waiters:
            future = self._waiters.popleft()
            if not future.done():
                future.set_result(None)
                self._next_start = self._clock() + 1.0 / self.burst_starts
                break
        self._arm()

    def when_calm(self, callback: Callable[[], None]) -> None:
        """Call `callback` once the burst is over (checked every WINDOW seconds)."""
        if callback not in self._calm:
            self._calm.append(callback)
        if self._calm_timer is None:
            self._calm_timer = asyncio.get_running_loop().call_later(WINDOW, self._check_calm)

    def _check_calm(self) -> None:
        self._calm_timer = None
        if self.bursting:
            self._calm_timer = asyncio.get_running_loop().call_later(WINDOW, self._check_calm)
            return
        callbacks, self._calm = self._calm, []
        for callback in callbacks:
            callback()

    def close(self) -> None:
        """Let every waiter go (the dispatcher is closing: they see that and start nothing)."""
        for timer in (self._timer, self._calm_timer):
            if timer is not None:
                timer.cancel()
        self._timer = self._calm_timer = None
        self._calm.clear()
        while self._waiters:
            future = self._waiters.popleft()
            if not future.done():
                future.set_result(None)
