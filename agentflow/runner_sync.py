"""The one event loop a runner lives in, and ``run_sync`` for code that is not async.

A runner's runs advance as tasks of the event loop it was first used in (its
supervisor, leases, timers and watchers are made there). Used from another loop
(a second ``asyncio.run``, a thread with a loop of its own) those tasks would never run
again and the run would be silently orphaned, so the runner's public calls check the
loop they are called from (:func:`check_loop`, one comparison) and raise
:class:`~agentflow.errors.EventLoopError` instead.

``runner.run_sync(input)`` serves scripts and notebook cells that are not async: the
runner is given a loop of its own in a daemon thread (:class:`LoopThread`), where its
runs advance between calls too (a timer fires, a decided run goes on), and the caller
blocks until the run ends or parks. It works the same with or without a running loop
in the calling thread (a Jupyter kernel has one), because it never uses the caller's.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import EventLoopError
from .types import RunInfo, RunResult, RunStatus

if TYPE_CHECKING:
    from .runner import WorkflowRunner

__all__ = ["LoopThread", "check_loop", "close", "close_sync", "run_sync", "running_loop"]

T = TypeVar("T")


def running_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop running in this thread, or None."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _where(runner: WorkflowRunner) -> str:
    bound = runner._loop
    if runner._thread is not None and bound is runner._thread.loop:
        return "the event loop of its run_sync thread"
    if bound is not None and bound.is_closed():
        return "an event loop that is closed now, its runs stopped with it (they are recoverable)"
    return "another event loop"


def check_loop(runner: WorkflowRunner) -> None:
    """Raise ``EventLoopError`` when ``runner`` is called from a loop other than its own.

    Calls from code with no running loop (a property read in a script) pass: they
    schedule nothing.
    """
    bound = runner._loop
    if bound is None:
        return
    loop = running_loop()
    if loop is None or loop is bound:
        return
    raise EventLoopError(
        f"the runner of workflow {runner.spec.name!r} is used from an event loop other than the "
        f"one it was first used in, {_where(runner)}; its runs advance as tasks of that loop and "
        "would be orphaned here. Use each runner from one loop: make a new WorkflowRunner in this "
        "one (the runs are in the store: attach() or recover() them), or await runner.close() "
        "first; a runner driven by run_sync() is used through run_sync() only"
    )


class LoopThread:
    """An event loop of its own, run by a daemon thread, for a runner used from sync code."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on this loop; its future, to wait on from any thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        """Stop the loop, wait for the thread and close the loop (call once nothing runs there)."""
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


async def _drive(runner: WorkflowRunner, input: Any, run_id: str | None, timeout: float | None) -> Any:
    handle = await runner.run(input, run_id=run_id)
    info = await handle.wait_for(RunStatus.WAITING, RunStatus.PAUSED, timeout=timeout)
    if info.status in (RunStatus.WAITING, RunStatus.PAUSED):
        return info
    return await handle.result()  # completed, or raises why it ended otherwise


def run_sync(
    runner: WorkflowRunner, input: Any = None, run_id: str | None = None, timeout: float | None = None
) -> RunResult | RunInfo:
    """Start a run and block until it ends (its ``RunResult``) or parks (its ``RunInfo``).

    See :meth:`agentflow.WorkflowRunner.run_sync`.
    """
    loop = running_loop()
    if runner._loop is not None and runner._loop is loop:
        raise EventLoopError(
            f"run_sync() of the runner of workflow {runner.spec.name!r} would block the event loop "
            "its runs advance in; in async code (a notebook cell) use handle = await runner.run(...) "
            "and await handle.result()"
        )
    if runner._thread is None:
        if runner._loop is not None:
            raise EventLoopError(
                f"the runner of workflow {runner.spec.name!r} already runs in an event loop "
                f"({_where(runner)}); run_sync() cannot block on it from here. Make a new "
                "WorkflowRunner for synchronous code"
            )
        runner._thread = LoopThread(f"agentflow:{runner.spec.name}")
    future = runner._thread.submit(_drive(runner, input, run_id, timeout))
    result: RunResult | RunInfo = future.result()
    return result


async def close(runner: WorkflowRunner) -> None:
    """Close ``runner``: in its run_sync thread's loop (then end the thread), else in this one.

    A runner whose loop is closed (its tasks went with it) is closed from any loop.

    Raises:
        EventLoopError: the runner's loop is another, still open one.
    """
    thread = runner._thread
    if thread is None:
        if runner._loop is not None and not runner._loop.is_closed():
            check_loop(runner)  # its runs' tasks are closed in their loop, or not at all
        await runner._close()
        return
    runner._thread = None
    try:
        await asyncio.wrap_future(thread.submit(runner._close()))
    finally:
        await asyncio.to_thread(thread.stop)


def close_sync(runner: WorkflowRunner) -> None:
    """:func:`close` for code that is not async (the one-shot ``agentflow.run_sync``)."""
    thread = runner._thread
    if thread is None:
        return
    runner._thread = None
    try:
        thread.submit(runner._close()).result()
    finally:
        thread.stop()
