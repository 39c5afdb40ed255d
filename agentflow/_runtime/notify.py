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


class Notifier:
    """Per-run waiters, woken by :meth:`notify`; a waiter that times out leaves nothing behind."""

    __slots__ = ("waiters", "watching")

    def __init__(self) -> None:
        self.waiters: dict[str, list[asyncio.Event]] = {}
        #: Run id → the live-event buffers of this process's watchers of it (none: no key).
        self.watching: dict[str, list[deque[RunEvent]]] = {}

    def notify(self, run_id: str) -> None:
        """Wake everyone waiting on ``run_id``."""
        if self.waiters:
            for ev in self.waiters.pop(run_id, ()):
                ev.set()

    async def changed(self, run_id: str, timeout: float) -> None:
        """Wait until this process commits to ``run_id``, or ``timeout`` passes (other processes)."""
        ev = asyncio.Event()
        waiting = self.waiters.setdefault(run_id, [])
        waiting.append(ev)
        try:
            async with asyncio.timeout(timeout):
                await ev.wait()
        except TimeoutError:
            pass
        finally:
            if not ev.is_set():
                waiting.remove(ev)
                if not waiting and self.waiters.get(run_id) is waiting:
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
