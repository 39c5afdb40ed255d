"""A newer definition picking up a stored run: migrating it once, or leaving it where it was.

Two ways a run is picked up, two places its migration is committed:

* a transition that resumes a parked run (a decision, a timer, ``resume``, ``retry``,
  a recovery): :class:`Resuming` checks the run against the definition inside the
  transition's own ``Store.update`` and migrates it in the same write (a ``migrated``
  event first, then the transition's), so the decision and the migration are one
  atomic change. A parked run that cannot be loaded raises
  :class:`~agentflow.errors.IncompatibleRunError` and nothing is written but the reason
  (:func:`mark`); a running one whose owner died fails with it, once;
* a run taken as it is (a worker's claim of a handed-over run, a fork's new run):
  :func:`migrate` commits the migration under the lease before the run goes on.

Either way a crash after the commit finds the run at the new version: it is not
migrated twice.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .._engine.gates import Transition
from .._engine.versions import Upgrade, check, loadable, upgrade
from ..errors import CorruptRecordError, IncompatibleRunError, StoreError
from ..stores.contract import Change, Commit, Lease, LoadedRun, RunRecord
from ..types import FINAL, RunEvent, RunStatus

if TYPE_CHECKING:
    from .supervisor import Supervisor

__all__ = ["Resuming", "incompatible_error", "mark", "migrate"]

log = logging.getLogger("agentflow")


def incompatible_error(exc: IncompatibleRunError) -> dict[str, Any]:
    """How a run keeps why it cannot be loaded (``error``; no traceback, so the same each time)."""
    return {
        "step": exc.step,
        "type": type(exc).__name__,
        "message": str(exc),
        "traceback": "",
        "version": exc.version,
        "field": exc.field,
    }


class Resuming:
    """The check (and migration) of a run a transition resumes, for one ``Supervisor.transition``.

    ``Store.update`` may call the change more than once; a migration is run once per
    stored record it is given (a retry that finds its own write sees the new version).
    """

    __slots__ = ("_done", "_spec_of")

    def __init__(self, spec_of: Callable[[RunRecord], Any]) -> None:
        self._spec_of = spec_of
        self._done: dict[tuple[Any, ...], Upgrade | None] = {}

    def __call__(
        self, rec: RunRecord, t: Transition, fn: Callable[[RunRecord, float], Transition | None], now: float
    ) -> tuple[RunRecord, Transition, Upgrade | None] | Change:
        """``(record, transition, upgrade)`` to apply, or the change that fails a recovered run.

        The record is the migrated one (and the transition made again on it, so a gate
        goes on at its renamed target); ``upgrade`` is None when there was nothing to
        migrate.

        Raises:
            IncompatibleRunError: a parked run that this definition cannot load.
        """
        key = (rec.version, rec.commit_seq, rec.event_count, rec.updated_at)
        if key not in self._done:
            try:
                self._done[key] = check(self._spec_of(rec), rec)
            except IncompatibleRunError as exc:
                if rec.status != RunStatus.RUNNING:
                    raise  # parked: it stays so
                return _failed(rec, exc)  # its owner died: it fails, once, rather than loop
        up = self._done[key]
        if up is not None:
            rec = up.record
            t = fn(rec, now) or t
        error = rec.error
        stuck = isinstance(error, dict) and error.get("type") == "IncompatibleRunError"
        if stuck and rec.status != RunStatus.FAILED:
            rec = dataclasses.replace(rec, error=None)  # it loads now: the old reason goes
        return rec, t, up

    @staticmethod
    def events(up: Upgrade, rec: RunRecord, events: list[RunEvent]) -> list[RunEvent]:
        """The ``migrated`` event of ``up``, then ``events`` (numbered on after it)."""
        first = RunEvent("migrated", rec.run_id, rec.step, up.data, time.time(), rec.event_count + 1)
        return [first, *(ev._replace(seq=ev.seq + 1) for ev in events)]


def _failed(rec: RunRecord, exc: IncompatibleRunError) -> Change:
    """``rec``, running without a live owner, failed because the definition cannot load it."""
    error = incompatible_error(exc)
    data = {"type": error["type"], "message": error["message"]}
    event = RunEvent("failed", rec.run_id, rec.step, data, time.time(), rec.event_count + 1)
    failed = dataclasses.replace(
        rec, status=RunStatus.FAILED, error=error, lease_owner=None, lease_expires=0.0, control=None
    )
    return Change(failed, [event])


async def migrate(sup: Supervisor, loaded: LoadedRun, lease: Lease) -> LoadedRun:
    """Bring a run ``sup`` holds the lease of to the definition's version, committed; the run as loaded now.

    Raises:
        IncompatibleRunError: it cannot be brought there, or does not load once it is.
    """
    rec = loaded.record
    up = upgrade(sup.spec, rec)
    if up is None:
        return loaded
    loadable(sup.spec, up.record, rec.version)
    new = up.record
    seq = rec.commit_seq + 1
    event = RunEvent("migrated", rec.run_id, new.step, up.data, time.time(), rec.event_count + 1)
    fields = {"state": new.state, "step": new.step, "pending": new.pending, "version": new.version}
    await sup.store.commit(rec.run_id, lease, Commit(fields=fields, events=[event], seq=seq))
    new = dataclasses.replace(new, event_count=rec.event_count + 1, commit_seq=seq, commit_token=lease.token)
    return LoadedRun(new, loaded.outputs, loaded.journal)


async def mark(sup: Supervisor, run_id: str, exc: IncompatibleRunError) -> None:
    """Keep why a parked run cannot be loaded on its record (``RunInfo.error``); it stays as it is.

    Nothing else changes: no status, no event, no decision. A run that ended or is
    running, or whose record says so already, is left alone.
    """
    error = incompatible_error(exc)

    def change(rec: RunRecord, now: float) -> Change | None:
        if rec.status in FINAL or rec.status == RunStatus.RUNNING or rec.error == error:
            return None
        return Change(dataclasses.replace(rec, error=error), [])

    try:
        await sup.update(run_id, change)
    except (StoreError, CorruptRecordError) as again:
        log.warning("run %s: could not keep why it cannot be loaded (%s): %s", run_id, exc, again)
