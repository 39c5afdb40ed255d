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

A store with the optional ``Credentials`` capability adds :class:`CredentialConformance`
(or :class:`DurableCredentialConformance`) to the bases of its test class.

A store whose runs outlive the process and are shared by several processes subclasses
:class:`DurableStoreConformance` instead and also implements ``damage(store, run_id,
field, raw)``: overwrite one stored record field with ``raw``, the JSON text the field
should now hold (a store that keeps scalars natively stores the decoded value).

The suite compares values in their JSON form and assumes the store's clock is this
machine's within a minute. The builders below (``record``, ``event``, ``started``,
``approval``, ``gate_pending``, ...) are there for a store's own further tests.
"""

from __future__ import annotations

import dataclasses

import pytest

from ..errors import CorruptRecordError, LeaseLostError
from ..stores.contract import Commit, OutputRecord, Store
from ..types import RunStatus
from ._store_approvals import ApprovalConformance, approval, gate_pending
from ._store_credentials import CredentialConformance, DurableCredentialConformance
from ._store_reads import ReadConformance
from ._store_writes import WriteConformance
from .store_builders import (
    BuildOutput,
    State,
    StoreFactory,
    _ids,
    acquire,
    as_json,
    event,
    expire,
    is_plain_json,
    record,
    same_record,
    started,
    store_now,
)

__all__ = [
    "BuildOutput",
    "CredentialConformance",
    "DurableCredentialConformance",
    "DurableStoreConformance",
    "State",
    "StoreConformance",
    "StoreFactory",
    "acquire",
    "approval",
    "as_json",
    "event",
    "expire",
    "gate_pending",
    "is_plain_json",
    "record",
    "same_record",
    "started",
    "store_now",
]


@pytest.mark.asyncio
class StoreConformance(WriteConformance, ReadConformance, ApprovalConformance):
    """The contract every store keeps. Subclasses provide the ``store_factory`` fixture."""

    @pytest.fixture
    def store(self, store_factory: StoreFactory) -> Store:
        """A fresh store from the subclass's factory."""
        return store_factory()


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
