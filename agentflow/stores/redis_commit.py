"""The Redis store's writes of a run it holds the lease of: a step's commit and the lease's renewal.

The :class:`RedisCommits` methods of :class:`~agentflow.stores.redis.RedisStore`: each is
one Lua script in one round trip (see :mod:`agentflow.stores.lua`), with the index
entries a commit files sent in front of it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from ..errors import LeaseLostError, StoreError
from ..types import RunStatus
from . import lua
from .codec import check_commit_fields, deadline_of, decode, encode, encode_event, encode_output
from .contract import Commit, Lease, pending_approvals
from .keys import Keys
from .redis_approvals import Approvals
from .redis_index import Index
from .redis_known import KnownRuns
from .redis_wire import Command, IndexRefused, Packed, Wire, pack_args

__all__ = ["RedisCommits"]


class RedisCommits:
    """``commit`` and ``renew`` of :class:`~agentflow.stores.redis.RedisStore`."""

    keys: Keys
    _wire: Wire
    _index: Index
    _approvals: Approvals
    _known: KnownRuns
    _ttl_arg: bytes
    _nonce: Callable[[], bytes]

    async def commit(self, run_id: str, lease: Lease, commit: Commit) -> str | None:
        """Apply ``commit`` atomically (one Lua script, one round trip) if ``lease`` holds.

        Returns:
            The run's control flag (``"pause"``, ``"stop"`` or None).

        Raises:
            LeaseLostError: the lease no longer holds; nothing was written.
            StoreError: a value cannot be encoded (nothing was written), or Redis stayed
                unreachable for ``retry_for`` seconds (sending the commit again is safe).
        """
        fields = commit.fields
        check_commit_fields(run_id, fields)
        if commit.seq < 1:
            # A seq the record may already carry would make this commit pass for a retry.
            raise StoreError(
                f"run {run_id}: commit seq {commit.seq} is not a commit number; a commit carries the "
                "loaded record's commit_seq plus one per commit since"
            )
        known = self._known.get(run_id)
        status = RunStatus(fields["status"]) if "status" in fields else None
        gate = None
        approvals: list[dict[str, Any]] = []
        if "pending" in fields and (status or RunStatus.WAITING) == RunStatus.WAITING:
            gate = deadline_of(fields["pending"])
            approvals = pending_approvals(run_id, fields["pending"])
        events, outputs, journal = commit.events, commit.outputs, commit.journal
        args = [
            b"%d" % commit.seq,
            b"1" if commit.release else b"0",
            self._ttl_arg,
            b"",  # version, workflow, created_at: set below when the commit files index entries
            b"",
            b"",
            b"%d" % len(fields),
            b"%d" % len(events),
            b"%d" % len(outputs),
            b"%d" % len(journal),
        ]
        for name, value in fields.items():
            args += (name.encode(), encode(run_id, name, value))
        if events:
            args += [encode_event(run_id, e) for e in events]
        if outputs:
            args += [encode_output(run_id, o) for o in outputs]
        for k, v in journal.items():
            args += (k.encode(), encode(run_id, f"journal {k!r}", v))
        files = status is not None or gate is not None or bool(approvals)
        facts = known.facts
        if files and facts is None:
            facts = await self._known.read_facts(run_id, "commit")
        head = known.head_for(run_id, lease, lua.COMMIT.sha_bytes)
        for _ in range(3):
            version = self._nonce() if status is not None else b""
            index: list[Command] = []
            undo: list[Command] = []  # the entries filed here, should the commit not apply
            if files and facts is not None:
                workflow = str(decode(run_id, "workflow", facts[0]))
                if status is not None:
                    created_at = float(decode(run_id, "created_at", facts[1]))
                    index += self._index.file(run_id, status, workflow, created_at, version)
                    undo = self._index.unfile(run_id, status, workflow, version)
                if gate is not None:
                    index.append(self._index.file_gate(run_id, workflow, gate))
                if approvals:
                    filed = [{**a, "run_id": run_id, "workflow": workflow} for a in approvals]
                    index += self._approvals.file(run_id, workflow, filed)
                    undo += self._approvals.unfile(run_id, workflow, filed, decided=False)
                args[3:6] = (version, *facts)
            data = Packed(b"*%d" % (9 + len(args)) + head + pack_args(args) + b"\r\n", known.keys[0])
            try:
                replies = await self._wire.retrying(
                    "commit",
                    run_id,
                    functools.partial(self._wire.evalsha, lua.COMMIT, data, index),
                    known.rec,
                )
            except IndexRefused as exc:
                raise StoreError(
                    f"run {run_id}: Redis refused an index entry of the commit ({exc.error}); the commit "
                    "was applied, but listings may miss the run (look for an index key holding another type)"
                ) from exc.error
            reply = replies[-1]
            if reply == 3:  # applied; no control flag, no status left behind
                if commit.release:
                    self._known.forget(run_id)
                return None
            code = reply[0]
            if code == 4:  # filed under facts the record does not have: file again
                self._wire.defer(undo)
                facts = (reply[1], reply[2])
                self._known.remember(run_id, *facts)
                continue
            if commit.release:
                self._known.forget(run_id)
            if code in (0, 1):
                self._wire.defer(undo)
                detail = f"token {lease.token} is stale" if code == 1 else "the run no longer exists"
                raise LeaseLostError(run_id, detail)
            if code == 2 and reply[2] != version:  # applied before, by an earlier call
                self._wire.defer(undo)
            if code == 3 and undo and reply[3] != version:  # the entries the run leaves behind
                self._wire.defer(self._index.unfile_stored(run_id, workflow, *reply[2:4]))
            return self._control(run_id, reply[1])
        raise StoreError(f"run {run_id}: its workflow or created_at keep changing under the commit")

    def _control(self, run_id: str, raw: Any) -> str | None:
        if not raw or raw == b"null":
            return None
        value = decode(run_id, f"{self.keys.run(run_id).rec}[control]", raw)
        return value if isinstance(value, str) else None

    async def renew(self, run_id: str, lease: Lease, ttl: float) -> str | None:
        """Extend the lease to ``ttl`` seconds past the server's now (one round trip).

        Returns:
            The run's control flag.

        Raises:
            LeaseLostError: the lease no longer holds.
        """
        key = self.keys.run(run_id).rec
        args = [
            encode(run_id, "lease_owner", lease.owner),
            encode(run_id, "lease_token", lease.token),
            repr(float(ttl)).encode(),
        ]
        replies = await self._wire.retrying(
            "renew", run_id, lambda: self._wire.eval(lua.RENEW, [key.encode()], args), key
        )
        reply = replies[-1]
        if isinstance(reply, int):
            raise LeaseLostError(
                run_id, f"token {lease.token} is stale" if reply == 1 else "the run no longer exists"
            )
        return self._control(run_id, reply)
