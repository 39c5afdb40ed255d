"""Agents' rate limits: the turns the pools ask for, taken from the store or within the process.

A store that keeps limits (:class:`~agentflow.stores.capabilities.RateLimits`: Redis,
Postgres, SQLite) makes them hold across every process sharing it; for the others
(memory, a store of your own without them) one
:class:`~agentflow.stores.limits.ProcessLimits` per process stands in, so a limit
holds across the runners of the process but not beyond it.

A call waiting for its turn asks the store again when the store says its turn may
have come (at most every :data:`_NAP` seconds, sooner for a concurrency slot), and the
calls of one limit in this process wait in line behind one another (first come, first
served here; the store decides between processes). A granted turn with a concurrency
slot renews it every third of :data:`HOLD` seconds while the call lasts, so the slot
of a process that died is free again within ``HOLD`` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from itertools import count

from ..agents.config import RateLimit
from ..errors import StoreError
from ..stores.capabilities import Quota, RateLimits
from ..stores.contract import Store
from ..stores.limits import process_limits

__all__ = ["HOLD", "StoreLimiter", "limiter_for"]

log = logging.getLogger("agentflow")

#: Seconds a concurrency slot stays taken unless its holder renews it.
HOLD = 30.0
#: Longest wait between two asks of a waiting call (a reservation corrected down may
#: make room before the window says so).
_NAP = 0.25


def limiter_for(store: Store) -> StoreLimiter:
    """The limiter of agents' calls on ``store``: the store's own limits, or this process's."""
    return StoreLimiter(store if isinstance(store, RateLimits) else process_limits())


class _Permit:
    """A granted turn: released once the call ends (its slot given back, its tokens counted)."""

    __slots__ = ("_keeper", "_limits", "key", "quota", "reason", "ticket", "waited")

    def __init__(
        self, limits: RateLimits, key: str, ticket: str, quota: Quota, waited: float, reason: str | None
    ) -> None:
        self._limits = limits
        self.key = key
        self.ticket = ticket
        self.quota = quota
        self.waited = waited
        self.reason = reason
        self._keeper: asyncio.Task[None] | None = None
        if quota.concurrent is not None:
            self._keeper = asyncio.get_running_loop().create_task(self._keep(), name=f"agentflow:limit:{key}")

    async def _keep(self) -> None:
        while True:
            await asyncio.sleep(self.quota.hold / 3)
            try:
                await self._limits.renew_limit(self.key, self.ticket, self.quota)
            except StoreError as exc:
                log.warning("rate limit %r: a slot could not be renewed (%s)", self.key, exc)

    async def release(self, tokens: int | None) -> None:
        """Give the slot back and count ``tokens``; a store that cannot be reached is logged
        (the slot then frees itself within ``HOLD`` seconds)."""
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
        try:
            await self._limits.release_limit(self.key, self.ticket, self.quota, tokens)
        except StoreError as exc:
            log.warning("rate limit %r: a turn could not be given back (%s)", self.key, exc)


class StoreLimiter:
    """:class:`~agentflow.agents.spi.Limiter` over a :class:`RateLimits` (the store's, or the process's)."""

    def __init__(self, limits: RateLimits) -> None:
        self.limits = limits
        self._lines: dict[str, asyncio.Lock] = {}
        self._why: dict[str, str | None] = {}  # the limit the latest refused call of a key waited for
        self._instance = os.urandom(6).hex()
        self._tickets = count()

    @property
    def fleet_wide(self) -> bool:
        """True when the store keeps the limits (they hold across processes)."""
        return self.limits is not process_limits()

    async def acquire(self, key: str, limit: RateLimit, tokens: int) -> _Permit:
        """Wait for a turn of ``limit`` (named ``key``) that reserves ``tokens``; never refuses.

        Raises:
            StoreError: the store could not be reached (after its own retries).
        """
        quota = Quota(limit.requests, limit.tokens, limit.concurrent, limit.window, HOLD)
        ticket = f"{self._instance}{next(self._tickets):x}"
        started = time.monotonic()
        line = self._lines.get(key)
        if line is None:
            line = self._lines[key] = asyncio.Lock()
        wait, reason = 0.0, None
        if not line.locked():  # nobody here waits for this limit: ask at once
            wait, reason = await self.limits.acquire_limit(key, ticket, quota, tokens)
            if wait <= 0:
                return _Permit(self.limits, key, ticket, quota, 0.0, None)
            self._why[key] = reason
        longest = wait
        async with line:  # those of this process wait in line: first come, first served
            while True:
                if wait > 0:
                    await asyncio.sleep(min(wait, _NAP))
                wait, why = await self.limits.acquire_limit(key, ticket, quota, tokens)
                if wait <= 0:
                    break
                if why is not None and (reason is None or wait > longest):
                    longest, reason = wait, why
                self._why[key] = why
        # A call that only waited behind others of this process waited for their limit.
        reason = reason or self._why.get(key)
        return _Permit(self.limits, key, ticket, quota, time.monotonic() - started, reason)
