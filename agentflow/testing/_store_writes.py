"""The store conformance suite, part one: creating, committing and updating runs."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from datetime import UTC, datetime
from typing import Any

import pytest

from ..errors import LeaseLostError, StoreError
from ..stores.contract import Change, Commit, Lease, OutputRecord, RunRecord, Store
from ..types import RunStatus
from .store_builders import (
    BuildOutput,
    State,
    _writing,
    acquire,
    as_json,
    event,
    is_plain_json,
    record,
    same_record,
    started,
)

__all__ = ["WriteConformance"]


class WriteConformance:
    """Create, get and load; commits (once-only, fenced, refusing what cannot be stored); update."""

    # -- create / get / load ----------------------------------------------------------

    async def test_create_is_idempotent(self, store: Store) -> None:
        assert await store.create(record(), [event("run_started", 1)])
        assert not await store.create(record(state=State(artifact="other")), [event("run_started", 1)])
        rec = await store.get("r1")
        assert rec is not None and rec.state == {"artifact": None, "count": 0}
        assert rec.event_count == 1
        assert [e.kind for e in await store.events("r1")] == ["run_started"]

    async def test_missing_run(self, store: Store) -> None:
        assert await store.get("nope") is None
        assert await store.load("nope") is None
        assert await store.events("nope") == []
        assert await store.update("nope", lambda rec, now: Change(rec)) is None
        assert not await store.delete("nope")
        with pytest.raises(LeaseLostError, match="nope"):
            await store.commit("nope", Lease("w1", 1), Commit(fields={"step": "A"}, seq=1))
        with pytest.raises(LeaseLostError):
            await store.renew("nope", Lease("w1", 1), 15)
        assert await store.list_runs() == [] and await store.recoverable("wf") == []

    async def test_round_trip(self, store: Store) -> None:
        rec = record(
            state=State(artifact="out.tar", count=3),
            input={"repo": "acme/app", "tags": [1, 2.5, None, "x"], "nested": {"ok": True}},
            step="Build",
            visit=4,
            pending={"approvers": ["ops"], "deadline": None},
            decisions=({"approved": True, "by": "ops", "at": 1.5},),
            usage={"input_tokens": 3, "output_tokens": 4},
            error={"step": "Build", "type": "ValueError", "message": 'é ☃ \x00 "quoted"'},
            output=[1, "two"],
            control="pause",
        )
        assert await store.create(rec, [event("run_started", 1)])
        got = await store.get("r1")
        same_record(got, dataclasses.replace(rec, event_count=1))
        assert got is not None
        assert type(got.status) is RunStatus and got.status == RunStatus.PENDING
        assert isinstance(got.decisions, tuple) and got.corrupt is None
        loaded = await store.load("r1")
        assert loaded is not None
        same_record(loaded.record, dataclasses.replace(rec, event_count=1))
        assert loaded.outputs == [] and loaded.journal == {}

    async def test_values_come_back_as_plain_json(self, store: Store) -> None:
        value = {
            "model": State(artifact="a", count=2),
            "tuple": (1, 2.5),
            "when": datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
            "nested": [{"x": (None, True)}],
            "text": 'é ☃ \x00 "q"',
        }
        want = as_json(value)
        lease = await started(store, input=value, state=value)
        await store.commit(
            "r1",
            lease,
            Commit(
                fields={"output": value, "pending": value, "decisions": (value,), "error": value},
                outputs=[OutputRecord(1, "A", value)],
                events=[event("step_completed", 2, "A", value)],
                journal={"A/1": value},
                seq=1,
            ),
        )
        loaded = await store.load("r1")
        assert loaded is not None
        rec = loaded.record
        events = await store.events("r1")
        got = [rec.input, rec.state, rec.output, rec.pending, rec.decisions[0], rec.error]
        got += [loaded.outputs[0].value, loaded.journal["A/1"], events[1].data]
        for i, item in enumerate(got):
            assert item == want and is_plain_json(item), i
        # What comes back is the caller's: changing it changes nothing stored.
        rec.state["text"] = "changed"
        rec.decisions[0]["model"]["count"] = 99
        loaded.journal["A/1"]["tuple"].append(3)
        again = await store.load("r1")
        assert again is not None
        assert again.record.state == want and again.record.decisions[0] == want
        assert again.journal["A/1"] == want

    async def test_parent_and_children_round_trip(self, store: Store) -> None:
        parent = {"run_id": "p1", "step": "Fan", "visit": 3, "index": 2}
        assert await store.create(record("p1/Fan.3.2", parent=parent), [])
        child = await store.get("p1/Fan.3.2")
        assert child is not None and child.parent == parent and child.children == ()
        lease = await started(store, "p1")
        fresh = await store.get("p1")
        assert fresh is not None and fresh.parent is None and fresh.children == ()
        await store.commit("p1", lease, Commit(fields={"children": ("p1/Fan.3.0",)}, seq=1))
        await store.commit("p1", lease, Commit(fields={"children": ("p1/Fan.3.0", "p1/Fan.3.1")}, seq=2))
        loaded = await store.load("p1")
        assert loaded is not None
        assert loaded.record.children == ("p1/Fan.3.0", "p1/Fan.3.1")
        assert type(loaded.record.children) is tuple
        listed = {r.run_id: r for r in await store.list_runs()}  # light records keep both
        assert listed["p1/Fan.3.2"].parent == parent and listed["p1"].children == loaded.record.children
        # An update keeps them unless it changes them.
        await store.update("p1", _writing(step="B"))
        rec = await store.get("p1")
        assert rec is not None and rec.children == ("p1/Fan.3.0", "p1/Fan.3.1")
        await store.update("p1", lambda r, now: Change(dataclasses.replace(r, children=(*r.children, "x"))))
        rec = await store.get("p1")
        assert rec is not None and rec.children == ("p1/Fan.3.0", "p1/Fan.3.1", "x")
        child = await store.get("p1/Fan.3.2")
        assert child is not None and child.parent == parent
        with pytest.raises(StoreError, match=r"run c1\b.*'children'"):
            await store.create(record("c1", children=("a", 1)), [])

    async def test_the_workflow_version_round_trips(self, store: Store) -> None:
        """A run records its workflow version; a commit moves it on (a migration); "1" by default."""
        assert await store.create(record("v1"), []) and await store.create(record("v3", version="3"), [])
        assert [(await store.get(r)).version for r in ("v1", "v3")] == ["1", "3"]  # type: ignore[union-attr]
        lease = await started(store, "m")
        await store.commit("m", lease, Commit(fields={"version": "2", "state": {"count": 9}}, seq=1))
        loaded = await store.load("m")
        assert loaded is not None and (loaded.record.version, loaded.record.state) == ("2", {"count": 9})
        listed = {r.run_id: r.version for r in await store.list_runs()}  # light records keep it
        assert listed == {"v1": "1", "v3": "3", "m": "2"}
        await store.update("m", _writing(step="B"))
        assert (await store.get("m")).version == "2"  # type: ignore[union-attr]
        with pytest.raises(StoreError, match=r"run m\b.*'version'"):
            await store.commit("m", lease, Commit(fields={"version": 2}, seq=2))

    # -- commit -----------------------------------------------------------------------

    async def test_commit_applies_fields_outputs_events_and_journal(self, store: Store) -> None:
        lease = await started(store)
        before = await store.get("r1")
        assert before is not None
        commit = Commit(
            fields={"state": State(artifact="out.tar", count=1), "step": "Test", "visit": 1},
            outputs=[OutputRecord(1, "Build", BuildOutput(artifact="out.tar", size=42))],
            events=[event("step_started", 2, "Build"), event("step_completed", 3, "Build", {"ms": 5})],
            journal={"Build/agent/1": {"text": "hi", "usage": [1, 2]}},
            seq=1,
        )
        assert await store.commit("r1", lease, commit) is None
        loaded = await store.load("r1")
        assert loaded is not None
        rec = loaded.record
        assert rec.state == {"artifact": "out.tar", "count": 1}
        assert (rec.step, rec.visit, rec.event_count, rec.status) == ("Test", 1, 3, RunStatus.RUNNING)
        assert rec.updated_at >= before.updated_at
        assert rec.lease_owner == "w1" and rec.lease_token == lease.token  # a commit keeps the lease
        assert rec.lease_expires == before.lease_expires  # and does not extend it
        assert (rec.commit_token, rec.commit_seq) == (lease.token, 1)
        assert [(o.visit, o.step, o.value) for o in loaded.outputs] == [
            (1, "Build", {"artifact": "out.tar", "size": 42})
        ]
        assert loaded.journal == {"Build/agent/1": {"text": "hi", "usage": [1, 2]}}
        events = await store.events("r1")
        assert [(e.seq, e.kind, e.step, e.data, e.run_id) for e in events] == [
            (1, "run_started", None, None, "r1"),
            (2, "step_started", "Build", None, "r1"),
            (3, "step_completed", "Build", {"ms": 5}, "r1"),
        ]
        # A second commit appends and overwrites journal keys.
        await store.commit(
            "r1",
            lease,
            Commit(
                fields={"status": RunStatus.COMPLETED, "output": {"ok": True}},
                outputs=[OutputRecord(2, "Test", None)],
                journal={"Build/agent/1": "replaced", "Test/1": 7},
                seq=2,
            ),
        )
        loaded = await store.load("r1")
        assert loaded is not None
        assert loaded.record.status == RunStatus.COMPLETED and loaded.record.event_count == 3
        assert loaded.record.commit_seq == 2
        assert [o.step for o in loaded.outputs] == ["Build", "Test"]
        assert loaded.journal == {"Build/agent/1": "replaced", "Test/1": 7}

    async def test_retried_commit_applies_once_despite_another_writer(self, store: Store) -> None:
        lease = await started(store)
        commit = Commit(
            fields={"state": State(count=1), "step": "B", "visit": 1},
            outputs=[OutputRecord(1, "A", {"x": 1})],
            events=[event("step_completed", 2, "A")],
            journal={"A/1": "reply"},
            seq=1,
        )
        assert await store.commit("r1", lease, commit) is None
        # The reply was lost; before the retry, someone else asks the run to pause.
        await store.update(
            "r1",
            lambda rec, now: Change(
                dataclasses.replace(rec, control="pause"), [event("pause_requested", rec.event_count + 1)]
            ),
        )
        assert await store.commit("r1", lease, commit) == "pause"
        loaded = await store.load("r1")
        assert loaded is not None
        assert [o.step for o in loaded.outputs] == ["A"]
        assert loaded.journal == {"A/1": "reply"}
        assert [e.kind for e in await store.events("r1")] == [
            "run_started",
            "step_completed",
            "pause_requested",
        ]
        rec = loaded.record
        assert (rec.event_count, rec.control, rec.step) == (3, "pause", "B")
        assert (rec.commit_token, rec.commit_seq) == (lease.token, 1)
        # The next commit applies.
        assert await store.commit(
            "r1", lease, Commit(fields={"step": "C"}, events=[event("x", 4)], seq=2)
        ) == ("pause")
        rec2 = await store.get("r1")
        assert rec2 is not None and (rec2.step, rec2.event_count, rec2.commit_seq) == ("C", 4, 2)

    async def test_an_update_leaves_the_commits_fence_as_it_was(self, store: Store) -> None:
        lease = await started(store)
        commit = Commit(fields={"step": "B", "visit": 1}, events=[event("step_completed", 2, "A")], seq=1)
        assert await store.commit("r1", lease, commit) is None
        # A change made from an older read (or by mistake) names another fence: it is not written.
        stale = await store.update(
            "r1",
            lambda rec, now: Change(dataclasses.replace(rec, control="stop", commit_token=0, commit_seq=0)),
        )
        assert stale is not None and (stale.commit_token, stale.commit_seq) == (lease.token, 1)
        assert await store.commit("r1", lease, commit) == "stop"  # still known for a retry: not applied again
        rec = await store.get("r1")
        assert rec is not None and (rec.commit_token, rec.commit_seq, rec.event_count) == (lease.token, 1, 2)

    async def test_retried_releasing_commit_returns_without_the_lease(self, store: Store) -> None:
        lease = await started(store)
        final = Commit(
            fields={"status": RunStatus.COMPLETED, "output": {"ok": True}},
            events=[event("completed", 2)],
            release=True,
            seq=1,
        )
        assert await store.commit("r1", lease, final) is None
        await store.update("r1", lambda rec, now: Change(dataclasses.replace(rec, control="stop")))
        # The first attempt dropped the lease, yet its retry is recognised, not refused.
        assert await store.commit("r1", lease, final) == "stop"
        rec = await store.get("r1")
        assert rec is not None and (rec.status, rec.event_count) == (RunStatus.COMPLETED, 2)
        assert len(await store.events("r1")) == 2

    async def test_commit_with_stale_token_writes_nothing(self, store: Store) -> None:
        old = await started(store)
        assert await store.commit("r1", old, Commit(fields={"step": "B"}, seq=1)) is None
        new = await acquire(store, owner="w2")  # recovered elsewhere
        assert new.token == old.token + 1
        before = await store.load("r1")
        commit = Commit(
            fields={"step": "Evil", "visit": 99},
            outputs=[OutputRecord(9, "Evil", 1)],
            events=[event("step_started", 2)],
            journal={"k": 1},
            release=True,
            seq=2,
        )
        for lease in (old, Lease("w1", new.token), Lease("w2", old.token)):
            with pytest.raises(LeaseLostError, match="r1"):
                await store.commit("r1", lease, commit)
        after = await store.load("r1")
        assert before is not None and after is not None
        same_record(after.record, before.record)
        assert after.outputs == [] and after.journal == {}
        assert len(await store.events("r1")) == 1
        # The new owner's commit has the seq of one the old owner made: another token, so it applies.
        assert await store.commit("r1", new, Commit(fields={"step": "C"}, seq=1)) is None
        rec = await store.get("r1")
        assert rec is not None and (rec.step, rec.commit_token, rec.commit_seq) == ("C", new.token, 1)

    @pytest.mark.parametrize(
        "name",
        ["lease_owner", "lease_token", "lease_expires", "commit_seq", "event_count", "run_id", "nonsense"],
    )
    async def test_commit_refuses_a_field_outside_commit_fields(self, store: Store, name: str) -> None:
        lease = await started(store)
        before = await store.load("r1")
        commit = Commit(
            fields={"step": "B", name: 1},
            outputs=[OutputRecord(1, "A", 1)],
            events=[event("step_completed", 2)],
            journal={"k": 1},
            seq=1,
        )
        with pytest.raises(StoreError, match=rf"run r1\b.*'{name}'") as info:
            await store.commit("r1", lease, commit)
        assert not isinstance(info.value, LeaseLostError)
        await self._assert_untouched(store, before)

    @pytest.mark.parametrize(
        ("name", "value"),
        [("status", "sleeping"), ("visit", "many"), ("step", 3), ("control", 5), ("children", ("c1", 2))],
    )
    async def test_commit_refuses_a_badly_typed_scalar(self, store: Store, name: str, value: Any) -> None:
        lease = await started(store)
        before = await store.load("r1")
        with pytest.raises(StoreError, match=rf"run r1\b.*'{name}'"):
            await store.commit("r1", lease, Commit(fields={"step": "B", name: value}, seq=1))
        await self._assert_untouched(store, before)

    async def test_a_value_that_is_not_json_is_refused_before_anything_is_written(self, store: Store) -> None:
        bad = {"x": object()}
        with pytest.raises(StoreError, match=r"run r1\b.*'state'"):
            await store.create(record(state=bad), [])
        with pytest.raises(StoreError, match=r"run r1\b"):
            await store.create(record(), [event("run_started", 1, data=bad)])
        assert await store.get("r1") is None and await store.list_runs() == []
        lease = await started(store)
        before = await store.load("r1")
        commits = [
            Commit(fields={"step": "B", "state": bad}, events=[event("x", 2)], seq=1),
            Commit(fields={"step": "B"}, outputs=[OutputRecord(1, "Build", bad)], seq=1),
            Commit(fields={"step": "B"}, events=[event("x", 2, data=bad)], seq=1),
            Commit(fields={"step": "B"}, journal={"ok": 1, "Build/1": bad}, seq=1),
            Commit(fields={"step": "B", "pending": bad}, outputs=[OutputRecord(1, "A", 1)], seq=1),
        ]
        for commit in commits:
            with pytest.raises(StoreError, match=r"run r1\b") as info:
                await store.commit("r1", lease, commit)
            assert not isinstance(info.value, LeaseLostError)
            await self._assert_untouched(store, before)
        with pytest.raises(StoreError, match=r"run r1\b.*'state'"):
            await store.update("r1", lambda r, now: Change(dataclasses.replace(r, step="B", state=bad)))
        with pytest.raises(StoreError, match=r"run r1\b"):
            await store.update(
                "r1", lambda r, now: Change(dataclasses.replace(r, step="B"), [event("x", 2, data=bad)])
            )
        await self._assert_untouched(store, before)
        # The run goes on: the same commit without the bad value applies.
        assert await store.commit("r1", lease, Commit(fields={"step": "B"}, seq=1)) is None

    async def test_a_badly_typed_record_scalar_is_refused(self, store: Store) -> None:
        with pytest.raises(StoreError, match=r"run r1\b.*'visit'"):
            await store.create(record(visit="many"), [])
        assert await store.get("r1") is None
        await started(store)
        before = await store.load("r1")
        bad: tuple[tuple[str, Any], ...] = (("status", "sleeping"), ("lease_token", "1"), ("lease_owner", 7))
        for name, value in bad:
            with pytest.raises(StoreError, match=rf"run r1\b.*'{name}'"):
                await store.update("r1", _writing(step="B", **{name: value}))
            await self._assert_untouched(store, before)

    @staticmethod
    async def _assert_untouched(store: Store, before: Any) -> None:
        after = await store.load("r1")
        assert before is not None and after is not None
        same_record(after.record, before.record)
        assert after.outputs == before.outputs and after.journal == before.journal
        assert len(await store.events("r1")) == before.record.event_count

    # -- update -----------------------------------------------------------------------

    async def test_update_semantics(self, store: Store) -> None:
        await store.create(record(), [event("run_started", 1)])
        unchanged = await store.update("r1", lambda rec, now: None)
        assert unchanged is not None and unchanged.event_count == 1

        def boom(rec: RunRecord, now: float) -> Change:
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"):
            await store.update("r1", boom)
        same_record(await store.get("r1"), unchanged)

        def decide(rec: RunRecord, now: float) -> Change:
            decisions = (*rec.decisions, {"approved": True, "by": "ops"})
            return Change(
                dataclasses.replace(rec, decisions=decisions, step="Next"),
                [event("decided", rec.event_count + 1)],
            )

        written = await store.update("r1", decide)
        assert written is not None and written.event_count == 2
        assert written.updated_at >= unchanged.updated_at
        assert written.decisions == ({"approved": True, "by": "ops"},) and written.state == unchanged.state
        again = await store.update("r1", decide)
        assert again is not None
        got = await store.get("r1")
        assert got is not None
        assert got.decisions == ({"approved": True, "by": "ops"},) * 2
        assert (got.step, got.event_count) == ("Next", 3)
        assert [e.seq for e in await store.events("r1")] == [1, 2, 3]

    async def test_update_gets_the_store_clock(self, store: Store) -> None:
        await store.create(record(), [])
        seen: list[float] = []

        def touch(rec: RunRecord, now: float) -> Change:
            seen.append(now)
            return Change(dataclasses.replace(rec, step="B"))

        before = time.time()
        written = await store.update("r1", touch)
        after = time.time()
        assert seen and all(isinstance(now, int | float) for now in seen)
        assert before - 60 < seen[-1] < after + 60  # Unix seconds
        assert written is not None and written.updated_at == pytest.approx(seen[-1], abs=1.0)

    async def test_concurrent_updates_serialize(self, store: Store) -> None:
        await store.create(record(), [])

        def bump(rec: RunRecord, now: float) -> Change:
            return Change(dataclasses.replace(rec, visit=rec.visit + 1), [event("bump", rec.event_count + 1)])

        await asyncio.gather(*(store.update("r1", bump) for _ in range(20)))
        rec = await store.get("r1")
        assert rec is not None and rec.visit == 20 and rec.event_count == 20
        assert [e.seq for e in await store.events("r1")] == list(range(1, 21))
