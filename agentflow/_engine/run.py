"""One run this process owns: its typed values, its outbox of events, its commits.

Invariants:

* A run advances only through :meth:`LiveRun.commit` under its lease; each step's
  completion (state, output, next step, events) is one commit, numbered by
  ``commit_seq`` so a retried commit is applied once.
* A store outage never fails a run: a commit that meets a :class:`StoreError` is
  retried with backoff, under the same number, until the store answers (or another
  process took the lease, or this process is closing and leaves the run recoverable).
* The record alone is enough to pick a run up again: :meth:`LiveRun.restore` rebuilds
  the typed input, state and step outputs with types known from the definition.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from .. import tracing
from ..definition.steps import START
from ..errors import (
    AgentflowError,
    CorruptRecordError,
    InvalidInputError,
    LeaseLostError,
    StoreError,
    redact,
)
from ..stores.contract import Commit, Lease, LoadedRun, RunRecord
from ..types import NO_USAGE, Decision, RunEvent, RunStatus, Usage
from .context import StepResults
from .gates import typed_decision
from .journal import StepJournal
from .signals import Stop, Suspend
from .values import decode_output, validate_input
from .versions import loadable

if TYPE_CHECKING:
    from .kernel import Kernel

__all__ = ["LiveRun", "StepError", "Stop", "Suspend", "error_info", "first_record", "new_run"]

log = logging.getLogger("agentflow")

#: A commit numbered a multiple of 64 yields to the loop: a store whose commits do not
#: suspend (memory, SQLite without contention) would otherwise let a long run, flow or
#: imperative, hold the loop (watchers, other runs, timers) until it ended.
_YIELD_EVERY = 63

#: Seconds between retries of a commit while the store is unreachable (doubling, capped).
_OUTAGE_FIRST, _OUTAGE_MAX = 0.05, 2.0

# A RunEvent from a tuple of its fields, without the Python-level ``__new__`` call.
_event = RunEvent._make


class StepError(Exception):
    """Internal: a step failed; carries the step name and the cause.

    ``attempt`` is the last attempt's ``ctx.attempt`` and ``at`` the step execution's
    key in the journal's ``"attempts"`` entry, so a retried run counts on from there.
    ``wait`` is the wait on child runs whose ending failed the step (kept with the
    failure, so a retry of the run retries those children and waits on them again).
    """

    def __init__(
        self,
        step: str,
        error: BaseException,
        attempt: int = 0,
        at: str | None = None,
        wait: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(str(error))
        self.step = step
        self.error = error
        self.attempt = attempt
        self.at = at
        self.wait = wait


def error_info(step: str | None, exc: BaseException) -> dict[str, Any]:
    """A failure as stored: step, type, message and traceback, secrets redacted."""
    return {
        "step": step,
        "type": type(exc).__name__,
        "message": redact(str(exc)),
        "traceback": redact("".join(traceback.format_exception(exc))),
    }


class LiveRun:
    """A run owned and advanced by this process."""

    __slots__ = (
        "children",
        "commit_seq",
        "decision",
        "decisions",
        "event_seq",
        "failure",
        "finished",
        "history",
        "input",
        "journal",
        "kernel",
        "lease",
        "outbox",
        "output",
        "parent",
        "pause_requested",
        "resolving",
        "results",
        "results_view",
        "run_id",
        "spawned",
        "spec",
        "started",
        "state",
        "status",
        "step",
        "step_usage",
        "stop_requested",
        "task",
        "usage",
        "visit",
        "watchers",
    )

    def __init__(self, kernel: Kernel, run_id: str, lease: Lease, inp: Any, state: Any) -> None:
        self.kernel = kernel
        self.spec = kernel.spec
        self.run_id = run_id
        self.lease = lease
        self.input = inp
        self.state: BaseModel | None = state
        self.step: str = START
        self.visit = 0
        self.results: dict[str, Any] = {}
        self.history: dict[str, list[Any]] = {}
        self.results_view = StepResults(self.results, self.history)
        self.decision: Decision | None = None
        self.decisions: tuple[Any, ...] = ()  # every decision as stored (JSON), oldest first
        self.usage = NO_USAGE  # frozen: a run's usage is replaced, never changed in place
        self.step_usage = NO_USAGE
        self.event_seq = 0
        self.commit_seq = 0
        self.outbox: list[RunEvent] = []
        self.journal: dict[str, Any] = {}
        self.status = RunStatus.RUNNING
        self.output: Any = None
        self.pause_requested = False
        self.stop_requested = False
        self.task: asyncio.Task[None] | None = None
        self.started = False  # drive() has begun: its cleanup is guaranteed to run
        self.finished = False
        self.failure: BaseException | None = None  # a store failure that left the run at its last commit
        self.watchers: list[asyncio.Future[None]] = []
        self.parent: dict[str, Any] | None = None  # for a child run: RunRecord.parent
        self.children: tuple[str, ...] = ()  # every child run started, as stored
        self.spawned: list[str] = []  # child runs started since, not stored with the run yet
        # The pending of a wait on children that ended: the step to finish first.
        self.resolving: dict[str, Any] | None = None

    @classmethod
    def restore(cls, kernel: Kernel, loaded: LoadedRun, lease: Lease) -> LiveRun:
        """Rebuild a run from its stored record, outputs and journal.

        The record must be at the definition's version (see :func:`.versions.upgrade`).

        Raises:
            IncompatibleRunError: the record names a step the workflow does not have, or
                its state does not validate against the state model.
            CorruptRecordError: the record belongs to another workflow, or holds input,
                outputs or decisions the models reject.
        """
        rec = loaded.record
        spec = kernel.spec
        if rec.workflow != spec.name:
            raise CorruptRecordError(
                rec.run_id, "workflow", f"the record is of workflow {rec.workflow!r}, not {spec.name!r}"
            )
        state = loadable(spec, rec)
        key = "input"
        try:
            inp = validate_input(spec, rec.input)
            run = cls(kernel, rec.run_id, lease, inp, state)
            key = "outputs"
            for out in loaded.outputs:
                value = decode_output(spec, out.step, out.value)
                run.results[out.step] = value
                run.history.setdefault(out.step, []).append(value)
            key = "decisions"
            run.decisions = rec.decisions
            if rec.decisions:
                run.decision = typed_decision(spec, rec.decisions[-1])
        except (ValidationError, InvalidInputError, KeyError, TypeError, ValueError) as exc:
            raise CorruptRecordError(rec.run_id, key, str(exc)) from None
        run.step = rec.step or START
        run.visit = rec.visit
        run.usage = Usage.from_json(rec.usage)
        run.event_seq = rec.event_count
        run.commit_seq = rec.commit_seq
        run.journal = dict(loaded.journal)
        run.pause_requested = rec.control == "pause"
        run.stop_requested = rec.control == "stop"
        run.parent = rec.parent if isinstance(rec.parent, dict) else None
        run.children = tuple(rec.children)
        pending = rec.pending
        if isinstance(pending, dict) and pending.get("kind") == "children":
            run.resolving = pending
        return run

    # -- events ---------------------------------------------------------------

    def event(self, kind: str, step: str | None = None, data: Any = None) -> RunEvent:
        """A new event with the next sequence number, queued for the next commit."""
        seq = self.event_seq = self.event_seq + 1
        ev = _event((kind, self.run_id, step, data, time.time(), seq))
        self.outbox.append(ev)
        return ev

    def emit(self, kind: str, step: str | None, data: Any) -> None:
        """Queue a custom event (``ctx.emit``); watchers in this process see it at once."""
        self.event(kind, step, data)
        self.kernel.notify(self.run_id)

    def wait_finished(self) -> asyncio.Future[None]:
        """A future resolved when this process stops advancing the run (fresh per caller)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.finished:
            fut.set_result(None)
        else:
            self.watchers.append(fut)
        return fut

    def cancel(self) -> None:
        """Cancel the run's task.

        A task cancelled before it starts never runs ``drive``'s cleanup (its watchers
        would wait forever), so a run not started yet is left to see ``stop_requested``
        or ``kernel.stopping`` when it starts.
        """
        if self.started and self.task is not None:
            self.task.cancel()

    # -- commits --------------------------------------------------------------

    async def commit(self, commit: Commit) -> str | None:
        """Commit under this run's lease, with the queued events; return the control flag.

        Retried through store outages (see the module docstring).

        Raises:
            LeaseLostError: another process owns the run now.
            StoreError: the store is unreachable and this process is closing.
        """
        if self.outbox:
            commit.events = [*self.outbox, *commit.events]
            self.outbox = []
        if commit.release:  # the segment's last commit: the next segment links to its span
            commit.journal = tracing.seal(self.run_id, commit.journal)
        # The number is used up before the call: a commit cancelled in flight may have been
        # applied, and a different commit under its number would be taken for its retry.
        commit.seq = self.commit_seq = self.commit_seq + 1
        store = self.kernel.store
        try:
            control = await store.commit(self.run_id, self.lease, commit)
        except (LeaseLostError, CorruptRecordError):
            raise
        except StoreError as exc:
            control = await self._commit_through_outage(commit, exc)
        self.kernel.notify(self.run_id)
        if not commit.seq & _YIELD_EVERY:
            await asyncio.sleep(0)
        return control

    async def _commit_through_outage(self, commit: Commit, first: StoreError) -> str | None:
        store = self.kernel.store
        delay = _OUTAGE_FIRST
        exc: StoreError = first
        since = time.monotonic()
        while True:
            if self.kernel.stopping:
                raise exc
            log.warning(
                "run %s: the store is unreachable (%s); commit %d is retried until it answers",
                self.run_id,
                exc,
                commit.seq,
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, _OUTAGE_MAX)
            try:
                control = await store.commit(self.run_id, self.lease, commit)
            except (LeaseLostError, CorruptRecordError):
                raise
            except StoreError as again:
                exc = again
                continue
            log.warning(
                "run %s: the store answered again after %.1f s; the run goes on",
                self.run_id,
                time.monotonic() - since,
            )
            return control

    # -- agents ---------------------------------------------------------------

    def agents_for(self, step: str, visit: int, scope: str) -> Any:
        """``ctx.agents`` for one step execution."""
        if self.spec.agents is None:
            raise AgentflowError(
                f"run {self.run_id}, step {step!r}: the workflow declares no agents; "
                "add .agents({...}) to the workflow"
            )
        return self.kernel.agents(StepJournal(self, f"{visit}:{step}:{scope}", step, visit, bool(scope)))


def first_record(
    kernel: Kernel, run_id: str, inp: Any, state: Any, step: str, owned: bool = True, **fields: Any
) -> tuple[RunRecord, Lease]:
    """The first record of a run this process starts: running at ``step``, leased to it (token 1).

    Not ``owned`` (a client's run, queued for a worker as it is created): no owner, no
    lease expiry. ``fields`` sets other record fields (``parent``; a fork's ``visit``
    and ``decisions``).
    """
    lease = Lease(kernel.owner, 1)
    now = time.time()
    rec = RunRecord(
        run_id=run_id,
        workflow=kernel.spec.name,
        version=kernel.spec.version,
        status=RunStatus.RUNNING,
        input=inp,
        state=state,
        step=step,
        created_at=now,
        updated_at=now,
        lease_owner=lease.owner if owned else None,
        lease_token=lease.token,
        lease_expires=now + kernel.lease_ttl if owned else 0.0,
        **fields,
    )
    return rec, lease


def new_run(
    kernel: Kernel,
    run_id: str,
    inp: Any,
    started: dict[str, Any],
    parent: dict[str, Any] | None = None,
    owned: bool = True,
) -> tuple[RunRecord, LiveRun, list[RunEvent]]:
    """A run about to start at its first step, in the workflow's initial state.

    Returns its first record (without an owner unless ``owned``: see :func:`first_record`),
    its :class:`LiveRun` and its first two events (``run_started`` with ``started`` as
    data, and ``step_started``), for ``Store.create``.
    """
    spec = kernel.spec
    state = spec.state_model.model_validate(spec.initial_state) if spec.state_model else None
    first = spec.main.name if spec.main is not None else START
    rec, lease = first_record(kernel, run_id, inp, state, first, owned, parent=parent)
    run = LiveRun(kernel, run_id, lease, inp, state)
    run.step = first
    run.parent = parent
    run.event_seq = 2
    now = rec.created_at
    events = [
        _event(("run_started", run_id, None, started, now, 1)),
        _event(("step_started", run_id, first, None, now, 2)),
    ]
    return rec, run, events
