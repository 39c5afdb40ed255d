"""The Redis store's work queue: a stream per workflow and key prefix, read by a consumer group.

``P#q:{<wf>}`` is a stream of entries ``run=<id>``; its consumer group ``agentflow``
hands each entry to one worker (``XREADGROUP ... >``), which acknowledges it (``XACK``,
then ``XDEL``: the stream keeps only what is not done) once it holds the run's lease.
An entry delivered to a worker that died before acknowledging it stays pending in the
group; after ``REDELIVER_AFTER`` seconds of idleness another worker takes it over
(``XAUTOCLAIM``). A stream's key has its own hash tag, so on Redis Cluster each queue
lives on one slot and every command names one key; a worker serving several workflows
on a cluster reads their streams one by one (polling every :data:`POLL_INTERVAL`
seconds while all are empty) instead of blocking on all at once.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from redis import exceptions as redis_errors

from ..errors import StoreError
from . import capabilities
from .capabilities import Claim, QueueDepth
from .keys import escape
from .redis_wire import Wire

__all__ = ["POLL_INTERVAL", "StreamQueue"]

T = TypeVar("T")

GROUP = "agentflow"
#: Seconds between two reads of the streams of a cluster while all are empty.
POLL_INTERVAL = 0.02
#: The longest a blocking read waits in one call (it holds a connection meanwhile).
_BLOCK_MAX = 1.0


class StreamQueue:
    """``WorkQueue`` on a ``redis.asyncio.Redis`` or ``RedisCluster`` client.

    With the store's ``wire``, entries are queued and acknowledged through its shared,
    pipelined connection (with the commits in flight, no pooled connection of their own);
    blocking reads and the rest go through ``client``.
    """

    def __init__(self, client: Any, prefix: str, cluster: bool, wire: Wire | None = None) -> None:
        self._client = client
        self._wire = wire
        self._prefix = prefix
        self._cluster = cluster
        self._groups: set[str] = set()  # streams whose group this object made sure of
        self._making: dict[str, asyncio.Future[None]] = {}  # groups being made sure of now
        self._reclaimed: dict[str, float] = {}  # stream -> when dead consumers' entries were last looked for

    def key(self, workflow: str) -> str:
        return f"{self._prefix}#q:{{{escape(workflow)}}}"

    async def _call(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        """``fn()``: through the wire's retries of a lost connection when there is a wire."""
        try:
            if self._wire is not None:
                return await self._wire.retrying(what, None, fn)
            return await fn()
        except redis_errors.ResponseError as exc:
            raise StoreError(f"Redis refused {what}: {exc}") from exc
        except (redis_errors.RedisError, OSError) as exc:
            raise StoreError(f"Redis {what} failed: {exc}") from exc

    async def _group(self, key: str) -> None:
        if key in self._groups:
            return
        making = self._making.get(key)
        if making is None:  # callers that come meanwhile wait for this one's answer
            making = self._making[key] = asyncio.ensure_future(self._make_group(key))
            making.add_done_callback(lambda _: self._making.pop(key, None))
        await asyncio.shield(making)

    async def _make_group(self, key: str) -> None:
        async def make() -> None:
            try:
                await self._client.xgroup_create(key, GROUP, id="0", mkstream=True)
            except redis_errors.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):  # made already (by anyone): what was wanted
                    raise

        await self._call(f"creating the queue {key}", make)
        self._groups.add(key)

    def stream(self, workflow: str) -> bytes:
        """The key of ``workflow``'s stream, for a script that queues an entry in it.

        Its consumer group need not exist yet: a worker makes it reading from the start
        of the stream (id 0), so what was queued before is delivered all the same.
        """
        return self.key(workflow).encode()

    async def enqueue(self, workflow: str, run_id: str) -> None:
        key = self.key(workflow)
        await self._group(key)
        wire = self._wire
        if wire is not None:
            command = [b"XADD", key.encode(), b"*", b"run", run_id.encode()]
            await self._call(f"queueing run {run_id}", lambda: wire.call([command]))
            return
        await self._call(f"queueing run {run_id}", lambda: self._client.xadd(key, {"run": run_id}))

    async def claim(self, workflows: Sequence[str], consumer: str, limit: int, wait: float) -> list[Claim]:
        if limit <= 0 or not workflows:
            return []
        names = {self.key(wf): wf for wf in workflows}
        for key in names:
            await self._group(key)
        out = await self._redeliver(names, consumer, limit)
        if out:
            return out
        deadline = time.monotonic() + wait
        while True:
            left = deadline - time.monotonic()
            if self._cluster or len(names) == 1:
                for key, wf in names.items():
                    block = left if len(names) == 1 else None
                    out += await self._read({key: wf}, consumer, limit - len(out), block)
                    if len(out) >= limit:
                        break
            else:
                out = await self._read(names, consumer, limit, left)
            if out or left <= 0:
                return out
            if self._cluster and len(names) > 1:
                await asyncio.sleep(min(left, POLL_INTERVAL))

    async def _read(
        self, names: dict[str, str], consumer: str, limit: int, block: float | None
    ) -> list[Claim]:
        block_ms = int(min(block, _BLOCK_MAX) * 1000) if block is not None and block > 0 else None
        streams = dict.fromkeys(names, ">")
        replies = await self._call(
            "reading the work queue",
            lambda: self._client.xreadgroup(GROUP, consumer, streams, count=limit, block=block_ms),
        )
        out: list[Claim] = []
        for key, entries in _streams(replies):
            wf = names[key]
            out += [_claim(wf, entry_id, fields) for entry_id, fields in entries if fields]
        return out

    async def _redeliver(self, names: dict[str, str], consumer: str, limit: int) -> list[Claim]:
        """Entries a dead consumer claimed and never acknowledged (looked for now and then)."""
        now = time.monotonic()
        idle = capabilities.REDELIVER_AFTER
        out: list[Claim] = []
        for key, wf in names.items():
            if now - self._reclaimed.get(key, 0.0) < min(idle / 4, 5.0) or len(out) >= limit:
                continue
            self._reclaimed[key] = now
            count = limit - len(out)

            async def take(key: str = key, count: int = count) -> Any:
                return await self._client.xautoclaim(
                    key, GROUP, consumer, int(idle * 1000), start_id="0-0", count=count
                )

            reply = await self._call("redelivering queue entries", take)
            entries = reply[1] if isinstance(reply, list | tuple) and len(reply) > 1 else []
            out += [_claim(wf, entry_id, fields) for entry_id, fields in entries if fields]
        return out

    async def ack(self, claims: Sequence[Claim]) -> None:
        by_key: dict[str, list[str]] = {}
        for c in claims:
            by_key.setdefault(self.key(c.workflow), []).append(c.receipt)
        wire = self._wire
        for key, ids in by_key.items():
            if wire is not None:  # one round trip, with whatever else is in flight (one key: one node)
                name, entries = key.encode(), [i.encode() for i in ids]
                commands = [[b"XACK", name, GROUP.encode(), *entries], [b"XDEL", name, *entries]]
                await self._call("acknowledging queue entries", functools.partial(wire.call, commands))
                continue

            async def done(key: str = key, ids: list[str] = ids) -> None:
                pipe = self._client.pipeline(transaction=False)  # one round trip (one key: one node)
                pipe.xack(key, GROUP, *ids)
                pipe.xdel(key, *ids)
                await pipe.execute()

            await self._call("acknowledging queue entries", done)

    async def queue_depth(self, workflow: str) -> QueueDepth:
        key = self.key(workflow)
        await self._group(key)
        groups = await self._call("reading the queue's depth", lambda: self._client.xinfo_groups(key))
        group = next((g for g in groups if _text(g.get("name")) == GROUP), None)
        if group is None:
            return QueueDepth(0, None)
        last = _text(group.get("last-delivered-id")) or "0-0"
        nxt = await self._call(
            "reading the queue's oldest entry", lambda: self._client.xrange(key, min=f"({last}", count=1)
        )
        lag = group.get("lag")
        if lag is None:  # the server cannot tell (entries were deleted): count them
            lag = len(
                await self._call("counting the queue", lambda: self._client.xrange(key, min=f"({last}"))
            )
        oldest = max(0.0, time.time() - _millis(_text(nxt[0][0])) / 1000) if nxt else None
        return QueueDepth(int(lag), oldest)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value) if value is not None else ""


def _millis(entry_id: str) -> int:
    return int(entry_id.split("-", 1)[0])


def _claim(workflow: str, entry_id: Any, fields: Any) -> Claim:
    entry = _text(entry_id)
    run = fields.get(b"run", fields.get("run"))
    return Claim(workflow, _text(run), entry, _millis(entry) / 1000)


def _streams(replies: Any) -> list[tuple[str, list[Any]]]:
    """``XREADGROUP``'s reply as ``(key, entries)`` pairs."""
    if not replies:
        return []
    pairs = replies.items() if isinstance(replies, dict) else replies
    return [(_text(key), list(entries)) for key, entries in pairs]
