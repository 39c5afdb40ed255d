"""Shared test helpers: deterministic waits on runs, and task bookkeeping."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Callable

from agentflow import RunEvent, RunHandle, RunInfo, RunStatus


def log_line(path: str, line: str) -> None:
    """Append ``line`` and this process's pid to ``path``, flushed to disk: what a crash test's
    subprocess writes, so the lines survive its SIGKILL."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{line} {os.getpid()}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)


#: How long a helper waits before failing the test (runs under test finish in milliseconds).
WAIT = 5.0


async def wait_status(handle: RunHandle, *statuses: RunStatus | str, timeout: float = WAIT) -> RunInfo:
    """Poll ``handle.info()`` until the run has one of ``statuses``; fail after ``timeout`` seconds."""
    wanted = {RunStatus(s) for s in statuses}
    deadline = time.monotonic() + timeout
    while True:
        info = await handle.info()
        if info.status in wanted:
            return info
        if time.monotonic() > deadline:
            raise AssertionError(
                f"run {handle.run_id} is {info.status.value}, expected one of {sorted(wanted)}"
            )
        await asyncio.sleep(0.005)


async def wait_until(predicate: Callable[[], bool], timeout: float = WAIT, what: str = "condition") -> None:
    """Poll ``predicate()`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def all_events(handle: RunHandle, timeout: float = WAIT) -> list[RunEvent]:
    """Every event of the run, from its first until it reaches a final status."""
    out: list[RunEvent] = []
    async with asyncio.timeout(timeout):
        async for ev in handle.events():
            out.append(ev)
    return out


def other_tasks(baseline: set[asyncio.Task[object]]) -> set[asyncio.Task[object]]:
    """Tasks alive now that were not in ``baseline`` (the current task excluded)."""
    return {
        t
        for t in asyncio.all_tasks()
        if t not in baseline and t is not asyncio.current_task() and not t.done()
    }


async def wait_no_tasks(baseline: set[asyncio.Task[object]], timeout: float = WAIT) -> None:
    """Wait until every task started since ``baseline`` has ended."""
    deadline = time.monotonic() + timeout
    while left := other_tasks(baseline):
        if time.monotonic() > deadline:
            raise AssertionError(f"tasks still alive: {sorted(t.get_name() for t in left)}")
        await asyncio.sleep(0.01)


def end_process(proc: subprocess.Popen[bytes] | subprocess.Popen[str], kill: bool = False) -> None:
    """SIGTERM (a clean shutdown) or, with ``kill``, SIGKILL (a crash); SIGKILL too if it has
    not exited within 10 s. Waits for it."""
    if kill:
        proc.kill()
    else:
        proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
