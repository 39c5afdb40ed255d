"""A client and two workers sharing one SQLite file: runs handed over, and moved on a stop.

    python examples/fleet.py

The client (``WorkflowRunner(wf, execute=False)``) starts six runs of a four-step
pipeline and only follows them. Two worker processes (``Worker(wf, concurrency=3)``,
what ``agentflow worker`` runs) claim them from the store's queue, three each, since
neither takes more than it has room for. Halfway through, the first worker gets
SIGTERM: it finishes the steps in flight, commits them and puts its runs back on the
queue, and the second worker carries them on. Each step records which process ran it,
so the output shows runs that moved, and that no step ran twice.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time

from pydantic import BaseModel

from agentflow import END, START, Next, Worker, Workflow, WorkflowRunner


class Trail(BaseModel):
    ran_by: list[str] = []  # "step@pid" for every step, in order


def stage(name: str, nxt: str):
    async def run(ctx):
        await asyncio.sleep(0.4)  # standing in for a model call
        ctx.set_state(ran_by=[*ctx.state.ran_by, f"{name}@{os.getpid()}"])
        return nxt if nxt != END else Next(END, output=ctx.state.ran_by)

    run.__name__ = name
    return run


def pipeline(path: str) -> Workflow:
    return (
        Workflow("Pipeline", "Four steps, any worker")
        .state(Trail)
        .flow(
            {
                START: lambda ctx: "Fetch",
                "Fetch": stage("Fetch", "Parse"),
                "Parse": stage("Parse", "Score"),
                "Score": stage("Score", "Store"),
                "Store": stage("Store", END),
            }
        )
        .persistence(store="sqlite", path=path, lease_ttl=2.0)
    )


async def work(path: str) -> None:
    worker = Worker(pipeline(path), concurrency=3, grace=10)
    print(f"worker {os.getpid()} serving", flush=True)
    await worker.serve()  # until SIGTERM
    stats = await worker.statistics()
    print(f"worker {os.getpid()} stopped after taking {stats.claimed} runs", flush=True)


async def client(path: str, workers: list[subprocess.Popen[str]]) -> None:
    async with WorkflowRunner(pipeline(path), execute=False) as runner:
        handles = [await runner.run(run_id=f"run-{i}") for i in range(6)]
        print(f"client {os.getpid()} started {len(handles)} runs; it runs none of them")
        await asyncio.sleep(1.0)
        workers[0].send_signal(signal.SIGTERM)
        print(f"client sent SIGTERM to worker {workers[0].pid}")
        started = time.monotonic()
        for h in handles:
            result = await h.result(timeout=60)
            pids = sorted({step.split("@")[1] for step in result.output})
            moved = "moved" if len(pids) > 1 else "stayed"
            print(f"{h.run_id}: {result.status.value}, {moved}: {' '.join(result.output)}")
        print(f"all done {time.monotonic() - started:.1f} s after the stop")


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "fleet.db")
        me = os.path.abspath(__file__)
        workers = [
            subprocess.Popen([sys.executable, me, "worker", path], stdout=subprocess.PIPE, text=True)
            for _ in range(2)
        ]
        for w in workers:
            assert w.stdout is not None
            print(w.stdout.readline(), end="")  # "serving": both are up
        try:
            asyncio.run(client(path, workers))
        finally:
            workers[1].send_signal(signal.SIGTERM)
            for w in workers:
                out, _ = w.communicate(timeout=30)
                print(out, end="")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "worker":
        asyncio.run(work(sys.argv[2]))
    else:
        main()
