"""Notifications: wake whoever in this process waits for a run to change.

And the live channel: events that are delivered to this process's watchers of a run
and never stored (``agent_delta``, the text of a model's reply as it streams). Each
watcher has a buffer of its own; an event published while nobody watches the run is
dropped, at the cost of one dict lookup.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

from ..types import RunEvent

__all__ = ["Notifier"]

#: Live events one watcher keeps unread before the oldest are dropped (a watcher that
#: stopped reading must not hold a long stream's text).
LIVE_BACKLOG = 10_000


class _Waiter(asyncio.Event):
    """One waiter's wake-up, and whether a step that left the status alone wakes it."""

    every_step = True


class Notifier:
    """Per-run waiters, woken by :meth:`notify`; a waiter that times out leaves nothing behind."""

    __slots__ = ("waiters", "watching")

    def __init__(self) -> None:
        self.waiters: dict[str, list[_Waiter]] = {}
        #: Run id → the live-event buffers of this process's watchers of it (none: no key).
        self.watching: dict[str, list[deque[RunEvent]]] = {}

    def notify(self, run_id: str) -> None:
        """Wake everyone waiting on ``run_id``."""
        if self.waiters:
            for ev in self.waiters.pop(run_id, ()):
                ev.set()

    def wake_all(self) -> None:
        """Wake every waiter (each looks at the store again)."""
        waiters = self.waiters
        for events in list(waiters.values()):
            for ev in events:
                ev.set()
        waiters.clear()

    async def changed(self, run_id: str, timeout: float) -> None:
        """Wait until ``run_id`` changes (here, or pushed by the store), or ``timeout`` passes."""
        await self.wait(run_id, self.arm(run_id), timeout)

    def notify_steps(self, run_id: str) -> None:
        """Wake those waiting on ``run_id`` for every change, not for a new status only: it
        moved on (new events) and its status and control flag are as they were."""
        waiting = self.waiters.get(run_id)
        if waiting:
            left = [ev for ev in waiting if not ev.every_step]
            for ev in waiting:
                if ev.every_step:
                    ev.set()
            if left:
                self.waiters[run_id] = left
            else:
                del self.waiters[run_id]

    def arm(self, run_id: str, every_step: bool = True) -> asyncio.Event:
        """Start listening for a change of ``run_id`` (before reading it: a change that comes
        between the read and :meth:`wait` is not missed). Without ``every_step``, a change
        the store tells of as a step only (:meth:`notify_steps`) does not wake it."""
        ev = _Waiter()
        ev.every_step = every_step
        self.waiters.setdefault(run_id, []).append(ev)
        return ev

    async def wait(self, run_id: str, ev: asyncio.Event, timeout: float) -> None:
        """Wait on what :meth:`arm` returned, at most ``timeout`` seconds; then stop listening."""
        try:
            async with asyncio.timeout(timeout):
                await ev.wait()
        except TimeoutError:
            pass
        finally:
            self.disarm(run_id, ev)

    def disarm(self, run_id: str, ev: asyncio.Event) -> None:
        """Stop listening (a woken waiter is gone already)."""
        if ev.is_set():
            return
        waiting = self.waiters.get(run_id)
        if waiting is not None and ev in waiting:
            waiting.remove(ev)
            if not waiting:
                del self.waiters[run_id]

    def publish(self, run_id: str, event: RunEvent) -> None:
        """Hand a live-only ``event`` to every watcher of ``run_id`` here and wake them; none: dropped."""
        buffers = self.watching.get(run_id)
        if buffers:
            for buffer in buffers:
                buffer.append(event)
            self.notify(run_id)

    @contextmanager
    def watch(self, run_id: str) -> Iterator[deque[RunEvent]]:
        """A buffer that receives the live events of ``run_id`` published while the block runs."""
        buffer: deque[RunEvent] = deque(maxlen=LIVE_BACKLOG)
        buffers = self.watching.setdefault(run_id, [])
        buffers.append(buffer)
        try:
            yield buffer
        finally:
            buffers.remove(buffer)
            if not buffers and self.watching.get(run_id) is buffers:
                del self.watching[run_id]
