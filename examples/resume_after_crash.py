"""A run killed with SIGKILL in the middle of a step, resumed by a new process.

    python examples/resume_after_crash.py

The script plays three parts. A first worker process starts a run of a three-step
pipeline on SQLite and is killed (SIGKILL, no clean-up at all) while the second step is
in flight. The script then reads the store: the run is still ``running`` at that step,
with the first step's output committed. A second worker calls ``runner.recover()``,
which takes the run over once the dead worker's lease has run out, re-runs only the
step that was in flight, and finishes.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile

from pydantic import BaseModel

from agentflow import END, START, Next, Workflow, WorkflowRunner


class Doc(BaseModel):
    url: str


class Progress(BaseModel):
    pages: int = 0
    summary: str | None = None


async def fetch(ctx):
    print(f"  [{os.getpid()}] fetch: downloading {ctx.input.url}", flush=True)
    await asyncio.sleep(0.1)
    ctx.set_state(pages=12)
    return "Summarize"


async def summarize(ctx):
    print(f"  [{os.getpid()}] summarize: working on {ctx.state.pages} pages", flush=True)
    if os.environ.get("CRASH_ME") == "1":
        await asyncio.sleep(3600)  # the first worker is killed in here
    await asyncio.sleep(0.1)
    ctx.set_state(summary=f"{ctx.state.pages} pages, 3 findings")
    return "Publish"


def publish(ctx):
    print(f"  [{os.getpid()}] publish: {ctx.state.summary}", flush=True)
    return Next(END, output={"summary": ctx.state.summary})


def pipeline(path: str) -> Workflow:
    return (
        Workflow("Digest", "Fetch, summarize, publish")
        .input(Doc)
        .state(Progress)
        .flow({START: fetch, "Summarize": summarize, "Publish": publish})
        .persistence(store="sqlite", path=path, lease_ttl=1.0)
    )


async def worker(command: str, path: str) -> None:
    async with WorkflowRunner(pipeline(path)) as runner:
        if command == "start":
            handle = await runner.run({"url": "https://example.com/report.pdf"}, run_id="digest-1")
            await handle.result()
            return
        handles = []
        while not handles:  # the dead worker's lease runs out within lease_ttl
            handles = await runner.recover()
            await asyncio.sleep(0.2)
        print(f"  [{os.getpid()}] recovered {[h.run_id for h in handles]}", flush=True)
        result = await handles[0].result()
        print(f"  [{os.getpid()}] {result.status.value}: {result.output}", flush=True)


async def inspect(path: str) -> None:
    async with WorkflowRunner(pipeline(path)) as runner:
        info = (await runner.list_runs())[0]
        print(f"store says: run {info.run_id} is {info.status.value} at step {info.step!r}")


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "digest.db")
        me = os.path.abspath(__file__)
        print("worker 1 starts the run")
        first = subprocess.Popen(
            [sys.executable, me, "start", path],
            env={**os.environ, "CRASH_ME": "1"},
            stdout=subprocess.PIPE,
            text=True,
        )
        assert first.stdout is not None
        for line in first.stdout:
            print(line, end="")
            if "summarize" in line:
                break
        first.send_signal(signal.SIGKILL)
        first.communicate()
        print(f"worker 1 killed with SIGKILL (exit {first.returncode}) in the middle of 'Summarize'")
        asyncio.run(inspect(path))
        print("worker 2 recovers the run")
        second = subprocess.run(
            [sys.executable, me, "recover", path], text=True, capture_output=True, check=True
        )
        print(second.stdout, end="")


if __name__ == "__main__":
    if len(sys.argv) == 3:
        asyncio.run(worker(sys.argv[1], sys.argv[2]))
    else:
        main()
