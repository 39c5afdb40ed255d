"""The ``agentflow`` command's arguments: one subcommand per thing done to runs."""

from __future__ import annotations

import argparse
from importlib.metadata import PackageNotFoundError, version
from typing import NoReturn

from ..types import RunStatus

__all__ = ["parser"]

_RUN_ID = "the run's id, or a prefix of it that no other run starts with"


def _version() -> str:
    try:
        return version("agentflow-core")
    except PackageNotFoundError:  # a source tree that was not installed
        return "unknown"


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line naming the help to read (exit 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"agentflow: usage error: {message}; see `{self.prog} --help`\n")


def parser() -> argparse.ArgumentParser:
    """The parser of every subcommand (a usage error exits 2 with one line on stderr)."""
    ap = _Parser(
        prog="agentflow",
        description="Start, watch, decide and steer agentflow runs.",
        epilog="Exit status: 0 done, 1 the run failed or was rejected, 2 a usage or input error, "
        "3 not found.",
    )
    ap.add_argument("--version", action="version", version=f"agentflow {_version()}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, help: str, run_id: bool = False, json: str | None = None
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("module", help="module that defines the workflows, e.g. myapp.flows")
        if run_id:
            p.add_argument("run_id", metavar="RUN", help=_RUN_ID)
        if json:
            p.add_argument("--json", action="store_true", help=json)
        return p

    def follows(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--no-follow", dest="follow", action="store_false", help="return without following the run"
        )

    start = command("run", "start a run (handed to a worker; --follow runs it here, live)")
    start.add_argument("workflow", metavar="WORKFLOW", help="the workflow's name (see `agentflow describe`)")
    start.add_argument("--input", help="JSON: the run's input")
    start.add_argument(
        "--run-id", help="the run's id (default: a fresh one); an existing run is not restarted"
    )
    start.add_argument("--follow", action="store_true", help="advance the run here, printing its steps live")
    start.add_argument(
        "--json", action="store_true", help="the run's info as JSON (with --follow: its events)"
    )

    runs = command("runs", "list runs, newest first", json="one run as JSON per line")
    runs.add_argument("--status", choices=[s.value for s in RunStatus])
    runs.add_argument("--workflow", help="only this workflow's runs")
    runs.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")

    command(
        "show",
        "a run: input, state, output, error and traceback, approvals, decisions, usage",
        run_id=True,
        json="the run as one JSON document",
    )
    events = command("events", "a run's history of events", run_id=True, json="one event as JSON per line")
    events.add_argument("--follow", action="store_true", help="go on printing live until the run is final")
    command("delete", "remove a run and everything stored with it", run_id=True, json="the result as JSON")

    pending = command("approvals", "pending approvals, newest first", json="one Approval as JSON per line")
    pending.add_argument("--approver", help="only those this person may decide")
    pending.add_argument("--kind", choices=["gate", "tool_call", "tool_outcome"])
    pending.add_argument("--workflow", help="only this workflow's")
    pending.add_argument("--limit", type=int, default=100, help="at most this many per workflow")
    decisions = (
        ("approve", "approve what a run waits for (a gate, a tool call), and follow the run"),
        ("reject", "reject what a run waits for, and follow the run"),
        ("respond", "answer a tool call with its result instead of running the tool"),
    )
    for name, help in decisions:
        p = command(name, help, run_id=True, json="the run's status as JSON (with --no-follow)")
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
        follows(p)

    command("pause", "park a run once its step in flight finishes", run_id=True, json="its status as JSON")
    follows(command("resume", "continue a paused run here, and follow it", run_id=True, json="as JSON"))
    command("stop", "stop a run (final): its step in flight is cancelled", run_id=True, json="as JSON")
    retry = command("retry", "continue a failed run at its failing step, and follow it", run_id=True)
    fork = command("fork", "start a new run from where a run reached a step, and follow it", run_id=True)
    fork.add_argument("--at", required=True, help="the step the new run starts at")
    fork.add_argument("--state", help="JSON: state fields merged into the state the run had there")
    fork.add_argument("--run-id", dest="new_run_id", help="the new run's id (default: a fresh one)")
    for p in (retry, fork):
        follows(p)
        p.add_argument("--json", action="store_true", help="the run's status (or events) as JSON")
    command("recover", "resume runs whose owner died, and follow them", json="their events as JSON lines")

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

    check = command(
        "check",
        "before a deploy: list the runs not final that this code could not load (exit 1 when any)",
        json="one incompatible run as JSON per line",
    )
    check.add_argument("--workflow", help="only this workflow's runs")
    describe = command(
        "describe", "the workflows' steps, schemas and Mermaid charts", json="one JSON array of them"
    )
    describe.add_argument("--workflow", help="only this workflow")
    return ap
