"""The store conformance suite, part two: leases, recovery, reading, listing, expiry."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import pytest

from ..errors import LeaseLostError
from ..stores.contract import Change, Commit, Lease, OutputRecord, RunRecord, Store
from ..types import RunStatus
from .store_builders import (
    _PENDING_GATE,
    State,
    StoreFactory,
    _ids,
    acquire,
    event,
    expire,
    record,
    same_record,
    started,
    store_now,
)

__all__ = ["ReadConformance"]


class ReadConformance:
    """Leases and ``recoverable``; events, listings, due gates, delete, ttl, ``sibling``."""

    # -- leases -----------------------------------------------------------------------

    async def test_renew_extends_the_lease_from_now_and_returns_control(self, store: Store) -> None:
        lease = await started(store)
        t0 = await store_now(store)
        assert await store.renew("r1", lease, 100.0) is None
        t1 = await store_now(store)
        rec = await store.get("r1")
        assert rec is not None and t0 + 100 - 0.01 <= rec.lease_expires <= t1 + 100 + 0.01
        # From now, not from the previous expiry: a shorter ttl shortens the lease.
        t0 = await store_now(store)
        await store.renew("r1", lease, 1.0)
        t1 = await store_now(store)
        rec = await store.get("r1")
        assert rec is not None and t0 + 1 - 0.01 <= rec.lease_expires <= t1 + 1 + 0.01
        await store.update("r1", lambda r, now: Change(dataclasses.replace(r, control="pause")))
        assert await store.renew("r1", lease, 15.0) == "pause"
        assert await store.commit("r1", lease, Commit(fields={"step": "B"}, seq=1)) == "pause"
        assert await store.commit("r1", lease, Commit(fields={"control": None}, seq=2)) is None
        with pytest.raises(LeaseLostError):
            await store.renew("r1", Lease("w1", lease.token + 1), 15.0)
        with pytest.raises(LeaseLostError):
            await store.renew("r1", Lease("w2", lease.token), 15.0)

    async def test_release_clears_the_lease(self, store: Store) -> None:
        lease = await started(store)
        await store.commit(
            "r1",
            lease,
            Commit(fields={"status": RunStatus.WAITING, "pending": _PENDING_GATE}, release=True, seq=1),
        )
        rec = await store.get("r1")
        assert rec is not None
        assert (rec.lease_owner, rec.lease_expires, rec.status) == (None, 0.0, RunStatus.WAITING)
        assert rec.pending == _PENDING_GATE
        with pytest.raises(LeaseLostError):
            await store.commit("r1", lease, Commit(fields={"step": "B"}, seq=2))
        with pytest.raises(LeaseLostError):
            await store.renew("r1", lease, 15.0)

    async def test_recoverable_lists_exactly_running_runs_with_an_expired_lease(self, store: Store) -> None:
        await started(store, "expired", created_at=1.0)
        await expire(store, "expired")
        await started(store, "live", created_at=2.0)
        for run_id, status in (
            ("waiting", RunStatus.WAITING),
            ("paused", RunStatus.PAUSED),
            ("completed", RunStatus.COMPLETED),
            ("failed", RunStatus.FAILED),
        ):
            lease = await started(store, run_id)
            fields: dict[str, Any] = {"status": status}
            if status == RunStatus.WAITING:
                fields["pending"] = _PENDING_GATE
            await store.commit(run_id, lease, Commit(fields=fields, release=True, seq=1))
            await expire(store, run_id)  # a lease in the past does not make them running
        await store.create(record("pending"), [])
        await started(store, "elsewhere", workflow="other")
        await expire(store, "elsewhere")
        assert await store.recoverable("wf") == ["expired"]
        assert await store.recoverable("other") == ["elsewhere"]
        assert await store.recoverable("nobody") == []

    async def test_recoverable_follows_leases(self, store: Store) -> None:
        lease = await started(store)
        assert await store.recoverable("wf") == []
        await store.renew("r1", lease, 0.3)
        await store.renew("r1", lease, 100.0)  # the latest renewal counts
        await asyncio.sleep(0.5)
        assert await store.recoverable("wf") == []
        await store.renew("r1", lease, 0.2)
        await asyncio.sleep(0.4)  # the owner stopped renewing: the lease runs out by the store's clock
        assert await store.recoverable("wf") == ["r1"]
        new = await acquire(store, owner="w2")  # recovered: a fresh lease
        assert await store.recoverable("wf") == []
        await expire(store)
        assert await store.recoverable("wf") == ["r1"]
        await store.commit("r1", new, Commit(fields={"status": RunStatus.COMPLETED}, release=True, seq=1))
        assert await store.recoverable("wf") == []

    async def test_recoverable_honours_limit(self, store: Store) -> None:
        for i in range(5):
            await started(store, f"r{i}", created_at=1000.0 + i)
            await expire(store, f"r{i}")
        assert sorted(await store.recoverable("wf")) == [f"r{i}" for i in range(5)]
        some = await store.recoverable("wf", limit=2)
        assert len(some) == 2 and len(set(some)) == 2 and set(some) <= {f"r{i}" for i in range(5)}

    # -- reading ----------------------------------------------------------------------

    async def test_events_after(self, store: Store) -> None:
        lease = await started(store)
        await store.commit("r1", lease, Commit(events=[event(f"e{i}", i) for i in range(2, 6)], seq=1))
        assert [e.seq for e in await store.events("r1", after=0)] == [1, 2, 3, 4, 5]
        assert [e.kind for e in await store.events("r1", after=3)] == ["e4", "e5"]
        assert await store.events("r1", after=5) == []
        assert await store.events("r1", after=50) == []
        # A stored event's seq is its position, whatever the caller put there.
        await store.commit("r1", lease, Commit(events=[event("e6", 99)], seq=2))
        assert [(e.seq, e.kind) for e in await store.events("r1", after=5)] == [(6, "e6")]

    async def test_list_runs_is_newest_first_and_filters(self, store: Store) -> None:
        await store.create(record("b", "wf", created_at=200.0), [])
        await store.create(record("a", "wf", created_at=100.0), [])
        await store.create(record("c", "other", created_at=150.0), [])
        await store.create(record("d", "wf", created_at=300.0, status=RunStatus.COMPLETED), [])
        assert _ids(await store.list_runs()) == ["d", "b", "c", "a"]
        assert _ids(await store.list_runs("wf")) == ["d", "b", "a"]
        assert _ids(await store.list_runs("wf", RunStatus.COMPLETED)) == ["d"]
        assert _ids(await store.list_runs(status=RunStatus.PENDING)) == ["b", "c", "a"]
        assert _ids(await store.list_runs("other", RunStatus.PENDING)) == ["c"]
        assert await store.list_runs("other", RunStatus.COMPLETED) == []
        assert await store.list_runs("nobody") == []
        assert all(type(r.status) is RunStatus for r in await store.list_runs())

    async def test_list_runs_follows_status_changes(self, store: Store) -> None:
        lease = await started(store, "r1", created_at=1000.0)
        await store.create(record("r2", created_at=2000.0), [])
        assert _ids(await store.list_runs(status=RunStatus.RUNNING)) == ["r1"]
        assert _ids(await store.list_runs("wf", RunStatus.PENDING)) == ["r2"]
        await store.commit(
            "r1",
            lease,
            Commit(fields={"status": RunStatus.WAITING, "pending": _PENDING_GATE}, release=True, seq=1),
        )
        assert await store.list_runs(status=RunStatus.RUNNING) == []
        [waiting] = await store.list_runs("wf", RunStatus.WAITING)
        assert (waiting.run_id, waiting.status) == ("r1", RunStatus.WAITING)
        await store.update("r2", lambda r, now: Change(dataclasses.replace(r, status=RunStatus.PAUSED)))
        assert await store.list_runs(status=RunStatus.PENDING) == []
        assert _ids(await store.list_runs("wf", RunStatus.PAUSED)) == ["r2"]
        assert _ids(await store.list_runs("wf")) == ["r2", "r1"]

    async def test_list_runs_pages_without_duplicates_or_gaps(self, store: Store) -> None:
        statuses = (RunStatus.COMPLETED, RunStatus.PENDING, RunStatus.FAILED)
        made: dict[str, RunStatus] = {}
        for i in range(25):  # created_at ties in threes: the order must still be total
            run_id = f"run-{(i * 7) % 25:02}"
            made[run_id] = statuses[i % 3]
            await store.create(
                record(
                    run_id, "other" if i % 5 == 0 else "wf", created_at=1000.0 + i // 3, status=made[run_id]
                ),
                [],
            )
        filters: tuple[tuple[str | None, RunStatus | None], ...] = (
            (None, None),
            ("wf", None),
            (None, RunStatus.COMPLETED),
            ("wf", RunStatus.PENDING),
        )
        for workflow, status in filters:
            everything = await store.list_runs(workflow, status, limit=1000)
            assert everything, (workflow, status)
            times = [r.created_at for r in everything]
            assert times == sorted(times, reverse=True)
            for size in (1, 4, 7):
                pages: list[RunRecord] = []
                after: str | None = None
                while True:
                    page = await store.list_runs(workflow, status, limit=size, after=after)
                    assert len(page) <= size
                    if not page:
                        break
                    pages += page
                    after = page[-1].run_id
                assert _ids(pages) == _ids(everything), (workflow, status, size)
            assert all(
                (workflow is None or r.workflow == workflow) and (status is None or r.status == status)
                for r in everything
            )
        assert len(await store.list_runs(limit=5)) == 5
        assert sorted(_ids(await store.list_runs(limit=1000))) == sorted(made)

    async def test_list_runs_returns_100_by_default(self, store: Store) -> None:
        for i in range(101):
            await store.create(record(f"run-{i:03}", created_at=1000.0 + i), [])
        runs = await store.list_runs()
        assert len(runs) == 100 and runs[0].run_id == "run-100" and runs[-1].run_id == "run-001"

    async def test_listed_records_are_light(self, store: Store) -> None:
        rec = record(
            state=State(artifact="big", count=9),
            input={"repo": "acme/app"},
            output={"ok": True},
            step="B",
            visit=3,
            pending=_PENDING_GATE,
            decisions=({"approved": True, "by": "ops", "at": 1.5},),
            usage={"input_tokens": 3, "output_tokens": 4},
            error={"step": "B", "type": "ValueError", "message": "no"},
            control="pause",
        )
        await store.create(rec, [event("run_started", 1)])
        [listed] = await store.list_runs()
        assert (listed.input, listed.state, listed.output, listed.corrupt) == (None, None, None, None)
        same_record(listed, await store.get("r1"), "input", "state", "output")
        assert listed.info().run_id == "r1"

    async def test_due_gates(self, store: Store) -> None:
        now = time.time()
        for run_id, deadline in (("early", now - 10), ("late", now + 100), ("none", None)):
            lease = await started(store, run_id)
            pending = {"approvers": ["ops"], "deadline": deadline}
            await store.commit(
                run_id,
                lease,
                Commit(fields={"status": RunStatus.WAITING, "pending": pending}, release=True, seq=1),
            )
        await store.create(
            record("other-wf", "other", status=RunStatus.WAITING, pending={"deadline": now - 5}), []
        )
        assert await store.due_gates("wf", now) == ["early"]
        assert sorted(await store.due_gates("wf", now + 200)) == ["early", "late"]
        assert await store.due_gates("other", now) == ["other-wf"]
        # Decided: no longer waiting, so no longer due.
        await store.update(
            "early",
            lambda r, now: Change(dataclasses.replace(r, status=RunStatus.RUNNING, pending=None)),
        )
        assert await store.due_gates("wf", now + 200) == ["late"]

    async def test_delete(self, store: Store) -> None:
        lease = await started(store)
        await store.commit("r1", lease, Commit(outputs=[OutputRecord(1, "A", 1)], journal={"k": 1}, seq=1))
        await expire(store)
        assert await store.delete("r1")
        assert await store.get("r1") is None and await store.load("r1") is None
        assert await store.events("r1") == [] and await store.list_runs() == []
        assert await store.list_runs(status=RunStatus.RUNNING) == [] and await store.recoverable("wf") == []
        assert not await store.delete("r1")
        # The id is free again, with nothing left over from the deleted run.
        assert await store.create(record(), [])
        loaded = await store.load("r1")
        assert loaded is not None and loaded.outputs == [] and loaded.journal == {}
        assert await store.events("r1") == []
        assert _ids(await store.list_runs()) == ["r1"] and await store.recoverable("wf") == []

    async def test_ttl_expires_finished_runs(self, store_factory: StoreFactory) -> None:
        store = store_factory(ttl=0.5)
        lease = await started(store, "done")
        await started(store, "busy")
        await store.create(record("stopped"), [])
        await store.commit(
            "done", lease, Commit(fields={"status": RunStatus.COMPLETED}, events=[event("x", 3)], seq=1)
        )
        await store.update("stopped", lambda r, now: Change(dataclasses.replace(r, status=RunStatus.STOPPED)))
        assert await store.get("done") is not None
        await asyncio.sleep(0.7)
        assert _ids(await store.list_runs()) == ["busy"]  # unfinished runs stay
        assert await store.list_runs(status=RunStatus.COMPLETED) == []
        for run_id in ("done", "stopped"):
            assert await store.get(run_id) is None
            assert await store.load(run_id) is None
            assert await store.events(run_id) == []
        assert await store.create(record("done"), [])  # the id is free again
        assert await store.events("done") == []

    async def test_sibling_shares_the_runs_from_another_thread(self, store: Store) -> None:
        lease = await started(store)
        sibling = store.sibling()
        if sibling is None:
            return  # leases are renewed on the event loop: nothing more to check
        assert sibling is not store

        async def renew_there() -> str | None:
            try:
                rec = await sibling.get("r1")
                assert rec is not None and rec.lease_token == lease.token
                return await sibling.renew("r1", lease, 60.0)
            finally:
                await sibling.close()

        assert await asyncio.to_thread(asyncio.run, renew_there()) is None
        t = await store_now(store)
        rec = await store.get("r1")  # the store itself still works
        assert rec is not None and rec.lease_expires > t + 30
