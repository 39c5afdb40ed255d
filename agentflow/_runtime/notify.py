"""Notifications: wake whoever in this process waits for a run to change."""

from __future__ import annotations

import asyncio

__all__ = ["Notifier"]


class Notifier:
    """Per-run waiters, woken by :meth:`notify`; a waiter that times out leaves nothing behind."""

    __slots__ = ("waiters",)

    def __init__(self) -> None:
        self.waiters: dict[str, list[asyncio.Event]] = {}

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
