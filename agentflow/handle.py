"""``RunHandle``: one run to inspect, wait for, watch and control."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from ._engine.run import LiveRun
from .errors import AgentflowError
from .notebook import LiveView, RunView
from .runner_sync import check_loop
from .stores.contract import RunRecord
from .types import FINAL, RunEvent, RunInfo, RunResult, RunStatus

if TYPE_CHECKING:
    from .runner import WorkflowRunner

__all__ = ["RunHandle", "status_of"]


def status_of(value: RunStatus | str, what: str = "status") -> RunStatus:
    try:
        return RunStatus(value)
    except ValueError:
        raise AgentflowError(
            f"unknown {what} {value!r}; statuses are {[s.value for s in RunStatus]}"
        ) from None


class RunHandle:
    """Controls one run: inspect it, wait for it, watch it, pause, resume, stop, decide."""

    __slots__ = ("_live", "_runner", "_status", "_view", "run_id")

    def __init__(
        self,
        runner: WorkflowRunner,
        run_id: str,
        live: LiveRun | None = None,
        status: RunStatus | None = None,
    ) -> None:
        self._runner = runner
        self._live = live
        self._status = status
        self._view: RunView | None = None  # what a notebook display of it last showed
        self.run_id = run_id

    @property
    def status(self) -> RunStatus | None:
        """The status last seen by this handle (``await info()`` reads the store)."""
        if self._live is not None and (self._live.finished or self._status is None):
            return self._live.status
        return self._status

    async def info(self) -> RunInfo:
        """A snapshot: status, step, pending approvals (its child runs' too), error, usage, timestamps."""
        info = await self._runner._info(self.run_id)
        self._status = info.status
        return info

    async def wait_for(self, *statuses: RunStatus | str, timeout: float | None = None) -> RunInfo:
        """Wait until the run is in one of ``statuses`` (or final) and return its ``RunInfo``.

        Raises:
            RunNotFoundError: there is no such run.
            TimeoutError: ``timeout`` seconds passed first.
        """
        wanted = {status_of(s) for s in statuses}

        def done(rec: RunRecord) -> bool:
            return rec.status in wanted or rec.status in FINAL

        rec = await self._runner._record(self.run_id)  # there already (say, running here)?
        if not done(rec):
            rec = await self._runner._until(self.run_id, done, timeout)
        self._status = rec.status
        return rec.info()

    async def result(self, timeout: float | None = None) -> RunResult:
        """Wait for the run to finish and return its result.

        Raises:
            RunFailedError: with the failing step, error type, message and traceback text.
            RunStoppedError: the run was stopped.
            RunRejectedError: the run was rejected or its gate expired.
            TimeoutError: ``timeout`` seconds passed first.
        """
        live = self._live
        if live is not None and timeout is None:
            check_loop(self._runner)  # the run's task is of the runner's loop: waited for there only
            # Started here: follow the run in memory while it stays in this process.
            await live.wait_finished()
            if live.failure is not None:
                raise live.failure
            if live.status is RunStatus.COMPLETED:
                self._status = live.status
                return RunResult(RunStatus.COMPLETED, live.output, live.state, dict(live.results))
            self._live = None
        res = await self._runner._result(self.run_id, timeout)
        self._status = res.status
        return res

    def events(self) -> AsyncIterator[RunEvent]:
        """The run's events from its first (history, then live), ending at a final status.

        While the run advances in this process, its ``agent_delta`` events come too: the
        text deltas of ``handle.stream`` and ``handle.run`` (``data``: ``agent``, ``call``,
        ``text``), live only (never stored, so neither replayed nor seen from another
        process), each after the stored event whose ``seq`` it carries.
        """
        return self._runner._events(self.run_id)

    async def pause(self) -> None:
        """Let the step in flight finish and commit, then park the run as ``paused``."""
        await self._runner._pause(self.run_id)

    async def resume(self) -> None:
        """Continue a paused run from its next step, in this process."""
        await self._runner._resume(self.run_id)
        self._live = self._runner.supervisor.local.get(self.run_id)

    async def retry(self) -> RunHandle:
        """Continue the failed run at its failing step, in this process (see ``WorkflowRunner.retry``)."""
        return await self._runner.retry(self.run_id)

    async def fork(self, at: str, state: Any = None, run_id: str | None = None) -> RunHandle:
        """A new run from where this one last reached step ``at`` (see ``WorkflowRunner.fork``)."""
        return await self._runner.fork(self.run_id, at=at, state=state, run_id=run_id)

    async def stop(self) -> None:
        """Cancel the step in flight, close its agent handles; status ``stopped`` (final)."""
        await self._runner._stop(self.run_id)
        self._status = RunStatus.STOPPED

    async def approve(
        self, by: str, approval: str | None = None, comment: str | None = None, data: Any = None
    ) -> RunHandle:
        """Approve an approval the run waits for (see ``WorkflowRunner.approve``)."""
        return await self._runner.approve(self.run_id, by, approval, comment, data)

    async def reject(self, by: str, approval: str | None = None, reason: str | None = None) -> RunHandle:
        """Reject an approval the run waits for (see ``WorkflowRunner.reject``)."""
        return await self._runner.reject(self.run_id, by, approval, reason)

    async def snapshot(self) -> RunView:
        """The run as it is now, with its whole history: displays as tables in a notebook.

        ``print(await handle.snapshot())`` shows the same as text in a terminal.
        """
        view = RunView(self.run_id, self._runner.spec.name)
        view.refresh(await self.info())
        for ev in await self._runner.store.events(self.run_id):
            view.apply(ev)
        self._view = view
        return view

    def display(self) -> LiveView:
        """Show the run in a notebook and keep the output up to date as the run advances.

        Needs a running IPython kernel (``pip install 'agentflow-core[notebook]'``); the
        run is followed in a task on the kernel's loop until it reaches a final status.
        ``display(handle)`` (or a handle as a cell's value) does the same in a kernel.

        Raises:
            AgentflowError: IPython is not installed.
            EventLoopError: the runner runs in another event loop than this one.
        """
        self._runner.supervisor  # noqa: B018 -- bound to this loop, or the error saying it is not
        return LiveView(self)

    def _ipython_display_(self) -> None:
        from .notebook import show

        show(self)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        view = self._view
        if view is None:
            live = self._live
            view = RunView(self.run_id, self._runner.spec.name, self.status, live.step if live else None)
        return view._repr_mimebundle_()

    def _repr_html_(self) -> str:
        return self._repr_mimebundle_()["text/html"]

    def __repr__(self) -> str:
        status = self.status
        return f"<RunHandle {self.run_id} {self._runner.spec.name} {status.value if status else '?'}>"
