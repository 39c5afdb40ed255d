"""Driving a run to where it leaves this process, and recording how it left.

:func:`drive` runs the interpreter and turns what ends it into a commit: a failure
(``failed``, with the step, type, message and traceback, secrets redacted), a stop
(``stopped``), a closing process (the lease released: the run is recoverable at once),
a lost lease (nothing: another process owns the run). ``SystemExit`` and
``KeyboardInterrupt`` are never swallowed: the run is left to recovery and they go on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from .. import tracing
from ..errors import LeaseLostError, StoreError
from ..stores.contract import Commit
from ..types import RunStatus
from .fanout import BranchFailed
from .flow import pause_here
from .run import LiveRun, StepError, Stop, Suspend, error_info

__all__ = ["drive"]

log = logging.getLogger("agentflow")

#: Seconds a closing process tries to hand a run's lease back before it leaves anyway.
_RELEASE_WAIT = 2.0


async def drive(run: LiveRun, advance: Callable[[LiveRun], Awaitable[None]]) -> None:
    """Run ``advance`` to its end, turning failures, stops and lease loss into commits.

    This is one segment of the run: traced as ``invoke_workflow`` (see :mod:`agentflow.tracing`).
    """
    kernel = run.kernel
    seg = tracing.segment(run.run_id, run.spec, run.journal, run.decisions)
    failure: BaseException | None = None
    try:
        run.started = True
        if run.stop_requested:
            raise Stop()
        if kernel.stopping:
            raise asyncio.CancelledError()  # the process closed before the run began: leave it for recovery
        if run.pause_requested and run.visit > 0:
            await pause_here(run)  # asked for while nobody owned the run
            return
        await advance(run)
        if kernel.stopping and run.status is RunStatus.RUNNING:
            # The process closes between two steps: let go, so another takes the run at once.
            await _release_quietly(run)
    except Suspend:
        pass  # parked inside a step (a tool call waits for its approval): committed already
    except asyncio.CancelledError:
        if run.stop_requested:
            await _finish_stopped(run)
        else:
            # The process is closing: leave the run for recovery, releasing the lease so
            # another process need not wait for it to expire.
            await _release_quietly(run)
            run.status = RunStatus.RUNNING
    except Stop:
        await _finish_stopped(run)
    except LeaseLostError as exc:
        log.warning("run %s: %s; this process stops advancing it", run.run_id, exc)
    except (KeyboardInterrupt, SystemExit):
        await _release_quietly(run)
        raise
    except Exception as exc:
        step_err = exc if isinstance(exc, StepError) else StepError(run.step, exc)
        failure = step_err.error
        await _finish_failed(run, step_err)
    finally:
        if seg is not None:
            seg.end(run.status.value, failure if run.status is RunStatus.FAILED else None)
        run.finished = True
        kernel.forget(run)
        for fut in run.watchers:
            if not fut.done():
                fut.set_result(None)
        run.watchers.clear()


async def _finish_failed(run: LiveRun, err: StepError) -> None:
    if isinstance(err.error, BranchFailed):
        # Report the branch's own error; the branch is named in the message and the info.
        cause = err.error.error
        info = error_info(err.step, cause)
        info["message"] = f"branch {err.error.name!r}: {info['message']}"
        info["branch"] = err.error.name
    else:
        info = error_info(err.step, err.error)
    run.status = RunStatus.FAILED
    data = {"type": info["type"], "message": info["message"]}
    run.event("step_failed", err.step, data)
    run.event("failed", err.step, data)
    journal = {}
    if err.at is not None:
        # How many attempts the failing step made: a retry of the run counts on from there.
        attempts = dict(run.journal.get("attempts") or {})
        attempts[err.at] = err.attempt
        journal["attempts"] = attempts
    fields: dict[str, object] = {"status": RunStatus.FAILED, "error": info, "control": None}
    if err.wait is not None:
        # Child runs failed the step: their wait is kept, so a retry retries them and waits again.
        fields["pending"] = {**err.wait, "deadline": None, "ended": True}
        fields["visit"] = run.visit = int(err.wait["visit"])
    if run.spawned:
        # Children the step started before it failed: recorded, so stop and delete reach them.
        new = [c for c in dict.fromkeys(run.spawned) if c not in run.children]
        run.children = fields["children"] = (*run.children, *new)
        run.spawned = []
    try:
        await run.commit(Commit(fields=fields, journal=journal, release=True))
    except StoreError as exc:
        # Lease lost, or the process closes while the store is out of reach: the run
        # stays at its last commit, recoverable later.
        log.error("run %s: could not record its failure (%s): %s", run.run_id, info["message"], exc)
        run.failure = exc if not isinstance(exc, LeaseLostError) else None
        run.status = RunStatus.RUNNING


async def _finish_stopped(run: LiveRun) -> None:
    run.status = RunStatus.STOPPED
    run.event("stopped", run.step)
    fields: dict[str, object] = {"status": RunStatus.STOPPED, "control": None}
    if run.spawned:
        # Children the step started before it was stopped: recorded, so the stop reaches them.
        run.children = fields["children"] = (*run.children, *run.spawned)
        run.spawned = []
    try:
        await asyncio.shield(run.commit(Commit(fields=fields, release=True)))
    except (StoreError, asyncio.CancelledError) as exc:
        # The stopper sees the run is not final and finishes the stop through the store.
        log.warning("run %s: could not record its stop here: %s", run.run_id, exc)
        run.status = RunStatus.RUNNING


async def _release_quietly(run: LiveRun) -> None:
    # Handing the lease back is a courtesy: while the store is out of reach the process
    # does not wait for it (the lease runs out and the run is recovered then).
    try:
        async with asyncio.timeout(_RELEASE_WAIT):
            await run.commit(Commit(release=True))
    except (StoreError, TimeoutError, asyncio.CancelledError):
        pass
