"""Rate limits kept in this process: the sliding-window arithmetic, and ``ProcessLimits``.

The arithmetic is the one every store applies (the Redis script mirrors it in Lua,
the Postgres and SQLite stores apply it under a lock): a limit keeps the calls of its
window, ``(at, ticket, tokens)`` oldest first, and the slots held now, ``ticket ->
expires``. A call goes when, at ``now``:

* fewer than ``requests`` calls are in the window (else it waits until the oldest one
  whose leaving makes room leaves it: ``at + window - now``);
* the window's tokens plus its own stay within ``tokens``, or the window is empty
  (else it waits until enough of the oldest calls leave);
* fewer than ``concurrent`` slots are held (else it asks again in
  :data:`SLOT_POLL` seconds: a slot is given back when a call ends, not at a known time).

:class:`ProcessLimits` is the fallback for stores that keep no limits (memory):
one per process, shared by every runner in it, on the monotonic clock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .capabilities import Quota

__all__ = ["SLOT_POLL", "ProcessLimits", "Window", "process_limits", "verdict"]

#: Seconds a call waiting for a concurrency slot waits before asking again.
SLOT_POLL = 0.02


def verdict(
    quota: Quota, now: float, calls: Sequence[tuple[float, int]], slots: int, tokens: int
) -> tuple[float, str | None]:
    """``(0.0, None)`` when a call reserving ``tokens`` may go now, else ``(wait, limit)``.

    Args:
        calls: ``(at, tokens)`` of the calls in the window, oldest first.
        slots: concurrency slots held now.
    """
    waits: list[tuple[float, str]] = []
    window = quota.window
    if quota.requests is not None and len(calls) >= quota.requests:
        waits.append((calls[len(calls) - quota.requests][0] + window - now, "requests_per_minute"))
    if quota.tokens is not None and calls:
        used = sum(t for _, t in calls)
        if used + tokens > quota.tokens:
            at = calls[-1][0]
            for when, spent in calls:  # oldest first: the first whose leaving makes room
                used -= spent
                if used + tokens <= quota.tokens:
                    at = when
                    break
            waits.append((at + window - now, "tokens_per_minute"))
    if quota.concurrent is not None and slots >= quota.concurrent:
        waits.append((SLOT_POLL, "concurrent"))
    if not waits:
        return 0.0, None
    wait, limit = max(waits)
    return max(wait, 0.001), limit


@dataclass
class Window:
    """One limit's calls in its window and its slots (the state :func:`verdict` judges)."""

    calls: list[tuple[float, str, int]] = field(default_factory=list)  # (at, ticket, tokens)
    slots: dict[str, float] = field(default_factory=dict)  # ticket -> expires

    def trim(self, now: float, quota: Quota) -> None:
        """Forget the calls that left the window and the slots that expired."""
        start = now - quota.window
        if self.calls and self.calls[0][0] <= start:
            self.calls = [c for c in self.calls if c[0] > start]
        for ticket in [t for t, expires in self.slots.items() if expires <= now]:
            del self.slots[ticket]

    def acquire(self, now: float, ticket: str, quota: Quota, tokens: int) -> tuple[float, str | None]:
        """:meth:`RateLimits.acquire_limit` on this window."""
        self.trim(now, quota)
        if ticket in self.slots or any(c[1] == ticket for c in self.calls):
            return 0.0, None  # granted already (asked again after a lost answer)
        wait = verdict(quota, now, [(at, t) for at, _, t in self.calls], len(self.slots), tokens)
        if wait[0] > 0:
            return wait
        self.calls.append((now, ticket, tokens))
        if quota.concurrent is not None:
            self.slots[ticket] = now + quota.hold
        return wait

    def renew(self, now: float, ticket: str, quota: Quota) -> None:
        """:meth:`RateLimits.renew_limit` on this window."""
        if ticket in self.slots:
            self.slots[ticket] = now + quota.hold

    def release(self, ticket: str, tokens: int | None) -> None:
        """:meth:`RateLimits.release_limit` on this window."""
        self.slots.pop(ticket, None)
        if tokens is not None:
            self.calls = [(at, t, tokens if t == ticket else n) for at, t, n in self.calls]

    @property
    def empty(self) -> bool:
        """Nothing counts any more: the window can be forgotten."""
        return not self.calls and not self.slots


class ProcessLimits:
    """:class:`~agentflow.stores.capabilities.RateLimits` within one process (any thread, any loop).

    The fallback for stores that keep no limits: the runners of one process share
    it, so a limit holds across them, but not across processes.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._windows: dict[str, Window] = {}
        self._lock = threading.Lock()

    def _now(self) -> float:
        return self._clock()

    async def acquire_limit(
        self, key: str, ticket: str, quota: Quota, tokens: int
    ) -> tuple[float, str | None]:
        """Take a turn if every limit allows it now, else how long to wait and for which limit."""
        with self._lock:
            window = self._windows.get(key)
            if window is None:
                window = self._windows[key] = Window()
            return window.acquire(self._now(), ticket, quota, tokens)

    async def renew_limit(self, key: str, ticket: str, quota: Quota) -> None:
        """Keep ``ticket``'s slot for another ``quota.hold`` seconds."""
        with self._lock:
            window = self._windows.get(key)
            if window is not None:
                window.renew(self._now(), ticket, quota)

    async def release_limit(self, key: str, ticket: str, quota: Quota, tokens: int | None) -> None:
        """Give back ``ticket``'s slot and count its real ``tokens``."""
        with self._lock:
            window = self._windows.get(key)
            if window is None:
                return
            window.release(ticket, tokens)
            window.trim(self._now(), quota)
            if window.empty:
                del self._windows[key]


_PROCESS = ProcessLimits()


def process_limits() -> ProcessLimits:
    """The limits of this process, shared by all its runners on stores that keep none."""
    return _PROCESS
