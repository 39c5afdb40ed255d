"""The ``agentflow`` command: list, inspect and decide runs from a shell.

Workflows are found by importing a module (``Steward.discover``); the store each uses
comes from its own ``.persistence(...)``::

    agentflow runs myapp.flows --status waiting
    agentflow approvals myapp.flows --approver ops-lead   # what waits for them, newest first
    agentflow show myapp.flows 4f0c...           # the pending gate, with its review context
    agentflow approve myapp.flows 4f0c... --by ops-lead --comment "ship it"
    agentflow approve myapp.flows 4f0c... --by ops-lead --approval ap_91c2...   # one of several
    agentflow reject myapp.flows 4f0c... --by ops-lead --reason "tests are red"
    agentflow recover myapp.flows                # resume runs whose worker died
    agentflow worker myapp.flows --concurrency 100   # claim and advance runs until SIGTERM
    agentflow reviewers add myapp.flows ops-lead      # prints a token for the review page, once

A decided run continues in the deciding process, so ``approve`` and ``reject`` follow
the run, printing its events, until it finishes or parks again (``--no-follow`` returns
at once; a worker's ``recover()`` then picks the run up once its lease runs out).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from typing import Any

from ..errors import AgentflowError
from ..runner import RunHandle
from ..steward import Steward
from ..types import FINAL, RunInfo, RunStatus
from .lookup import _check_stores, _find
from .parser import _parser
from .reviewers import _reviewers
from .serve import _serve
from .worker import _work

__all__ = ["main"]

_PARKED = frozenset({RunStatus.WAITING, RunStatus.PAUSED}) | FINAL


def _info_json(info: RunInfo) -> dict[str, Any]:
    return {
        "run_id": info.run_id,
        "workflow": info.workflow,
        "status": info.status.value,
        "step": info.step,
        "pending": info.pending.to_json() if info.pending else None,
        "approvals": [a.to_json() for a in info.approvals],
        "error": {k: v for k, v in info.error.items() if k != "traceback"} if info.error else None,
        "usage": {"input_tokens": info.usage.input_tokens, "output_tokens": info.usage.output_tokens},
        "decisions": [
            {
                "approved": d.approved,
                "by": d.by,
                "comment": d.comment,
                "at": d.at.isoformat(),
                "approval": d.approval,
            }
            for d in info.decisions
        ],
        "created_at": info.created_at.isoformat(),
        "updated_at": info.updated_at.isoformat(),
    }


async def _follow(handle: RunHandle, out: Any) -> RunInfo:
    async for ev in handle.events():
        print(f"{ev.seq:>4} {ev.kind:<15} {ev.step or ''}", file=out, flush=True)
        if ev.kind in ("waiting", "paused"):
            info = await handle.info()
            # Parked at this very event (not at a later one the run has gone past).
            if info.status.value == ev.kind:
                return info
    return await handle.info()


async def _run(args: argparse.Namespace, out: Any) -> int:
    steward = Steward.discover(args.module)
    if not steward.workflows():
        raise AgentflowError(f"module {args.module!r} defines no Workflow")
    if args.command == "worker":
        return await _work(steward, args, out)
    if args.command == "reviewers":
        return await _reviewers(steward, args, out)
    if args.command == "serve":
        return await _serve(steward, args, out)
    if args.command != "describe":
        _check_stores(steward)
    try:
        if args.command == "describe":
            described = [steward.describe(w.name) for w in steward.workflows()]
            print(json.dumps(described, indent=2, default=str), file=out)
        elif args.command == "runs":
            for wf in steward.workflows():
                for info in await steward.runner(wf.name).list_runs(status=args.status):
                    when = info.updated_at.isoformat(timespec="seconds")
                    where = f"{info.workflow:<20} {info.status.value:<10} {info.step or '':<16}"
                    print(f"{info.run_id}  {where} {when}", file=out)
        elif args.command == "approvals":
            seen: set[str] = set()
            for wf in steward.workflows():
                page = await steward.runner(wf.name).approvals(
                    approver=args.approver, workflow=wf.name, kind=args.kind, limit=args.limit
                )
                for a in page:
                    if a.id in seen:
                        continue
                    seen.add(a.id)
                    if args.json:
                        print(json.dumps(a.to_json(), default=str), file=out)
                        continue
                    votes = f"{len(a.votes)}/{a.quorum}"
                    who = ",".join(a.approvers)
                    print(
                        f"{a.id}  {a.workflow:<20} {a.run_id}  {a.step or '':<12} {votes:>5}  {who}", file=out
                    )
                    if a.prompt:
                        print(f"    {a.prompt}", file=out)
        elif args.command == "show":
            _, handle = await _find(steward, args.run_id)
            print(json.dumps(_info_json(await handle.info()), indent=2, default=str), file=out)
        elif args.command in ("approve", "reject", "respond"):
            runner, handle = await _find(steward, args.run_id)
            if args.command == "approve":
                data = json.loads(args.data) if args.data else None
                await runner.approve(
                    args.run_id, by=args.by, approval=args.approval, comment=args.comment, data=data
                )
            elif args.command == "respond":
                await runner.respond(
                    args.run_id,
                    by=args.by,
                    approval=args.approval,
                    result=json.loads(args.result),
                    comment=args.comment,
                )
            else:
                await runner.reject(args.run_id, by=args.by, approval=args.approval, reason=args.reason)
            if args.follow:
                info = await _follow(handle, out)
                print(f"run {info.run_id} is {info.status.value}", file=out)
            else:
                info = await handle.info()
                if info.status in FINAL or info.status in _PARKED:
                    print(f"run {info.run_id} is {info.status.value}", file=out)
                else:
                    # This process exits now and releases the run: it is not advancing.
                    print(
                        f"run {info.run_id} was decided and waits for a worker to go on "
                        f"(agentflow recover {args.module})",
                        file=out,
                    )
        elif args.command in ("retry", "fork"):
            runner, _ = await _find(steward, args.run_id)
            if args.command == "retry":
                handle = await runner.retry(args.run_id)
            else:
                state = json.loads(args.state) if args.state else None
                handle = await runner.fork(args.run_id, at=args.at, state=state, run_id=args.new_run_id)
                print(f"forked run {args.run_id} at step {args.at!r} as run {handle.run_id}", file=out)
            if not args.follow:
                # This process exits now and releases the run: it is not advancing.
                print(
                    f"run {handle.run_id} waits for a worker to go on (agentflow recover {args.module})",
                    file=out,
                )
                return 0
            info = await _follow(handle, out)
            print(f"run {info.run_id} is {info.status.value}", file=out)
            if info.error:
                print(f"failed at step {info.error.get('step')!r}: {info.error.get('message')}", file=out)
            return 1 if info.status.value in ("failed", "rejected", "expired") else 0
        elif args.command == "recover":
            for wf in steward.workflows():
                runner = steward.runner(wf.name)
                handles = await runner.recover()
                for handle in handles:
                    print(f"recovered {handle.run_id} ({wf.name})", file=out)
                    await _follow(handle, out)
    finally:
        await steward.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``agentflow`` command; returns the exit status."""
    args = _parser().parse_args(argv)
    sys.path.insert(0, "")  # modules of the current directory, as ``python -m`` would
    try:
        return asyncio.run(_run(args, sys.stdout))
    except (AgentflowError, json.JSONDecodeError, ImportError) as exc:
        print(f"agentflow: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
