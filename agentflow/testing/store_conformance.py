"""The store conformance suite: what every :class:`~agentflow.stores.Store` must do.

The contract is :mod:`agentflow.stores.contract`; these tests pin it. Subclass
:class:`StoreConformance` in a test module and give it a ``store_factory`` fixture: a
callable returning a fresh store; stores it makes within one test share their data (as
two processes would), and the fixture closes them after the test. Running the suite
needs pytest and pytest-asyncio (in strict mode, declare the fixture with
``pytest_asyncio.fixture``)::

    import pytest
    from agentflow.testing.store_conformance import StoreConformance

    class TestMyStore(StoreConformance):
        @pytest.fixture
        async def store_factory(self, tmp_path):
            made = []

            def make(**options):  # ttl=..., and key_prefix=... for the durable suite
                made.append(MyStore(tmp_path / "runs.db", **options))
                return made[-1]

            yield make
            for store in made:
                await store.close()

A store whose runs outlive the process and are shared by several processes subclasses
:class:`DurableStoreConformance` instead and also implements ``damage(store, run_id,
field, raw)``: overwrite one stored record field with ``raw``, the JSON text the field
should now hold (a store that keeps scalars natively stores the decoded value).

The suite compares values in their JSON form and assumes the store's clock is this
machine's within a minute. The builders below (``record``, ``event``, ``started``, ...)
are there for a store's own further tests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pydantic_core
import pytest
from pydantic import BaseModel

from ..errors import CorruptRecordError, LeaseLostError, StoreError
from ..stores.contract import Change, ChangeFn, Commit, Lease, OutputRecord, RunRecord, Store
from ..types import RunEvent, RunStatus

__all__ = [
    "BuildOutput",
    "DurableStoreConformance",
    "State",
    "StoreConformance",
    "StoreFactory",
    "acquire",
    "as_json",
    "event",
    "expire",
    "is_plain_json",
    "record",
    "same_record",
    "started",
    "store_now",
]

#: ``store_factory(**options)``: a fresh store sharing the test's data.
StoreFactory = Callable[..., Store]


# -- builders -------------------------------------------------------------------------


class State(BaseModel):
    """A run state model, as a workflow would declare one."""

    artifact: str | None = None
    count: int = 0


class BuildOutput(BaseModel):
    """A step output model."""

    artifact: str
    size: int


def as_json(value: Any) -> Any:
    """A value's JSON form: what a store gives back for it."""
    return json.loads(pydantic_core.to_json(value))


def is_plain_json(value: Any) -> bool:
    """True when ``value`` is made of JSON's types only (dict with str keys, list, scalars)."""
    if value is None or isinstance(value, bool | int | float | str):
        return True
    if isinstance(value, list):
        return all(is_plain_json(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and is_plain_json(v) for k, v in value.items())
    return False


def record(run_id: str = "r1", workflow: str = "wf", created_at: float = 1000.0, **fields: Any) -> RunRecord:
    """A new run's record (pending, with a ``State``), any field overridable."""
    return RunRecord(
        run_id=run_id,
        workflow=workflow,
        status=fields.pop("status", RunStatus.PENDING),
        input=fields.pop("input", {"repo": "acme/app"}),
        state=fields.pop("state", State()),
        created_at=created_at,
        updated_at=created_at,
        **fields,
    )


def event(kind: str, seq: int, step: str | None = None, data: Any = None) -> RunEvent:
    """An event of run ``r1`` (a store takes the run id and ``seq`` from where it stores it)."""
    return RunEvent(kind=kind, run_id="r1", step=step, data=data, at=1000.0 + seq, seq=seq)


async def acquire(store: Store, run_id: str = "r1", owner: str = "w1", ttl: float = 15.0) -> Lease:
    """Take the run's lease the way the runtime does: an update bumping the token."""

    def take(rec: RunRecord, now: float) -> Change:
        return Change(
            dataclasses.replace(
                rec,
                status=RunStatus.RUNNING,
                lease_owner=owner,
                lease_token=rec.lease_token + 1,
                lease_expires=now + ttl,
            )
        )

    rec = await store.update(run_id, take)
    assert rec is not None
    return Lease(owner, rec.lease_token)


async def started(store: Store, run_id: str = "r1", **fields: Any) -> Lease:
    """Create a run (one ``run_started`` event) and take its lease as ``w1``."""
    assert await store.create(record(run_id, **fields), [event("run_started", 1)])
    return await acquire(store, run_id)


async def expire(store: Store, run_id: str = "r1") -> None:
    """Make the run's lease run out a second ago, by the store's clock (its owner went silent)."""
    await store.update(run_id, lambda rec, now: Change(dataclasses.replace(rec, lease_expires=now - 1)))


async def store_now(store: Store, run_id: str = "r1") -> float:
    """The store's clock, as an ``update`` of ``run_id`` sees it (nothing is written)."""
    seen: list[float] = []
    await store.update(run_id, lambda rec, now: seen.append(now))
    assert seen, f"update of {run_id} did not call its change"
    return seen[-1]


def same_record(got: RunRecord | None, want: RunRecord | None, *skip: str) -> None:
    """Assert two records are equal field by field in JSON form, except ``skip``."""
    assert got is not None and want is not None
    for f in dataclasses.fields(RunRecord):
        if f.name not in skip:
            assert as_json(getattr(got, f.name)) == as_json(getattr(want, f.name)), f.name


def _ids(records: list[RunRecord]) -> list[str]:
    return [r.run_id for r in records]


def _writing(**fields: Any) -> ChangeFn:
    """An ``update`` change setting ``fields`` on the record."""
    return lambda rec, now: Change(dataclasses.replace(rec, **fields))


_PENDING_GATE = {"approvers": ["ops"], "deadline": None}


# -- the suite ------------------------------------------------------------------------


@pytest.mark.asyncio
class StoreConformance:
    """The contract every store keeps. Subclasses provide the ``store_factory`` fixture."""

    @pytest.fixture
    def store(self, store_factory: StoreFactory) -> Store:
        """A fresh store from the subclass's factory."""
        return store_factory()

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
        ("name", "value"), [("status", "sleeping"), ("visit", "many"), ("step", 3), ("control", 5)]
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


class DurableStoreConformance(StoreConformance):
    """The contract of a store whose runs outlive the process and are shared by processes.

    Subclasses also implement :meth:`damage`; the factory takes ``key_prefix``.
    """

    async def damage(self, store: Store, run_id: str, field: str, raw: str) -> None:
        """Overwrite the stored ``field`` of ``run_id``'s record with the JSON text ``raw``."""
        raise NotImplementedError(f"{type(self).__name__} must implement damage()")

    @pytest.mark.parametrize(
        ("field", "raw"), [("state", "{not json"), ("status", '"sleeping"'), ("visit", '"many"')]
    )
    async def test_a_damaged_record_fails_alone(self, store: Store, field: str, raw: str) -> None:
        await store.create(record("r0", created_at=900.0), [])
        await store.create(record("r1"), [])
        await store.create(record("r2", created_at=1100.0), [])
        await started(store, "x", created_at=1200.0)
        await expire(store, "x")
        await self.damage(store, "r1", field, raw)
        for read in (store.get, store.load):
            with pytest.raises(CorruptRecordError) as info:
                await read("r1")
            assert info.value.run_id == "r1" and field in info.value.key
        listed = {r.run_id: r for r in await store.list_runs()}
        assert sorted(listed) == ["r0", "r1", "r2", "x"]
        assert all(listed[run_id].corrupt is None for run_id in ("r0", "r2", "x"))
        if field not in ("input", "state", "output"):  # a light listing does not read those
            corrupt = listed["r1"].corrupt
            assert isinstance(corrupt, str) and corrupt
            error = listed["r1"].info().error
            assert error is not None and error["type"] == "CorruptRecordError"
        assert await store.recoverable("wf") == ["x"]
        rec = await store.get("r2")
        assert rec is not None and rec.status == RunStatus.PENDING

    async def test_two_store_instances_share_runs(self, store_factory: StoreFactory) -> None:
        first, second = store_factory(), store_factory()
        lease = await started(first)
        await first.commit("r1", lease, Commit(fields={"step": "B"}, seq=1))
        rec = await second.get("r1")
        assert rec is not None and rec.step == "B"
        await acquire(second, owner="w2")
        with pytest.raises(LeaseLostError):
            await first.commit("r1", lease, Commit(fields={"step": "C"}, seq=2))
        assert _ids(await first.list_runs(status=RunStatus.RUNNING)) == ["r1"]
        await expire(second)
        assert await first.recoverable("wf") == ["r1"]

    async def test_live_and_reloaded_values_are_equal(self, store_factory: StoreFactory) -> None:
        live, reloaded = store_factory(), store_factory()
        value = {"model": BuildOutput(artifact="a", size=1), "pair": (1, "x"), "f": 0.1, "big": 2**60}
        lease = await started(live, state=State(artifact="s"), input=value)
        await live.commit(
            "r1",
            lease,
            Commit(
                fields={"output": value, "step": "B"},
                outputs=[OutputRecord(1, "A", value)],
                events=[event("e", 2, data=value)],
                journal={"A/1": value},
                seq=1,
            ),
        )
        a, b = await live.load("r1"), await reloaded.load("r1")
        assert a is not None and b is not None
        assert dataclasses.asdict(a.record) == dataclasses.asdict(b.record)
        assert a.outputs == b.outputs and a.journal == b.journal
        assert await live.events("r1") == await reloaded.events("r1")
        assert a.record.input == as_json(value) == a.journal["A/1"]

    async def test_key_prefix_separates_namespaces(self, store_factory: StoreFactory) -> None:
        a, b = store_factory(key_prefix="a:"), store_factory(key_prefix="b:")
        await started(a)
        await expire(a)
        assert await b.get("r1") is None and await b.list_runs() == [] and await b.recoverable("wf") == []
        assert await b.create(record(), [])
        assert await a.delete("r1")
        assert await b.get("r1") is not None
        assert _ids(await b.list_runs()) == ["r1"] and await a.list_runs() == []
