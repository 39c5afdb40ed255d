"""The ``agentflow`` command's arguments."""

from __future__ import annotations

import argparse

from ..types import RunStatus


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
