"""Leases: renewing the leases of the runs this process owns, and acting on control flags.

Renewals run on a thread of their own, with their own event loop and their own store
(``Store.sibling()``), so a step that blocks the event loop — a sync step doing
seconds of CPU work or a blocking call — neither loses its run's lease (another
process would run the step a second time, concurrently) nor stalls the renewals of
the other runs. A store that cannot be shared across loops (``sibling()`` returns
None: the memory store, whose runs no other process can take anyway) is renewed on
the event loop.

A renewal returns the run's control flag, so a pause or stop asked for by another
process reaches the owner within a renewal interval even while a step runs.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from .._engine.gates import Transition
from ..definition.steps import START
from ..errors import LeaseLostError, StoreError
from ..stores.contract import RunRecord
from ..types import RunStatus

if TYPE_CHECKING:
    from .._engine.run import LiveRun
    from ..stores.contract import Store
    from .supervisor import Supervisor

__all__ = ["LeaseKeeper", "take_over"]


def take_over(workflow: str) -> Callable[[RunRecord, float], Transition | None]:
    """The transition that resumes a run of ``workflow`` whose owner died.

    The lease is judged by the store's clock (``now``); a run that is not running, whose
    lease still holds, or of another workflow is left alone (someone got there first).
    """

    def change(r: RunRecord, now: float) -> Transition | None:
        if r.status != RunStatus.RUNNING or r.lease_expires >= now or r.workflow != workflow:
            return None
        data = {"recovered": True, "from": r.lease_owner}
        return Transition({}, [("resumed", r.step, data)], r.step or START)

    return change


log = logging.getLogger("agentflow")


class LeaseKeeper:
    """Renews every owned run's lease each ``lease_ttl / 3`` seconds (at most 1 s)."""

    __slots__ = ("_cuttable", "_loop", "_renewing", "_stop", "_sup", "_task", "_thread")

    def __init__(self, sup: Supervisor) -> None:
        self._sup = sup
        self._task: asyncio.Task[None] | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        # The renewal thread's loop and task, so close() can cut a renewal in flight short;
        # ``_cuttable`` (read and written on that thread only) is True during a renewal.
        self._renewing: tuple[asyncio.AbstractEventLoop, asyncio.Task[None]] | None = None
        self._cuttable = False

    @property
    def interval(self) -> float:
        """Seconds between renewals."""
        return min(self._sup.lease_ttl / 3, 1.0)

    def ensure(self) -> None:
        """Start renewing if not already."""
        if self._thread is not None and self._thread.is_alive():
            return
        if self._task is not None and not self._task.done():
            return
        sibling = self._sup.store.sibling() if hasattr(self._sup.store, "sibling") else None
        if sibling is None:
            self._task = asyncio.get_running_loop().create_task(self._on_loop(), name="agentflow:leases")
            return
        self._loop = asyncio.get_running_loop()
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._in_thread, args=(sibling,), name="agentflow:leases", daemon=True
        )
        self._thread.start()

    async def close(self) -> None:
        """Stop renewing (and wait for the renewal thread to end)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            renewing, self._renewing = self._renewing, None
            if renewing is not None:
                # A renewal in flight waits for the store (up to its own retry window
                # while the store is out of reach): it is cancelled, not waited for.
                try:
                    renewing[0].call_soon_threadsafe(self._cut, renewing[1])
                except RuntimeError:  # that loop already ended
                    pass
            await asyncio.to_thread(thread.join)

    # -- renewing on the event loop (stores that cannot be shared) ----------------

    async def _on_loop(self) -> None:
        sup = self._sup
        idle = 0
        while idle < 2:  # ends after two idle ticks, so no task outlives the runs it served
            await asyncio.sleep(self.interval)
            idle = 0 if sup.local else idle + 1
            runs = [run for run in list(sup.local.values()) if run.task is not None and not run.task.done()]
            for run, outcome in zip(runs, await self._renew_all(sup.store, runs), strict=True):
                if isinstance(outcome, LeaseLostError):
                    self._lost(run)
                elif isinstance(outcome, StoreError):
                    continue  # retried at the next tick; the lease has slack for it
                elif isinstance(outcome, BaseException):
                    raise outcome
                else:
                    self._control(run, outcome)

    async def _renew_all(self, store: Store, runs: list[LiveRun]) -> list[str | BaseException | None]:
        """Renew the leases of ``runs`` all at once (a store may send them together:
        PostgreSQL, one statement); each one's control flag or what it raised."""
        ttl = self._sup.lease_ttl
        return await asyncio.gather(
            *(store.renew(run.run_id, run.lease, ttl) for run in runs), return_exceptions=True
        )

    # -- renewing on a thread of its own ---------------------------------------

    def _in_thread(self, store: Store) -> None:
        asyncio.run(self._thread_loop(store))

    async def _thread_loop(self, store: Store) -> None:
        sup = self._sup
        task = asyncio.current_task()
        assert task is not None
        self._renewing = (asyncio.get_running_loop(), task)
        try:
            while not self._stop.wait(self.interval):
                # A snapshot: the dict is changed on the event loop's thread meanwhile.
                runs = [run for run in list(sup.local.values()) if not run.finished]
                self._cuttable = True
                try:
                    outcomes = await self._renew_all(store, runs)
                finally:
                    self._cuttable = False
                for run, outcome in zip(runs, outcomes, strict=True):
                    if isinstance(outcome, LeaseLostError):
                        self._post(self._lost, run)
                    elif isinstance(outcome, StoreError):
                        continue  # retried at the next tick; the lease has slack for it
                    elif isinstance(outcome, BaseException):
                        if not isinstance(outcome, Exception):
                            raise outcome
                        log.error("run %s: lease renewal failed", run.run_id, exc_info=outcome)
                    elif outcome is not None:
                        self._post(self._control, run, outcome)
        except asyncio.CancelledError:
            pass  # close() cut a renewal short
        finally:
            await store.close()

    def _cut(self, task: asyncio.Task[None]) -> None:
        """On the renewal thread: cancel ``task`` if it waits on a renewal (not on its store's close)."""
        if self._cuttable:
            task.cancel()

    def _post(self, fn: object, *args: object) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(fn, *args)  # type: ignore[arg-type]
            except RuntimeError:  # the loop closed meanwhile
                pass

    # -- what a renewal tells ----------------------------------------------------

    @staticmethod
    def _lost(run: LiveRun) -> None:
        # A run that parked or finished let go of its lease itself: nothing was lost.
        if run.status is RunStatus.RUNNING and run.task is not None and not run.task.done():
            log.warning("run %s: its lease was taken over; this process stops advancing it", run.run_id)
            run.task.cancel()

    @staticmethod
    def _control(run: LiveRun, control: str | None) -> None:
        if control == "stop":
            run.stop_requested = True
            run.cancel()
        elif control == "pause":
            run.pause_requested = True
