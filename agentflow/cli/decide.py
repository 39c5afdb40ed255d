"""Deciding what runs wait for: ``approvals``, ``approve``, ``reject``, ``respond``.

A decided run continues in the deciding process, so a decision follows the run,
printing its steps, until it finishes or parks again (``--no-follow`` returns at once;
a worker's ``recover()`` then picks the run up once its lease runs out).
"""

from __future__ import annotations

import argparse

from ..steward import Steward
from ..types import FINAL, RunStatus
from .follow import Follower
from .lookup import check_stores, find_run, runners
from .output import Output, dumps
from .runs import parse_json

__all__ = ["approvals", "decide"]

_PARKED = frozenset({RunStatus.WAITING, RunStatus.PAUSED}) | FINAL


async def approvals(steward: Steward, args: argparse.Namespace, out: Output) -> int:
    """``approvals MODULE [--approver A] [--kind K] [--limit N] [--json]``: pending, newest first."""
    check_stores(steward)
    seen: set[str] = set()
    rows: list[list[str]] = []
    for runner in runners(steward, getattr(args, "workflow", None)):
        name = runner.spec.name
        page = await runner.approvals(approver=args.approver, workflow=name, kind=args.kind, limit=args.limit)
        for a in page:
            if a.id in seen:
                continue
            seen.add(a.id)
            if out.json:
                out.json_line(a.to_json())
                continue
            asks = a.prompt or (f"call {a.tool}({dumps(a.arguments)})" if a.tool else "")
            rows.append(
                [
                    a.id,
                    a.workflow,
                    a.run_id,
                    a.step or "",
                    f"{len(a.votes)}/{a.quorum}",
                    ",".join(a.approvers),
                    asks,
                ]
            )
    if not out.json and rows:
        out.table(["APPROVAL", "WORKFLOW", "RUN", "STEP", "VOTES", "APPROVERS", "ASKS"], rows)
    return 0


async def decide(steward: Steward, args: argparse.Namespace, out: Output) -> int:
    """``approve`` / ``reject`` / ``respond MODULE RUN --by NAME``: decide, then follow the run.

    Exits 1 when the run failed after the decision (0 when it completed, parked again,
    or was rejected by this very decision).
    """
    check_stores(steward)
    runner, handle = await find_run(steward, args.run_id)
    run_id = handle.run_id
    if args.command == "approve":
        data = parse_json(args.data, "--data")
        await runner.approve(run_id, by=args.by, approval=args.approval, comment=args.comment, data=data)
    elif args.command == "respond":
        result = parse_json(args.result, "--result")
        await runner.respond(run_id, by=args.by, approval=args.approval, result=result, comment=args.comment)
    else:
        await runner.reject(run_id, by=args.by, approval=args.approval, reason=args.reason)
    if args.follow:
        info = await Follower(out, args.module).follow(handle)
        return 1 if info.status == RunStatus.FAILED else 0
    info = await handle.info()
    if info.status in _PARKED:
        text = f"run {info.run_id} is {info.status.value}"
    else:
        # This process exits now and releases the run: it is not advancing.
        text = (
            f"run {info.run_id} was decided and waits for a worker to go on (agentflow recover {args.module})"
        )
    if out.json:
        out.json_line({"run_id": info.run_id, "status": info.status.value})
    else:
        out.line(text)
    return 0
