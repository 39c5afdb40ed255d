"""Builders for store tests: records, events, leases taken as the engine takes them.

Shared by :mod:`agentflow.testing.store_conformance` and by a store's own tests.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import pydantic_core
from pydantic import BaseModel

from ..stores.contract import Change, ChangeFn, Lease, RunRecord, Store
from ..types import RunEvent, RunStatus

__all__ = [
    "BuildOutput",
    "State",
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


# -- builders -------------------------------------------------------------------------


class State(BaseModel):
    """A run state model, as a workflow would declare one."""

    artifact: str | None = None
    count: int = 0


class BuildOutput(BaseModel):
    """A step output model."""

    artifact: str
    size: int


#: ``store_factory(**options)``: a fresh store sharing the test's data.
StoreFactory = Callable[..., Store]


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
