"""Following a run from the runner: until it gets somewhere, its result, its events.

Each follows the run in memory while it advances in this process, and otherwise polls
the store, woken early by this process's change notifications.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from . import runner_sync
from ._engine.values import decode_output, run_output
from .errors import RunFailedError, RunNotFoundError, RunRejectedError, RunStoppedError
from .stores.contract import LoadedRun, RunRecord
from .types import FINAL, RunEvent, RunResult, RunStatus

if TYPE_CHECKING:
    from .runner import WorkflowRunner

__all__ = ["events", "result", "until"]

_FINAL_KINDS = frozenset(s.value for s in FINAL)


async def until(
    runner: WorkflowRunner, run_id: str, done: Callable[[RunRecord], bool], timeout: float | None
) -> RunRecord:
    """The run's record once ``done`` holds for it. ``done`` looks at the run's status or
    control flag: on a store that tells a step from a new status, a step wakes no look.

    Raises:
        TimeoutError: ``timeout`` seconds passed first.
        RunNotFoundError: there is no such run.
    """
    rec, _ = await _until(runner, run_id, done, timeout, loading=False)
    return rec


async def _until(
    runner: WorkflowRunner,
    run_id: str,
    done: Callable[[RunRecord], bool],
    timeout: float | None,
    loading: bool,
) -> tuple[RunRecord, LoadedRun | None]:
    """:func:`until`; with ``loading``, on a store whose change feed tells of new statuses
    (not of every step), a look woken by a push reads the whole run (record, outputs,
    journal) in place of the record alone, and returns it too: the run is then likely
    final, and ``result()`` needs no read of its own after it."""
    sup = runner.supervisor
    loading = loading and sup.feed is not None
    deadline = None if timeout is None else time.monotonic() + timeout
    quiet = 0  # backstop looks in a row that no push preceded (they grow rarer, see poll_interval)
    pushed = False
    while True:
        live = sup.local.get(run_id)
        if live is not None and not live.finished:
            try:
                async with asyncio.timeout(None if deadline is None else deadline - time.monotonic()):
                    await live.wait_finished()
            except TimeoutError:
                raise TimeoutError(f"run {run_id} did not get there within {timeout} s") from None
            if live.failure is not None:
                raise live.failure
        poll = sup.poll_interval(quiet=quiet)
        # Before the read: a change pushed meanwhile wakes the wait. ``done`` looks at the
        # status (every caller's does): a step that left it alone need not wake this.
        ev = sup.notifier.arm(run_id, every_step=False)
        loaded = None
        try:
            if loading and pushed:
                loaded = await _loaded(runner, run_id)
                rec = loaded.record
            else:
                rec = await runner._record(run_id)
        except BaseException:
            sup.notifier.disarm(run_id, ev)
            raise
        if done(rec):
            sup.notifier.disarm(run_id, ev)
            return rec, loaded
        if rec.status == RunStatus.WAITING and rec.pending and rec.pending.get("deadline"):
            sup.watch_deadlines()
        if deadline is not None and time.monotonic() >= deadline:
            sup.notifier.disarm(run_id, ev)
            raise TimeoutError(f"run {run_id} did not get there within {timeout} s")
        left = poll if deadline is None else min(poll, max(0.0, deadline - time.monotonic()))
        await sup.notifier.wait(run_id, ev, left)
        pushed = ev.is_set()
        quiet = 0 if pushed else quiet + 1


async def _loaded(runner: WorkflowRunner, run_id: str) -> LoadedRun:
    """The run's record, outputs and journal in one snapshot.

    Raises:
        RunNotFoundError: there is no such run (or it is another workflow's).
    """
    runner_sync.check_loop(runner)
    loaded = await runner.store.load(run_id)
    if loaded is None:
        raise RunNotFoundError(f"no run {run_id!r} in the store of workflow {runner.spec.name!r}")
    runner._check_workflow(loaded.record)
    return loaded


async def result(runner: WorkflowRunner, run_id: str, timeout: float | None) -> RunResult:
    """The run's result once it is final, read from the store; raises as ``RunHandle.result`` does."""
    rec, loaded = await _until(runner, run_id, lambda r: r.status in FINAL, timeout, loading=True)
    if rec.status == RunStatus.FAILED:
        err = rec.error or {}
        raise RunFailedError(
            run_id,
            err.get("step"),
            err.get("type", "Error"),
            err.get("message", ""),
            err.get("traceback", ""),
        )
    if rec.status == RunStatus.STOPPED:
        raise RunStoppedError(run_id, rec.step)
    if rec.status in (RunStatus.REJECTED, RunStatus.EXPIRED):
        last = rec.decisions[-1] if rec.decisions else {}
        raise RunRejectedError(run_id, rec.status.value, last.get("comment"), last.get("by"))
    if loaded is None:
        loaded = await _loaded(runner, run_id)
    spec = runner._specs.get(rec.workflow, runner.spec)
    results: dict[str, Any] = {}
    for out in loaded.outputs:
        results[out.step] = decode_output(spec, out.step, out.value)
    state = (
        spec.state_model.model_validate(rec.state)
        if spec.state_model and rec.state is not None
        else rec.state
    )
    return RunResult(rec.status, run_output(spec, run_id, rec.output), state, results)


async def events(runner: WorkflowRunner, run_id: str) -> AsyncIterator[RunEvent]:
    """The run's events from its first (history, then live), ending at a final status.

    Interleaved with them, while the run advances in this process: its live-only events
    (``agent_delta``), each after the stored event whose ``seq`` it carries. Those are
    never stored, so a watcher sees only the ones published while it watches.
    """
    sup = runner.supervisor
    after = 0
    with sup.notifier.watch(run_id) as deltas:
        while True:
            woken = sup.notifier.arm(run_id)  # before the reads: a change meanwhile wakes the wait
            try:
                live = sup.local.get(run_id)
                if live is not None and not live.finished and live.event_seq <= after:
                    batch: list[RunEvent] = []  # nothing new stored nor queued: no read of the store
                else:
                    batch = await runner.store.events(run_id, after)
                    live = sup.local.get(run_id)
                    last = batch[-1].seq if batch else after
                    # Queued events, unless a commit stored some between the read and now:
                    # those come from the store first (the next read), never skipped.
                    if live is not None and live.outbox and live.outbox[0].seq == last + 1:
                        batch = [*batch, *live.outbox]
                for ev in batch:
                    if ev.seq <= after:
                        continue
                    while deltas and deltas[0].seq < ev.seq:
                        yield deltas.popleft()
                    after = ev.seq
                    yield ev
                    if ev.kind in _FINAL_KINDS and ev is batch[-1]:
                        # The end, unless the run went on since (a failed run that was retried).
                        rec = await runner._record(run_id)
                        if rec.status in FINAL and rec.event_count <= after:
                            return
                while deltas and deltas[0].seq <= after:
                    yield deltas.popleft()
                if not batch and (live is None or live.finished):
                    rec = await runner._record(run_id)
                    if rec.status in FINAL and rec.event_count <= after:
                        return
                await sup.notifier.wait(run_id, woken, sup.poll_interval(every_step=True))
            finally:
                sup.notifier.disarm(run_id, woken)
