"""The Redis store's update: a whole record read, changed and written back atomically.

One attempt is WATCH / HMGET / TIME on a connection of its own, ``change(record, now)``
with the server's clock, then the change's index entries and MULTI ... EXEC: two round
trips (on a cluster, the entries go to their own nodes in between, confirmed before the
write: three). A conflict (another writer between the read and EXEC) runs the change
again on the fresh record. The write leaves a nonce in
``_write``, so a retry after a lost EXEC reply recognises its own write instead of
applying the change twice.

Also here, the record's form in its hash (one JSON string per field) both ways.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Callable
from typing import Any

from ..errors import StoreError
from ..types import FINAL
from .codec import RECORD_FIELDS, check_record, decode, encode, encode_event, make_record
from .contract import Change, ChangeFn, RunRecord, indexed_approvals
from .keys import Keys, RunKeys
from .redis_approvals import Approvals
from .redis_index import Index
from .redis_wire import Command, Wire

__all__ = ["Updates", "hash_of", "record_of"]

_MAX_CONFLICTS = 1000  # update attempts lost to concurrent writers before giving up
_READ = (*RECORD_FIELDS, "_write", "_ix")  # what update reads


def hash_of(rec: RunRecord) -> dict[str, bytes]:
    """The record's fields as its hash stores them.

    Raises:
        StoreError: a field cannot be stored (names the run and field).
    """
    check_record(rec)
    run_id = rec.run_id
    return {name: encode(run_id, name, getattr(rec, name)) for name in RECORD_FIELDS}


def record_of(run_id: str, key: str, raw: dict[Any, Any]) -> RunRecord:
    """The record read from its hash ``key`` (fields as bytes or str; ``_`` fields ignored).

    Raises:
        CorruptRecordError: a field cannot be read (names the run and key).
    """
    values = {}
    for field, value in raw.items():
        name = field.decode() if isinstance(field, bytes) else str(field)
        if not name.startswith("_") and value is not None:
            values[name] = decode(run_id, f"{key}[{name}]", value)
    return make_record(run_id, key, values)


class Updates:
    """Runs ``update`` for a store.

    Args:
        wire: the store's round trips.
        index: the store's indexes.
        keys: the store's key builder.
        ttl: seconds a finished run is kept, or None.
        nonce: makes a value no other write of any store uses.
        remember: ``remember(run_id, workflow, created_at)`` with what a read saw (JSON).
        approvals: the store's approval index.
    """

    def __init__(
        self,
        wire: Wire,
        index: Index,
        keys: Keys,
        ttl: float | None,
        nonce: Callable[[], bytes],
        remember: Callable[[str, Any, Any], None],
        approvals: Approvals,
    ) -> None:
        self.wire = wire
        self.index = index
        self.keys = keys
        self.ttl_ms = max(1, int(ttl * 1000)) if ttl is not None else None
        self.nonce = nonce
        self.remember = remember
        self.approvals = approvals

    async def update(self, run_id: str, change: ChangeFn) -> RunRecord | None:
        """Read-modify-write the record; ``change(record, now)`` with the server's clock.

        ``change`` runs again after a conflict, and after a lost reply unless the retry
        finds that the first attempt applied.
        """
        keys = self.keys.run(run_id)
        nonce = self.nonce()
        sent: dict[str, Any] = {}  # what the last EXEC sent wrote, for a retry after a lost reply
        for attempt in range(_MAX_CONFLICTS):
            done, result, cleanup = await self.wire.retrying(
                "update", run_id, lambda: self._once(run_id, keys, change, nonce, sent), keys.rec
            )
            self.wire.defer(cleanup)
            if done:
                return result
            # Someone wrote in between: run the change again on the fresh record.
            await asyncio.sleep(random.random() * 0.001 * min(attempt, 20))
        raise StoreError(f"run {run_id}: update gave up after {_MAX_CONFLICTS} conflicting writes")

    async def _once(
        self, run_id: str, keys: RunKeys, change: ChangeFn, nonce: bytes, sent: dict[str, Any]
    ) -> tuple[bool, RunRecord | None, list[Command]]:
        """One WATCH ... EXEC attempt: whether it is done, its result, and the clean-ups to queue.

        The clean-ups drop the entries the write made stale, or (after a conflict) the
        entries filed for a write that did not apply.
        """
        wire = self.wire
        rec_key = keys.rec.encode()
        async with wire.connection(rec_key) as conn:
            watch = [[b"WATCH", rec_key], [b"HMGET", rec_key, *(f.encode() for f in _READ)], [b"TIME"]]
            _, values, (sec, usec) = wire.checked(await wire.exchange(conn, watch))
            raw = {name: value for name, value in zip(_READ, values, strict=True) if value is not None}
            try:
                if sent and raw.get("_write") == nonce:  # the last EXEC applied, its reply was lost
                    await wire.exchange(conn, [[b"UNWATCH"]])
                    return True, sent["record"], sent["stale"]
                if not raw:
                    await wire.exchange(conn, [[b"UNWATCH"]])
                    return True, None, []
                self.remember(run_id, raw.get("workflow"), raw.get("created_at"))
                old = record_of(run_id, keys.rec, raw)
                now = int(sec) + int(usec) / 1e6
                result = change(old, now)
                if result is None:
                    await wire.exchange(conn, [[b"UNWATCH"]])
                    return True, old, []
                index, commands, rec, undo, stale = self._commands(run_id, keys, old, raw, result, now, nonce)
            except BaseException:
                await wire.exchange(conn, [[b"UNWATCH"]])
                raise
            sent.update(record=rec, stale=stale)
            replies = await wire.transact(conn, index, commands)
            if replies[-1] is None:  # EXEC refused: the record changed since WATCH
                sent.clear()
                return False, None, undo
            return True, rec, stale

    def _commands(
        self,
        run_id: str,
        keys: RunKeys,
        old: RunRecord,
        raw: dict[str, bytes],
        result: Change,
        now: float,
        nonce: bytes,
    ) -> tuple[list[Command], list[Command], RunRecord, list[Command], list[Command]]:
        """The index entries and the transaction writing ``result``; the record written; the
        clean-ups for failure and for success."""
        rec = result.written_over(old, now)
        mapping: dict[str, bytes] = {**hash_of(rec), "_write": nonce}
        events = [encode_event(run_id, e) for e in result.events]
        version = self.nonce() if rec.status != old.status or "_ix" not in raw else None
        if version is not None:
            mapping["_ix"] = version
        index, undo, stale = self.index.moved(old, raw.get("status"), raw.get("_ix"), rec, version)
        old_approvals, new_approvals = indexed_approvals(old), indexed_approvals(rec)
        if old_approvals or new_approvals:
            filed, unfiled, decided = self.approvals.moved(run_id, rec.workflow, old_approvals, new_approvals)
            index, undo, stale = [*index, *filed], [*undo, *unfiled], [*stale, *decided]
        commands: list[Command] = [[b"MULTI"]]
        rec_key = keys.rec.encode()
        commands.append(
            [b"HSET", rec_key, *itertools.chain.from_iterable((k.encode(), v) for k, v in mapping.items())]
        )
        if events:
            commands.append([b"RPUSH", keys.events.encode(), *events])
        if self.ttl_ms is not None and rec.status in FINAL:
            commands += [[b"PEXPIRE", k.encode(), b"%d" % self.ttl_ms] for k in keys]
        elif rec.status != old.status:
            commands += [[b"PERSIST", k.encode()] for k in keys]
        commands.append([b"PUBLISH", self.keys.changes().encode(), rec_key])  # wake watchers elsewhere
        commands.append([b"EXEC"])
        return index, commands, rec, undo, stale
