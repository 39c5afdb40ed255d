"""Workflows the worker crash tests serve with ``agentflow worker fleetflows``.

The store comes from the environment (``FLEET_STORE`` sqlite|redis, ``FLEET_TARGET`` a
path or a URL); every step appends ``start NAME RUN PID`` / ``end NAME RUN PID`` to
``FLEET_LOG`` (fsynced), and ``FLEET_BLOCK=NAME`` makes that step hang in the first
process that runs it, so a test can SIGKILL the worker in the middle of it.
"""

from __future__ import annotations

import asyncio
import os

from agentflow import END, START, Next, Workflow

LOG = os.environ.get("FLEET_LOG", "fleet.log")


def log(line: str) -> None:
    fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{line} {os.getpid()}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def stage(name: str, nxt: str):
    async def run(ctx):
        log(f"start {name} {ctx.run_id}")
        if os.environ.get("FLEET_BLOCK") == name:
            await asyncio.sleep(60)
        await asyncio.sleep(0.05)
        log(f"end {name} {ctx.run_id}")
        return nxt if nxt != END else Next(END, output=os.getpid())

    run.__name__ = name
    return run


def _persistence() -> dict[str, object]:
    kind = os.environ.get("FLEET_STORE", "sqlite")
    target = os.environ.get("FLEET_TARGET", "fleet.db")
    return {"store": kind, ("path" if kind == "sqlite" else "url"): target, "lease_ttl": 1.0}


pipeline = (
    Workflow("FleetPipeline")
    .flow({START: stage("A", "B"), "B": stage("B", "C"), "C": stage("C", END)})
    .persistence(**_persistence())
)
