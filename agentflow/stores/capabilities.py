"""What a store may do beyond the :class:`~agentflow.stores.contract.Store` contract.

Each capability is a runtime-checkable Protocol, found with ``isinstance``: the
hand-over queue of workers (:class:`WorkQueue`), creating a run queued for them in one
operation (:class:`CreatesQueued`), connections opened ahead (:class:`Connects`),
pushed changes (:class:`ChangeFeed`), many runs' versions read at once
(:class:`ReadsVersions`), taking a handed-over run in one operation
(:class:`TakesRuns`), fleet-wide rate limits (:class:`RateLimits`) and small credential
records (:class:`Credentials`). The memory, SQLite, Redis and PostgreSQL stores have
those their medium allows; the conformance suite checks each one a store claims.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from ..types import RunEvent
from .contract import Lease, LoadedRun, RunRecord

__all__ = [
    "REDELIVER_AFTER",
    "ChangeFeed",
    "Claim",
    "Connects",
    "CreatesQueued",
    "Credentials",
    "QueueDepth",
    "Quota",
    "RateLimits",
    "ReadsVersions",
    "TakesRuns",
    "WorkQueue",
    "claim_waiting",
    "create_then_enqueue",
]


#: Seconds after which an entry a worker claimed and did not acknowledge (it died in
#: between) is delivered again. A claim is acknowledged as soon as the run's lease is
#: taken, so this only covers the moment between the two.
REDELIVER_AFTER = 30.0


@dataclass(frozen=True, slots=True)
class Claim:
    """A queue entry delivered to a worker; :meth:`WorkQueue.ack` it once the run is taken.

    Attributes:
        workflow: the queue (one per workflow).
        run_id: the run handed over.
        receipt: what ``ack`` needs to find the entry (store-specific).
        enqueued_at: when it was handed over (the store's clock, seconds).
    """

    workflow: str
    run_id: str
    receipt: str
    enqueued_at: float


@dataclass(frozen=True, slots=True)
class QueueDepth:
    """What waits in a workflow's queue: entries not yet claimed, and the oldest one's age."""

    waiting: int
    oldest_age: float | None


async def claim_waiting(
    attempt: Callable[[], Awaitable[list[Claim]]], arrived: asyncio.Event | None, wait: float, poll: float
) -> list[Claim]:
    """What a store's ``claim`` does while its queues are empty: ``attempt()`` again until it
    claims something or ``wait`` seconds passed.

    Between two attempts it waits for ``arrived`` (set by the store when an entry may have
    been queued; cleared before each attempt, so one queued meanwhile is not missed), at
    most ``poll`` seconds.
    """
    deadline = time.monotonic() + wait
    while True:
        if arrived is not None:
            arrived.clear()
        claims = await attempt()
        left = deadline - time.monotonic()
        if claims or left <= 0:
            return claims
        if arrived is None:
            await asyncio.sleep(min(left, poll))
            continue
        try:
            async with asyncio.timeout(min(left, poll)):
                await arrived.wait()
        except TimeoutError:
            pass


@runtime_checkable
class WorkQueue(Protocol):
    """The hand-over of runs to workers (§16): one queue per workflow, in the store.

    Delivery is at least once: a run's lease, not the queue, makes the work happen once
    (a worker takes the lease of a run it claims, and a claim of a run someone else
    holds, or that no longer exists, is acknowledged and dropped). Entries are claimed
    oldest first, never more than asked for, and only from the queues named.
    """

    async def enqueue(self, workflow: str, run_id: str) -> None:
        """Hand ``run_id`` to the workers that serve ``workflow``."""
        ...

    async def claim(self, workflows: Sequence[str], consumer: str, limit: int, wait: float) -> list[Claim]:
        """Up to ``limit`` entries of these workflows' queues for ``consumer``.

        Waits up to ``wait`` seconds while there are none. An entry claimed and not
        acknowledged within :data:`REDELIVER_AFTER` seconds is delivered again.
        """
        ...

    async def ack(self, claims: Sequence[Claim]) -> None:
        """The worker is done with these entries: they are not delivered again."""
        ...

    async def queue_depth(self, workflow: str) -> QueueDepth:
        """How many entries of ``workflow`` wait, and how long the oldest has."""
        ...


@runtime_checkable
class Connects(Protocol):
    """A store whose connections can be opened before the first call needs them.

    A runner entered with ``async with`` calls :meth:`connect` (briefly: it carries on
    without, should the store not answer at once), so that the first calls of a process
    do not all wait for the same connection; a client starting thousands of runs in one
    ``gather`` otherwise makes every one of them before the first goes out.
    """

    async def connect(self) -> None:
        """Open what the store's calls share (a connection, the tables, the scripts).

        Raises:
            StoreError: the store could not be reached (as a call would raise).
        """
        ...


@runtime_checkable
class CreatesQueued(Protocol):
    """A store that creates a run and queues it for the workers in one operation: what a
    client's ``run()`` does, so the run can be claimed as soon as it exists (a client
    starting many runs at once does not create them all before the first is queued).

    A store without it is used through ``create`` and then ``enqueue``.
    """

    async def create_queued(self, record: RunRecord, events: Sequence[RunEvent]) -> bool:
        """``create(record, events)`` and, when it creates the run, ``enqueue(record.workflow,
        record.run_id)``, as one operation (on Redis Cluster, where the queue lives in another
        slot, the second follows the first).

        Returns False, writing and queueing nothing, when the run id exists. Safe to call
        again after a lost reply: a retry of a call that created the run returns True and
        queues no second entry.
        """
        ...


async def create_then_enqueue(
    create: Callable[[RunRecord, Sequence[RunEvent]], Awaitable[bool]],
    enqueue: Callable[[str, str], Awaitable[None]],
    record: RunRecord,
    events: Sequence[RunEvent],
) -> bool:
    """``create_queued`` in two steps, for a store that cannot do both in one operation:
    ``create``, then, if it created the run, ``enqueue``. A crash between the two leaves
    a run with no owner and no queue entry, which a worker's recoverer takes (its lease
    has expired from the start)."""
    if not await create(record, events):
        return False
    await enqueue(record.workflow, record.run_id)
    return True


@runtime_checkable
class ChangeFeed(Protocol):
    """A store that pushes changes: watchers of a run another process advances are woken
    by it within milliseconds instead of polling the store (§16).
    """

    async def changes(self, changed: Callable[[str], None]) -> None:
        """Call ``changed(run_id)`` when a run is created or its status, pending approvals or
        control flag change, by any process, until cancelled (a store may tell of more
        writes than these).

        Raises:
            StoreError: the feed was cut (the caller starts it again; changes made while
                it was down are not replayed, so the caller looks at the store then).
        """
        ...


@runtime_checkable
class ReadsVersions(Protocol):
    """A store without a change feed that tells, in one read, which of many runs changed.

    A process following runs that others advance then looks at all of them together,
    every 100 ms, instead of reading each one's record every 100 ms; the watchers of a
    run that changed read it then.
    """

    async def versions(self, run_ids: Sequence[str]) -> dict[str, Any]:
        """For each of ``run_ids`` that exists, a pair ``(status mark, step mark)`` (compared
        with ``==``): the first differs whenever the run's status or control flag changed,
        the second whenever its events or ``updated_at`` did."""
        ...


@runtime_checkable
class TakesRuns(Protocol):
    """A store that takes a run handed over to a worker and loads it in one operation.

    What ``update`` (giving the run an owner) and ``load`` do one after the other, for
    the common case of a worker's claim: a store without it is used through those two.
    """

    async def take(
        self, run_id: str, workflow: str, owner: str, ttl: float
    ) -> tuple[Lease, LoadedRun] | None:
        """Give a run that is running, of ``workflow`` and without an owner a lease held by
        ``owner`` (the next token, ``ttl`` seconds from the store's now), and load it.

        Returns None, changing nothing, for any other run (or no run): the caller's
        ``update`` decides what it is. Safe to call again after a lost reply.
        """
        ...


@dataclass(frozen=True, slots=True)
class Quota:
    """One rate limit in numbers, as a store enforces it (an agent's ``RateLimit``).

    Attributes:
        requests: calls allowed in any ``window`` seconds, or None.
        tokens: tokens allowed in any ``window`` seconds, or None.
        concurrent: calls in flight at most, or None.
        window: the sliding window, seconds.
        hold: seconds a concurrency slot stays taken unless renewed (a dead holder's).
    """

    requests: int | None
    tokens: int | None
    concurrent: int | None
    window: float
    hold: float


@runtime_checkable
class RateLimits(Protocol):
    """A store that keeps rate limits shared by every process using it (§16, optional).

    A limit is named by ``key``; a call by ``ticket`` (unique per call). The store's
    clock judges the window, so processes whose clocks disagree share one limit. All
    three methods are idempotent by ticket: sent again after a lost reply, they apply
    once.
    """

    async def acquire_limit(
        self, key: str, ticket: str, quota: Quota, tokens: int
    ) -> tuple[float, str | None]:
        """Take a turn for ``ticket`` if every limit of ``quota`` allows it now.

        Granted, the call is counted (with ``tokens`` reserved), holds a concurrency
        slot when ``quota.concurrent`` is set, and ``(0.0, None)`` comes back. Otherwise
        nothing is taken, and the answer is the seconds to wait before asking again with
        the limit that asks for the longest wait (``"requests_per_minute"``,
        ``"tokens_per_minute"``, ``"concurrent"``). A call larger than ``quota.tokens``
        is granted in a window with no other call in it.
        """
        ...

    async def renew_limit(self, key: str, ticket: str, quota: Quota) -> None:
        """Keep ``ticket``'s concurrency slot for another ``quota.hold`` seconds."""
        ...

    async def release_limit(self, key: str, ticket: str, quota: Quota, tokens: int | None) -> None:
        """Give back ``ticket``'s slot; count ``tokens`` for its call instead of its reservation
        (None: keep the reservation)."""
        ...


@runtime_checkable
class Credentials(Protocol):
    """A store that keeps small JSON records beside the runs (optional): the review page's
    reviewers (token hashes) and its session-signing key live here (§15).

    Records live under the store's ``key_prefix`` (stores with different prefixes never
    see each other's), are shared by every process using the store, and do not expire.
    A key is a non-empty string; a value a JSON object (a ``dict`` of JSON-able data),
    read back as plain JSON. Each call is atomic; ``put_credential(..., only_new=True)``
    is the put-if-absent that lets processes starting together agree on one value.

    Errors: ``StoreError`` when the store cannot be reached, or the value cannot be
    written (raised before anything is written), or a stored value cannot be read.
    """

    async def put_credential(self, key: str, value: dict[str, Any], only_new: bool = False) -> bool:
        """Write ``value`` under ``key``; True when written.

        With ``only_new``, nothing is written and False comes back when ``key`` holds a
        value already (whoever wrote it).
        """
        ...

    async def get_credential(self, key: str) -> dict[str, Any] | None:
        """The value under ``key``, or None."""
        ...

    async def delete_credential(self, key: str) -> bool:
        """Remove ``key``; False when it held nothing."""
        ...

    async def list_credentials(self, prefix: str) -> list[tuple[str, dict[str, Any]]]:
        """Every ``(key, value)`` whose key starts with ``prefix`` (literally), by key."""
        ...
