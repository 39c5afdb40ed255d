"""The commit that ends a step and moves the run on: to its target, to the end, or to a pause.

Flow steps and steps that waited on child runs end alike: the step's outputs join the
run's results, the state fields it changed ride in its ``step_completed`` event (what a
fork replays), its usage is reported, and the run goes on at ``target`` — or completes
at ``END``, or parks ``paused`` when a pause was asked for while the step ran.
"""

from __future__ import annotations

from typing import Any

from ..definition.steps import END
from ..stores.contract import Commit, OutputRecord
from ..types import NO_USAGE, RunStatus
from .history import state_delta
from .run import LiveRun
from .values import encode_branch

__all__ = ["complete_step"]


async def complete_step(
    run: LiveRun,
    name: str,
    target: str,
    state: Any,
    output: Any,
    outputs: list[OutputRecord],
    final: Any,
    fields: dict[str, Any] | None = None,
    journal: dict[str, Any] | None = None,
) -> str | None:
    """Commit step ``name`` done and the run moved to ``target``; return the commit's control flag.

    ``output`` is the step's own output (None: none), ``outputs`` other outputs to record
    (a fan-out's branches), ``final`` the run's output when ``target`` is ``END``;
    ``fields`` and ``journal`` are more record fields and journal entries for the commit.
    """
    fields = {"step": target, "visit": run.visit, **(fields or {})}
    done: dict[str, Any] = {}
    if state is not run.state:
        done["state"] = state_delta(run.state, state)  # what fork() replays
        run.state = fields["state"] = state
    if output is not None:
        outputs.append(OutputRecord(run.visit, name, output))
    for rec in outputs:
        run.results[rec.step] = rec.value
        run.history.setdefault(rec.step, []).append(rec.value)
    if outputs:
        outputs = [OutputRecord(o.visit, o.step, encode_branch(o.value)) for o in outputs]
    usage = run.step_usage
    if usage.total_tokens:
        done["usage"] = usage.to_json()
    run.event("step_completed", name, done or None)
    run.step_usage = NO_USAGE
    release = False
    if target == END:
        fields.update(status=RunStatus.COMPLETED, output=final, control=None)
        run.output = final
        run.event("completed", None)
        run.status = RunStatus.COMPLETED
        release = True
    elif run.pause_requested:
        fields.update(status=RunStatus.PAUSED, control=None)
        run.event("paused", target)
        run.status = RunStatus.PAUSED
        release = True
    else:
        run.event("step_started", target)
    run.step = target
    return await run.commit(
        Commit(fields=fields, outputs=outputs, journal=dict(journal or {}), release=release)
    )
