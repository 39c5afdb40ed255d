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
import os
import sys
from collections.abc import Sequence
from typing import Any

from .errors import AgentflowError
from .runner import RunHandle, WorkflowRunner
from .steward import Steward
from .stores.contract import Store
from .stores.memory import MemoryStore
from .types import FINAL, RunInfo, RunStatus
from .worker import Worker

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


async def _find(steward: Steward, run_id: str) -> tuple[WorkflowRunner, RunHandle]:
    for wf in steward.workflows():
        runner = steward.runner(wf.name)
        try:
            return runner, await runner.attach(run_id)
        except AgentflowError:
            continue
    raise AgentflowError(f"no run {run_id!r} in the stores of {[w.name for w in steward.workflows()]}")


async def _follow(handle: RunHandle, out: Any) -> RunInfo:
    async for ev in handle.events():
        print(f"{ev.seq:>4} {ev.kind:<15} {ev.step or ''}", file=out, flush=True)
        if ev.kind in ("waiting", "paused"):
            info = await handle.info()
            # Parked at this very event (not at a later one the run has gone past).
            if info.status.value == ev.kind:
                return info
    return await handle.info()


async def _work(steward: Steward, args: argparse.Namespace, out: Any) -> int:
    """Serve the module's workflows until SIGTERM / SIGINT, then say what was done."""
    worker = Worker(steward, concurrency=args.concurrency, grace=args.grace)
    names = ", ".join(w.name for w in steward.workflows())
    print(f"worker serving {names} (concurrency {args.concurrency}); stop with SIGTERM", file=out, flush=True)
    await worker.serve()
    stats = await worker.statistics()
    print(
        f"worker stopped: {stats.claimed} runs handed over, {stats.recovered} recovered, "
        f"{stats.dropped} queue entries dropped",
        file=out,
        flush=True,
    )
    return 0


def _check_stores(steward: Steward) -> None:
    """Reading runs never creates a store: a SQLite file that is not there is an error."""
    for info in steward.workflows():
        p = steward.get(info.name).compile().persistence
        if p is not None and p.enabled and p.store == "sqlite":
            path = os.path.abspath(p.path or "agentflow.db")
            if not os.path.exists(path):
                raise AgentflowError(
                    f"workflow {info.name!r} keeps its runs in {path}, which does not exist; "
                    "run the command from the folder the workflow runs in, or give the "
                    "workflow an absolute path= in .persistence()"
                )


async def _serve(steward: Steward, args: argparse.Namespace, out: Any) -> int:
    """Serve the review page of the module's workflows until SIGTERM / SIGINT."""
    import uvicorn

    from .review import HeaderAuth, TokenAuth, create_app

    auth: HeaderAuth | TokenAuth = TokenAuth()
    if args.auth == "header":
        secret = os.environ.get(args.header_secret_env or "", "")
        if not args.header or not secret:
            raise AgentflowError(
                "--auth header needs --header (the header the proxy names the user in) and "
                "--header-secret-env (an environment variable holding the secret the proxy sends "
                "in X-Agentflow-Secret), and that variable set"
            )
        auth = HeaderAuth(args.header, secret)
    app = create_app(steward, auth=auth, execute=not args.workers)
    config = uvicorn.Config(
        app, host=args.host, port=args.port, proxy_headers=True, timeout_graceful_shutdown=3, log_level="info"
    )
    names = ", ".join(w.name for w in steward.workflows())
    runs = "agentflow worker processes go on with decided runs" if args.workers else "decided runs go on here"
    print(f"review page of {names} on http://{args.host}:{args.port} ({runs})", file=out, flush=True)
    await uvicorn.Server(config).serve()
    return 0


def _review_store(steward: Steward) -> Store:
    """The store the module's workflows keep their runs in: their reviewers live there too.

    Raises:
        AgentflowError: the workflows use different stores, or keep runs in memory (the
            reviewers would be gone when the command exits).
    """
    places: dict[Any, list[str]] = {}
    for info in steward.workflows():
        p = steward.get(info.name).compile().persistence
        if p is None or not p.enabled or p.store == "memory" or isinstance(p.store, MemoryStore):
            raise AgentflowError(
                f"workflow {info.name!r} keeps its runs in memory, where reviewers would be gone when "
                "this command exits; give it a .persistence(store='sqlite' | 'redis' | 'postgres')"
            )
        if isinstance(p.store, str):
            path = os.path.abspath(p.path or "agentflow.db") if p.store == "sqlite" else None
            place: Any = (p.store, p.key_prefix, p.url, path)
        else:
            place = id(p.store)
        places.setdefault(place, []).append(info.name)
    if len(places) > 1:
        groups = "; ".join(", ".join(names) for names in places.values())
        raise AgentflowError(
            f"the workflows of the module keep their runs in different stores ({groups}), and reviewers "
            "live in one: serve and manage the reviewers of each store's workflows from a module of their own"
        )
    return steward.runner(steward.workflows()[0].name).store


async def _reviewers(steward: Steward, args: argparse.Namespace, out: Any) -> int:
    """``reviewers add | remove | list``: who may sign in to the review page (``serve``)."""
    from .review.reviewers import Reviewers

    if args.action != "add":
        _check_stores(steward)
    try:
        reviewers = Reviewers(_review_store(steward))
        if args.action == "add":
            token = await reviewers.add(args.name)
            print(
                f"token of reviewer {args.name!r}, to sign in to the review page; it will not be shown "
                f"again (`agentflow reviewers remove {args.module} {args.name}` revokes it):",
                file=out,
            )
            print(token, file=out)
        elif args.action == "remove":
            revoked = await reviewers.remove(args.name)
            if not revoked:
                print(f"agentflow: no reviewer {args.name!r}", file=sys.stderr)
                return 3
            print(f"revoked {revoked} token(s) of reviewer {args.name!r}", file=out)
        else:
            for name in await reviewers.names():
                print(name, file=out)
    finally:
        await steward.close()
    return 0


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


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="agentflow", description="List, inspect and decide agentflow runs.")
    sub = ap.add_subparsers(dest="command", required=True)

    def command(name: str, help: str, run_id: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("module", help="module that defines the workflows, e.g. myapp.flows")
        if run_id:
            p.add_argument("run_id")
        return p

    command("describe", "the workflows' schemas, steps and Mermaid charts")
    runs = command("runs", "list runs")
    runs.add_argument("--status", choices=[s.value for s in RunStatus])
    pending = command("approvals", "pending approvals, newest first")
    pending.add_argument("--approver", help="only those this person may decide")
    pending.add_argument("--kind", choices=["gate", "tool_call", "tool_outcome"])
    pending.add_argument("--limit", type=int, default=100, help="at most this many per workflow")
    pending.add_argument("--json", action="store_true", help="one Approval as JSON per line")
    command("show", "a run's status, pending gate (with its review context), decisions", run_id=True)
    decisions = (
        ("approve", "approve what a run waits for (a gate, a tool call)"),
        ("reject", "reject it"),
        ("respond", "answer a tool call with its result instead of running the tool"),
    )
    for name, help in decisions:
        p = command(name, help, run_id=True)
        p.add_argument("--by", required=True, help="the approver's name")
        p.add_argument("--approval", help="the approval's id (needed when the run waits for several)")
        if name == "approve":
            p.add_argument("--comment")
            p.add_argument(
                "--data",
                help="JSON: the reviewer's edit (a gate's form; {\"arguments\": {...}} for a tool call)",
            )
        elif name == "respond":
            p.add_argument("--result", required=True, help="JSON: what the model is told the call returned")
            p.add_argument("--comment")
        else:
            p.add_argument("--reason")
        p.add_argument(
            "--no-follow", dest="follow", action="store_false", help="return without following the run"
        )
    retry = command("retry", "continue a failed run at its failing step, and follow it", run_id=True)
    fork = command("fork", "start a new run from where a run reached a step, and follow it", run_id=True)
    fork.add_argument("--at", required=True, help="the step the new run starts at")
    fork.add_argument("--state", help="JSON: state fields merged into the state the run had there")
    fork.add_argument("--run-id", dest="new_run_id", help="the new run's id (default: a fresh one)")
    for p in (retry, fork):
        p.add_argument(
            "--no-follow", dest="follow", action="store_false", help="return without following the run"
        )
    command("recover", "resume runs whose owner died, and follow them")
    worker = command("worker", "claim runs of the module's workflows from their stores and advance them")
    worker.add_argument("--concurrency", type=int, default=100, help="runs advanced at once, at most")
    worker.add_argument(
        "--grace", type=float, default=30.0, help="seconds steps in flight get to finish on stop"
    )
    serve = command("serve", "serve the review page of the module's workflows (an inbox of approvals)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument(
        "--workers", action="store_true", help="hand decided runs to `agentflow worker` processes"
    )
    serve.add_argument(
        "--auth",
        choices=["token", "header"],
        default="token",
        help="token: reviewers sign in with `agentflow reviewers add` tokens; header: a proxy names them",
    )
    serve.add_argument("--header", help="--auth header: the header the proxy names the user in")
    serve.add_argument(
        "--header-secret-env", help="--auth header: the environment variable holding the proxy's secret"
    )
    reviewers = sub.add_parser("reviewers", help="who may sign in to the review page (agentflow serve)")
    actions = reviewers.add_subparsers(dest="action", required=True)
    for name, help in (
        ("add", "add a reviewer: prints a token to sign in with, once"),
        ("remove", "revoke every token of a reviewer"),
        ("list", "the reviewers holding a token"),
    ):
        p = actions.add_parser(name, help=help)
        p.add_argument("module", help="module that defines the workflows, e.g. myapp.flows")
        if name != "list":
            p.add_argument("name", help="the reviewer's name, as the approvers of gates name them")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``agentflow`` command; returns the exit status."""
    args = _parser().parse_args(argv)
    sys.path.insert(0, "")  # modules of the current directory, as ``python -m`` would
    try:
        return asyncio.run(_run(args, sys.stdout))
    except (AgentflowError, json.JSONDecodeError, ImportError) as exc:
        print(f"agentflow: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
