"""Starting, listing, showing and deleting runs: ``run``, ``runs``, ``show``, ``events``, ``delete``."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..errors import InvalidInputError
from ..runner import WorkflowRunner
from ..steward import Steward
from ..stores.memory import MemoryStore
from ..types import RunInfo, RunStatus
from .follow import Follower, describe_usage, exit_code
from .lookup import UsageError, check_stores, find_run, runners
from .output import STATUS_STYLE, Output, dumps

__all__ = ["delete", "events", "info_json", "list_runs", "run", "show"]


def info_json(info: RunInfo, traceback: bool = False) -> dict[str, Any]:
    """A run's info as JSON (``--json``); the error's traceback only with ``traceback``."""
    error = info.error
    if error and not traceback:
        error = {k: v for k, v in error.items() if k != "traceback"}
    return {
        "run_id": info.run_id,
        "workflow": info.workflow,
        "version": info.version,
        "status": info.status.value,
        "step": info.step,
        "pending": info.pending.to_json() if info.pending else None,
        "approvals": [a.to_json() for a in info.approvals],
        "error": error,
        "usage": info.usage.to_json(),
        "decisions": [
            {
                "approved": d.approved,
                "by": d.by,
                "comment": d.comment,
                "at": d.at.isoformat(),
                "approval": d.approval,
                "data": d.data,
                "timed_out": d.timed_out,
            }
            for d in info.decisions
        ],
        "parent": info.parent._asdict() if info.parent else None,
        "children": list(info.children),
        "created_at": info.created_at.isoformat(),
        "updated_at": info.updated_at.isoformat(),
    }


def parse_json(text: str | None, option: str) -> Any:
    """The JSON value an option was given (None when it was not).

    Raises:
        UsageError: the text is not JSON (naming the option and where the text goes wrong).
    """
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"{option} is not JSON ({exc}); give it JSON text, e.g. {option} '{{\"key\": 1}}'"
        ) from None


async def run(steward: Steward, args: argparse.Namespace, out: Output) -> int:
    """``run MODULE WORKFLOW --input JSON [--follow]``: start a run.

    Without ``--follow`` the run is handed to the workers serving the workflow
    (``agentflow worker``) and its id printed; with it, the run advances in this
    process, its steps printed live, until it ends or parks. A workflow that keeps its
    runs in memory is always followed (no other process could advance it).
    """
    [runner] = runners(steward, args.workflow)
    data = parse_json(args.input, "--input")
    in_memory = isinstance(runner.store, MemoryStore)
    try:
        if args.follow or in_memory:
            handle = await runner.run(data, run_id=args.run_id)
            info = await Follower(out, args.module).follow(handle)
            return exit_code(info)
        async with WorkflowRunner(runner.workflow, store=runner.store, execute=False) as client:
            handle = await client.run(data, run_id=args.run_id)
            info = await handle.info()
    except InvalidInputError as exc:
        hint = f"; `agentflow describe {args.module} --workflow {args.workflow}` shows the input it takes"
        raise InvalidInputError(f"{exc}{hint}", exc.errors) from None
    if out.json:
        out.document(info_json(info))
    else:
        out.line(
            f"run {info.run_id} of {info.workflow} is {info.status.value}: a worker takes it up "
            f"(`agentflow worker {args.module}`); `agentflow events {args.module} {info.run_id} --follow` "
            "watches it"
        )
    return 0


async def list_runs(steward: Steward, args: argparse.Namespace, out: Output) -> int:
    """``runs MODULE [--status S] [--workflow W] [--limit N] [--json]``: runs, newest first."""
    check_stores(steward)
    found: list[RunInfo] = []
    for runner in runners(steward, args.workflow):
        found += await runner.list_runs(status=args.status, workflow=runner.spec.name, limit=args.limit)
    found.sort(key=lambda i: i.created_at, reverse=True)
    found = found[: args.limit]
    if out.json:
        for info in found:
            out.json_line(info_json(info))
        return 0
    rows, styles = [], []
    for info in found:
        waiting = ""
        if info.pending is not None:
            waiting = ",".join(info.pending.approvers) or "anyone"
        rows.append(
            [
                info.run_id,
                info.workflow,
                info.status.value,
                info.step or "",
                waiting,
                describe_usage(info.usage),
                info.updated_at.isoformat(timespec="seconds"),
            ]
        )
        styles.append(STATUS_STYLE.get(info.status.value))
    columns = ["RUN", "WORKFLOW", "STATUS", "STEP", "APPROVERS", "USAGE", "UPDATED"]
    out.table(columns, rows, styles, empty="no runs")
    return 0


async def show(steward: Steward, args: argparse.Namespace, out: Output) -> int:
    """``show MODULE RUN [--json]``: a run's whole record.

    Input, state, output, the error with its traceback, the approvals it waits for,
    the decisions taken, usage, and its parent and children.
    """
    check_stores(steward)
    runner, handle = await find_run(steward, args.run_id)
    info = await handle.info()
    rec = await runner.store.get(handle.run_id)
    stored = {"input": rec.input, "state": rec.state, "output": rec.output} if rec else {}
    if out.json:
        out.document({**info_json(info, traceback=True), **stored})
        return 0
    pairs = [
        ("run", info.run_id),
        ("workflow", f"{info.workflow} (version {info.version})"),
        ("status", info.status.value),
        ("step", info.step or "-"),
        ("created", info.created_at.isoformat(timespec="seconds")),
        ("updated", info.updated_at.isoformat(timespec="seconds")),
        ("usage", describe_usage(info.usage) or "no tokens"),
    ]
    if info.parent:
        pairs.append(("parent", f"{info.parent.run_id} (step {info.parent.step})"))
    if info.children:
        pairs.append(("children", ", ".join(info.children)))
    out.fields(pairs)
    for key in ("input", "state", "output"):
        if stored.get(key) is not None:
            out.value(key, stored[key])
    if info.error:
        err = info.error
        text = f"{err.get('type')} at step {err.get('step')!r}: {err.get('message')}"
        out.block("error", text + ("\n" + err["traceback"].rstrip() if err.get("traceback") else ""))
    if info.approvals:
        rows = [
            [
                a.id,
                a.kind,
                a.step or "",
                ", ".join(a.approvers) or "anyone",
                f"{len(a.votes)}/{a.quorum}",
                a.prompt or (f"call {a.tool}({dumps(a.arguments)})" if a.tool else ""),
            ]
            for a in info.approvals
        ]
        out.table(["APPROVAL", "KIND", "STEP", "APPROVERS", "VOTES", "ASKS"], rows, title="waits for")
        for a in info.approvals:
            if a.context is not None:
                out.value(f"context of {a.id}", a.context)
    if info.decisions:
        rows = [
            [
                d.at.isoformat(timespec="seconds"),
                "approved" if d.approved else ("timed out" if d.timed_out else "rejected"),
                d.by or "",
                d.comment or "",
                dumps(d.data) if d.data is not None else "",
            ]
            for d in info.decisions
        ]
        out.table(["DECIDED", "OUTCOME", "BY", "COMMENT", "DATA"], rows, title="decisions")
    return 0


async def events(steward: Steward, args: argparse.Namespace, out: Output) -> int:
    """``events MODULE RUN [--follow] [--json]``: a run's history; live with ``--follow``.

    Without ``--follow`` the stored events are printed and the command returns; with
    it, it goes on printing as the run advances (in whichever process) until the run
    is final, and exits as ``run --follow`` does.
    """
    check_stores(steward)
    runner, handle = await find_run(steward, args.run_id)
    follower = Follower(out, args.module)
    if args.follow:
        return exit_code(await follower.follow(handle, until_parked=False))
    for ev in await runner.store.events(handle.run_id):
        follower.event(ev)
    if not out.json:
        info = await handle.info()
        style = STATUS_STYLE.get(info.status.value, "")
        text = f"run {info.run_id} is {info.status.value}"
        out.line(text, f"[{style}]{text}[/{style}]" if style else None)
    return 0


async def delete(steward: Steward, args: argparse.Namespace, out: Output) -> int:
    """``delete MODULE RUN``: remove a run and everything stored with it (its child runs too)."""
    check_stores(steward)
    runner, handle = await find_run(steward, args.run_id)
    await runner.delete(handle.run_id)
    if out.json:
        out.document({"run_id": handle.run_id, "deleted": True})
    else:
        out.line(f"deleted run {handle.run_id}")
    return 0


#: Statuses ``runs --status`` accepts.
STATUSES = [s.value for s in RunStatus]
