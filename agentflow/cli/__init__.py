"""The ``agentflow`` command (also ``python -m agentflow``): start, watch, decide and steer runs.

Workflows are found by importing a module (``Steward.discover``); the store each uses
comes from its own ``.persistence(...)``::

    agentflow run myapp.flows Release --input '{"repo": "acme/app"}' --follow   # live steps
    agentflow runs myapp.flows --status waiting           # a table; --json: JSON lines
    agentflow show myapp.flows 4f0c                       # a run by an id prefix
    agentflow events myapp.flows 4f0c --follow            # its history, then live
    agentflow approvals myapp.flows --approver ops-lead   # what waits for them, newest first
    agentflow approve myapp.flows 4f0c --by ops-lead --comment "ship it"
    agentflow reject myapp.flows 4f0c --by ops-lead --reason "tests are red"
    agentflow pause | resume | stop | retry | delete myapp.flows 4f0c
    agentflow fork myapp.flows 4f0c --at Deploy --state '{"env": "staging"}'
    agentflow recover myapp.flows                         # resume runs whose worker died
    agentflow worker myapp.flows --concurrency 100        # claim and advance runs until SIGTERM
    agentflow serve myapp.flows                           # the review page
    agentflow reviewers add myapp.flows ops-lead          # prints a token for the review page, once
    agentflow check myapp.flows                           # before a deploy: exit 1 if runs would not load
    agentflow describe myapp.flows

Output: tables and live progress through ``rich`` on a terminal; plain text when stdout
is not a terminal or ``NO_COLOR`` is set; ``--json``: one JSON document for a record,
JSON lines for a listing (see :mod:`agentflow.cli.output`). Errors are one line on
stderr. Exit status: 0 done, 1 the run failed or was rejected, 2 a usage or input
error (argparse's too), 3 not found (a run, a reviewer). Commands that read runs never
create a store.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable, Sequence

from ..errors import AgentflowError, RunNotFoundError
from ..steward import Steward
from . import control, decide, definitions, runs
from .output import Output, error
from .parser import parser
from .reviewers import _reviewers
from .serve import _serve
from .worker import _work

__all__ = ["main"]

Command = Callable[[Steward, argparse.Namespace, Output], Awaitable[int]]

_COMMANDS: dict[str, Command] = {
    "run": runs.run,
    "runs": runs.list_runs,
    "show": runs.show,
    "events": runs.events,
    "delete": runs.delete,
    "approvals": decide.approvals,
    "approve": decide.decide,
    "reject": decide.decide,
    "respond": decide.decide,
    "pause": control.pause_resume_stop,
    "resume": control.pause_resume_stop,
    "stop": control.pause_resume_stop,
    "retry": control.retry,
    "fork": control.fork,
    "recover": control.recover,
    "check": definitions.check,
    "describe": definitions.describe,
}

#: What the commands that print to a plain stream were given (they predate ``Output``).
_STREAMED = {"worker": _work, "serve": _serve, "reviewers": _reviewers}


async def _run(args: argparse.Namespace) -> int:
    steward = Steward.discover(args.module)
    if not steward.workflows():
        raise AgentflowError(f"module {args.module!r} defines no Workflow")
    streamed = _STREAMED.get(args.command)
    if streamed is not None:
        return await streamed(steward, args, sys.stdout)
    try:
        return await _COMMANDS[args.command](steward, args, Output(json=getattr(args, "json", False)))
    finally:
        await steward.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``agentflow`` command; returns the exit status."""
    args = parser().parse_args(argv)
    sys.path.insert(0, "")  # modules of the current directory, as ``python -m`` would
    try:
        return asyncio.run(_run(args))
    except RunNotFoundError as exc:
        error(f"{type(exc).__name__}: {exc}")
        return 3
    except ImportError as exc:
        error(
            f"{type(exc).__name__}: {exc}; run the command where module {args.module!r} can be "
            "imported (its project's folder, or with PYTHONPATH naming it)"
        )
        return 2
    except AgentflowError as exc:
        error(f"{type(exc).__name__}: {exc}")
        return 2
    except KeyboardInterrupt:
        error("interrupted; a run this process advanced goes on in a worker once its lease runs out")
        return 130
