"""Leases under a blocked event loop and skewed clocks (SPEC section 8)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from agentflow import END, START, RunStatus, Workflow, WorkflowRunner
from agentflow.stores import SqliteStore


def blocking_flow(path: Path, calls: list[str], seconds: float) -> Workflow:
    def hog(ctx):
        calls.append("hog")
        time.sleep(seconds)  # blocks the event loop: no await anywhere
        return END

    return (
        Workflow("Hog")
        .flow({START: lambda ctx: "Hog", "Hog": hog})
        .persistence(store="sqlite", path=str(path), lease_ttl=1.2)
    )


def recover_in_thread(path: Path, wf: Workflow, stop: threading.Event, found: list[str]) -> None:
    """Another "process": its own event loop and store, calling recover() again and again."""

    async def main() -> None:
        async with WorkflowRunner(wf, store=SqliteStore(str(path))) as other:
            while not stop.is_set():
                found.extend(h.run_id for h in await other.recover())
                await asyncio.sleep(0.05)

    asyncio.run(main())


async def test_a_step_that_blocks_the_loop_past_lease_ttl_keeps_its_lease(tmp_path: Path) -> None:
    calls: list[str] = []
    path = tmp_path / "runs.db"
    wf = blocking_flow(path, calls, seconds=3.6)  # three lease_ttls
    stop = threading.Event()
    stolen: list[str] = []
    async with WorkflowRunner(wf) as runner:
        handle = await runner.run()
        thread = threading.Thread(target=recover_in_thread, args=(path, wf, stop, stolen))
        thread.start()
        try:
            result = await handle.result(timeout=10)
        finally:
            stop.set()
            await asyncio.to_thread(thread.join)
    assert result.status == RunStatus.COMPLETED
    assert stolen == [], "another process took over a run whose owner was only busy"
    assert calls == ["hog"], "the blocking step ran twice"
