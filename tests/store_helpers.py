"""Builders shared by the store tests: records, events, and taking a lease like the engine."""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import pydantic_core
from pydantic import BaseModel

from agentflow.records import RunEvent, RunRecord, RunStatus
from agentflow.stores import Change, Lease, Store


class State(BaseModel):
    artifact: str | None = None
    count: int = 0


class BuildOutput(BaseModel):
    artifact: str
    size: int


def js(value: Any) -> Any:
    """A value's JSON form, which is what a durable store gives back."""
    return json.loads(pydantic_core.to_json(value))


def record(run_id: str = "r1", workflow: str = "wf", created_at: float = 1000.0, **fields: Any) -> RunRecord:
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
    return RunEvent(kind=kind, run_id="r1", step=step, data=data, at=1000.0 + seq, seq=seq)


async def acquire(store: Store, run_id: str = "r1", owner: str = "w1") -> Lease:
    """Take the run's lease the way the engine does: an update bumping the token."""

    def take(rec: RunRecord) -> Change:
        return Change(
            dataclasses.replace(
                rec,
                status=RunStatus.RUNNING,
                lease_owner=owner,
                lease_token=rec.lease_token + 1,
                lease_expires=time.time() + 15,
            )
        )

    rec = await store.update(run_id, take)
    assert rec is not None
    return Lease(owner, rec.lease_token)


async def started(store: Store, run_id: str = "r1", **fields: Any) -> Lease:
    assert await store.create(record(run_id, **fields), [event("run_started", 1)])
    return await acquire(store, run_id)


def same_record(got: RunRecord | None, want: RunRecord, *skip: str) -> None:
    assert got is not None
    for f in dataclasses.fields(RunRecord):
        if f.name not in skip:
            assert js(getattr(got, f.name)) == js(getattr(want, f.name)), f.name
