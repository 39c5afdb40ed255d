"""A workflow with a durable timer for the crash tests, runnable as a subprocess.

    python tests/timerflows.py start|recover STORE TARGET LOG RUN_ID

``STORE`` is ``sqlite`` or ``redis``; ``TARGET`` the SQLite path or the Redis URL. Each
step appends ``start NAME PID`` to ``LOG`` (append-only, fsynced per line). ``start``
runs until the run sleeps (``TIMER_SECONDS``, default 1.5), prints ``waiting`` and then
idles until it is killed; ``recover`` calls ``recover()`` and follows the run to its end.
"""

from __future__ import annotations

import asyncio
import os
import sys

from helpers import log_line

from agentflow import END, START, Next, RunStatus, Sleep, Wait, Workflow, WorkflowRunner


def log(path: str, line: str) -> None:
    log_line(path, line)


def timer_flow(store: str, target: str, log_path: str) -> Workflow:
    opts = {"store": store, "lease_ttl": 1.0, "path" if store == "sqlite" else "url": target}
    seconds = float(os.environ.get("TIMER_SECONDS", "1.5"))

    def nap(ctx):
        log(log_path, "start Nap")
        return Wait(Sleep(seconds), "After")

    def after(ctx):
        log(log_path, "start After")
        return Next(END, output=os.getpid())

    return Workflow("CrashTimer").flow({START: nap, "After": after}).persistence(**opts)


async def main(cmd: str, store: str, target: str, log_path: str, run_id: str) -> None:
    async with WorkflowRunner(timer_flow(store, target, log_path)) as runner:
        if cmd == "start":
            handle = await runner.run(None, run_id=run_id)
            await handle.wait_for(RunStatus.WAITING, timeout=30)
            print("waiting", flush=True)
            await asyncio.sleep(3600)  # parked; the test kills this process
            return
        await runner.recover()
        result = await (await runner.attach(run_id)).result(timeout=60)
        print(f"result {result.status.value} {result.output}", flush=True)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:6]))
