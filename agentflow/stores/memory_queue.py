"""The work queue of the memory store: per-workflow FIFOs in this process (see ``WorkQueue``)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Sequence

from . import capabilities
from .capabilities import Claim, QueueDepth

__all__ = ["MemoryQueue"]


class MemoryQueue:
    """Entries wait in a deque per workflow; a claimed one waits for its ack (or redelivery)."""

    def __init__(self) -> None:
        self._waiting: dict[str, deque[tuple[str, str, float]]] = {}
        self._claimed: dict[str, tuple[Claim, float]] = {}  # receipt -> claim, claimed at
        self._ids = itertools.count(1)
        self._arrived = asyncio.Event()

    async def enqueue(self, workflow: str, run_id: str) -> None:
        self._waiting.setdefault(workflow, deque()).append((str(next(self._ids)), run_id, time.time()))
        self._arrived.set()

    async def claim(self, workflows: Sequence[str], consumer: str, limit: int, wait: float) -> list[Claim]:
        if limit <= 0:
            return []

        async def attempt() -> list[Claim]:
            return self._take(workflows, limit)

        # Looked at again every second for redeliveries too.
        return await capabilities.claim_waiting(attempt, self._arrived, wait, 1.0)

    def _take(self, workflows: Sequence[str], limit: int) -> list[Claim]:
        now = time.time()
        out: list[Claim] = []
        for receipt, (claim, at) in list(self._claimed.items()):
            if len(out) < limit and claim.workflow in workflows and now - at >= capabilities.REDELIVER_AFTER:
                self._claimed[receipt] = (claim, now)
                out.append(claim)
        heads = [(q[0][2], wf) for wf in workflows if (q := self._waiting.get(wf))]
        while len(out) < limit and heads:
            heads.sort()
            _, wf = heads.pop(0)
            q = self._waiting[wf]
            receipt, run_id, at = q.popleft()
            claim = Claim(wf, run_id, receipt, at)
            self._claimed[receipt] = (claim, now)
            out.append(claim)
            if q:
                heads.append((q[0][2], wf))
        return out

    async def ack(self, claims: Sequence[Claim]) -> None:
        for c in claims:
            self._claimed.pop(c.receipt, None)

    async def queue_depth(self, workflow: str) -> QueueDepth:
        q = self._waiting.get(workflow)
        if not q:
            return QueueDepth(0, None)
        return QueueDepth(len(q), max(0.0, time.time() - q[0][2]))
