"""The store conformance suite, part three: the index of pending approvals (``Store.approvals``)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from ..errors import StoreError
from ..stores.contract import Change, Commit, RunRecord, Store, approval_id
from ..types import RunStatus
from .store_builders import event, record, started

__all__ = ["ApprovalConformance", "approval", "gate_pending"]


def approval(
    run_id: str,
    n: int = 0,
    created_at: float = 1000.0,
    approvers: tuple[str, ...] = ("ops",),
    kind: str = "gate",
    workflow: str = "wf",
) -> dict[str, Any]:
    """An Approval's JSON, as a run's ``pending`` holds it."""
    return {
        "id": approval_id(run_id, "Review", 1, n),
        "kind": kind,
        "run_id": run_id,
        "workflow": workflow,
        "step": "Review",
        "visit": 1,
        "approvers": list(approvers),
        "quorum": 1,
        "prompt": "Ship?",
        "context": {"n": n},
        "form": None,
        "deadline": None,
        "votes": [],
        "created_at": created_at,
        "agent": "coder" if kind != "gate" else None,
        "tool": "deploy" if kind != "gate" else None,
        "arguments": {"to": "prod"} if kind != "gate" else None,
    }


def gate_pending(*approvals: dict[str, Any]) -> dict[str, Any]:
    """A ``pending`` waiting for ``approvals``."""
    return {
        "kind": "gate",
        "workflow": "wf",
        "step": "Review",
        "visit": 1,
        "target": "Ship",
        "on_reject": None,
        "on_timeout": None,
        "on_fail": None,
        "since": 1000.0,
        "deadline": None,
        "approvals": list(approvals),
    }


async def _waiting(store: Store, run_id: str, *approvals: dict[str, Any], workflow: str = "wf") -> None:
    rec = record(run_id, workflow=workflow, status=RunStatus.WAITING, pending=gate_pending(*approvals))
    assert await store.create(rec, [])


def _ids(found: list[dict[str, Any]]) -> list[str]:
    return [a["id"] for a in found]


def _deciding(approval_id: str | None) -> Any:
    """An update dropping approval ``approval_id`` from ``pending`` (None: every one, and on)."""

    def change(rec: RunRecord, now: float) -> Change:
        if approval_id is None:
            return Change(dataclasses.replace(rec, status=RunStatus.RUNNING, pending=None))
        left = [a for a in rec.pending["approvals"] if a["id"] != approval_id]
        return Change(dataclasses.replace(rec, pending={**rec.pending, "approvals": left}))

    return change


class ApprovalConformance:
    """``Store.approvals``: newest first, paged, filtered, kept with each run's ``pending``."""

    async def test_approvals_are_listed_newest_first_and_paged(self, store: Store) -> None:
        a = approval("a", created_at=1001.0)
        b0, b1 = approval("b", 0, created_at=1003.0), approval("b", 1, created_at=1002.0)
        c = approval("c", created_at=1003.0)  # the same created_at as b0: the id breaks the tie
        await _waiting(store, "a", a)
        await _waiting(store, "b", b0, b1)
        await _waiting(store, "c", c)
        await store.create(record("d"), [])  # not waiting: nothing to list
        tie = sorted([b0, c], key=lambda x: x["id"], reverse=True)
        want = [*tie, b1, a]
        listed = await store.approvals()
        assert listed == want  # the stored JSON, as it was written
        pages, after = [], None
        while page := await store.approvals(limit=2, after=after):
            pages.append(_ids(page))
            after = page[-1]["id"]
        assert pages == [_ids(want[:2]), _ids(want[2:])]
        assert await store.approvals(limit=0) == []

    async def test_approvals_filtered_by_approver_workflow_and_kind(self, store: Store) -> None:
        ops = approval("r1", created_at=1001.0, approvers=("ops", "lead"))
        tool = approval("r2", created_at=1002.0, approvers=("lead",), kind="tool_call", workflow="other")
        dev = approval("r3", created_at=1003.0, approvers=("dev",), kind="tool_outcome")
        await _waiting(store, "r1", ops)
        await _waiting(store, "r2", tool, workflow="other")
        await _waiting(store, "r3", dev)
        assert _ids(await store.approvals(approver="lead")) == [tool["id"], ops["id"]]
        assert _ids(await store.approvals(approver="ops")) == [ops["id"]]
        assert _ids(await store.approvals(approver="nobody")) == []
        assert _ids(await store.approvals(workflow="wf")) == [dev["id"], ops["id"]]
        assert _ids(await store.approvals(workflow="other")) == [tool["id"]]
        assert _ids(await store.approvals(kind="tool_call")) == [tool["id"]]
        assert _ids(await store.approvals(kind="gate")) == [ops["id"]]
        assert _ids(await store.approvals(approver="lead", workflow="wf")) == [ops["id"]]
        assert _ids(await store.approvals(approver="lead", kind="tool_call", workflow="other")) == [
            tool["id"]
        ]
        assert _ids(await store.approvals(workflow="wf", kind="tool_outcome")) == [dev["id"]]

    async def test_a_commit_that_parks_a_run_files_its_approvals(self, store: Store) -> None:
        lease = await started(store)
        assert await store.approvals() == []
        a = approval("r1")
        fields = {"status": RunStatus.WAITING, "pending": gate_pending(a), "step": "Review"}
        await store.commit(
            "r1", lease, Commit(fields=fields, events=[event("waiting", 2)], release=True, seq=1)
        )
        assert _ids(await store.approvals(approver="ops", workflow="wf", kind="gate")) == [a["id"]]

    async def test_decided_approvals_leave_the_index_and_votes_show(self, store: Store) -> None:
        one, two = approval("r1", 0, created_at=1001.0), approval("r1", 1, created_at=1002.0)
        other = approval("r2", created_at=1000.0)
        await _waiting(store, "r1", one, two)
        await _waiting(store, "r2", other)

        def vote(rec: RunRecord, now: float) -> Change:
            voted = [{**x, "votes": ["ops"]} if x["id"] == one["id"] else x for x in rec.pending["approvals"]]
            return Change(dataclasses.replace(rec, pending={**rec.pending, "approvals": voted}))

        await store.update("r1", vote)
        listed = await store.approvals()
        assert _ids(listed) == [two["id"], one["id"], other["id"]] and listed[1]["votes"] == ["ops"]
        await store.update("r1", _deciding(two["id"]))
        assert _ids(await store.approvals()) == [one["id"], other["id"]]
        assert _ids(await store.approvals(approver="ops", kind="gate", workflow="wf")) == [
            one["id"],
            other["id"],
        ]
        await store.update("r1", _deciding(None))  # the last one decided: the run goes on
        assert _ids(await store.approvals()) == [other["id"]]
        assert _ids(await store.approvals(approver="ops")) == [other["id"]]
        # A run that leaves ``waiting`` with its pending left in place lists nothing.
        await store.update("r2", lambda rec, now: Change(dataclasses.replace(rec, status=RunStatus.STOPPED)))
        assert await store.approvals() == [] and await store.approvals(approver="ops", workflow="wf") == []

    async def test_a_page_goes_on_after_an_approval_decided_since(self, store: Store) -> None:
        made = [approval(f"r{i}", created_at=1000.0 + i) for i in range(5)]
        for a in made:
            await _waiting(store, a["run_id"], a)
        first = await store.approvals(limit=2)
        assert _ids(first) == [made[4]["id"], made[3]["id"]]
        await store.update("r3", _deciding(None))  # the reviewer decided the last one listed
        await store.update("r4", _deciding(None))
        assert _ids(await store.approvals(limit=2, after=made[3]["id"])) == [made[2]["id"], made[1]["id"]]
        await store.delete("r0")
        with pytest.raises(StoreError, match=made[0]["id"]):
            await store.approvals(after=made[0]["id"])

    async def test_deleted_and_finished_runs_leave_the_index(self, store: Store) -> None:
        a, b = approval("r1", created_at=1001.0), approval("r2", created_at=1002.0)
        await _waiting(store, "r1", a)
        await _waiting(store, "r2", b)
        assert await store.delete("r2")
        assert _ids(await store.approvals()) == [a["id"]]
        assert await store.approvals(approver="ops", workflow="wf", kind="gate") == [a]

        def finish(rec: RunRecord, now: float) -> Change:
            return Change(dataclasses.replace(rec, status=RunStatus.EXPIRED, pending=None))

        await store.update("r1", finish)  # a gate that timed out
        assert await store.approvals() == [] and await store.approvals(approver="ops") == []

    async def test_a_gate_stored_before_approvals_had_ids_is_listed(self, store: Store) -> None:
        old = {
            "kind": "human_approval",
            "approvers": ["ops"],
            "quorum": 2,
            "prompt": "Ship?",
            "context": None,
            "workflow": "wf",
            "step": "Review",
            "visit": 3,
            "since": 1234.5,
            "deadline": None,
            "approvals": ["ops"],
        }
        assert await store.create(record("r1", status=RunStatus.WAITING, pending=old), [])
        [listed] = await store.approvals(approver="ops")
        assert listed["id"] == approval_id("r1", "Review", 3) and listed["votes"] == ["ops"]
        assert (listed["run_id"], listed["workflow"], listed["created_at"]) == ("r1", "wf", 1234.5)
