"""What a run needs from the process that advances it: the engine's only view of the runtime.

The engine (this package) never imports the runtime; the runtime's supervisor
implements :class:`Kernel` and hands itself to each run it owns.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..agents.spi import AgentJournal
    from ..definition.workflow import WorkflowSpec
    from ..stores.contract import Store
    from ..types import RunEvent
    from .run import LiveRun

__all__ = ["Kernel"]


class Kernel(Protocol):
    """The runtime as a run sees it."""

    spec: WorkflowSpec
    store: Store
    owner: str
    #: True once the process is closing: runs leave (recoverable) instead of going on.
    stopping: bool
    #: Run id → who waits on it here; empty when nobody does (then ``notify`` can be skipped).
    waiters: dict[str, Any]

    def notify(self, run_id: str) -> None:
        """Wake whoever in this process waits on ``run_id``."""
        ...

    #: Run id → this process's watchers of its events; no key when nobody watches (then
    #: live events need not be made).
    watching: dict[str, Any]

    def publish(self, run_id: str, event: RunEvent) -> None:
        """Deliver a live-only event (``agent_delta``) to this process's watchers of ``run_id``.

        It is never stored; with nobody watching, it is dropped.
        """
        ...

    def agents(self, journal: AgentJournal) -> Any:
        """``ctx.agents`` for one step execution, journaled through ``journal``."""
        ...

    def watch_deadlines(self) -> None:
        """Make sure gate deadlines are enforced while this process lives."""
        ...

    def parked(self, run: LiveRun, pending: dict[str, Any]) -> None:
        """``run``'s commit as waiting on ``pending`` (a gate, a timer, tool calls) is stored.

        Its deadline is enforced from now on, and whoever listens to approvals here is
        told of those it waits for.
        """
        ...

    def forget(self, run: LiveRun) -> None:
        """``run`` left this process."""
        ...

    # -- child runs ---------------------------------------------------------------

    #: Seconds a lease lasts without renewal (a child run's first lease too).
    lease_ttl: float

    def child_kernel(self, workflow: str) -> Kernel:
        """The kernel of the runs of ``workflow`` (a child workflow) in this process.

        Raises:
            KeyError: this process does not serve ``workflow``.
        """
        ...

    def start(self, run: LiveRun) -> None:
        """Advance ``run`` (just created, its lease held) in a task of its own."""
        ...

    def watch_children(self, run_id: str) -> None:
        """``run_id`` parked on child runs: resume it once they all ended."""
        ...

    def ended_children(self, run_id: str) -> dict[str, Any]:
        """Children of ``run_id`` that ended in this process: id → how (a ``ChildOutcome``
        when it completed, else None: read it from the store)."""
        ...

    async def stop_runs(self, run_ids: list[str]) -> set[str]:
        """Stop these runs (child runs of a failed step) and their children, through the store.

        Returns the ids of those that were stopped (or are stopping, owned elsewhere);
        a run that had ended is left as it is.
        """
        ...

    def forget_children(self, run_id: str) -> None:
        """``run_id`` read its children's results: drop what :meth:`ended_children` kept."""
        ...
