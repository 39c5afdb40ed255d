"""Durable stores: speed per commit, SQLite against LangGraph's SqliteSaver, parked runs.

1. Redis: a 10-step flow with a durable commit per step, runs back to back. Prints
   steps/s, one client's sequential PING rate measured in the same run, and their
   ratio: steps per round trip (target >= 0.4).
2. SQLite: the same flow on agentflow's SqliteStore and on LangGraph with a
   SqliteSaver checkpointer (one checkpoint per step). Prints the ratio (target >= 5x).
3. 10,000 runs parked at a gate on Redis: the process's memory before and after
   parking them (it holds nothing per waiting run), then the median time from
   ``approve()`` to the resumed step running (target < 5 ms).

Needs a Redis: ``REDIS_URL``, or a ``redis-server`` on PATH, which is started on a free
loopback port for the run.

    python benchmarks/bench_stores.py [--runs 300] [--parked 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import resource
import shutil
import socket
import sqlite3
import statistics
import subprocess
import tempfile
import time
import tracemalloc
from collections.abc import Iterator

from bench_core import STEPS, af_linear, lg_linear

from agentflow import END, START, HumanApproval, Wait, Workflow, WorkflowRunner


async def steps_per_second(wf: Workflow, runs: int) -> float:
    async with WorkflowRunner(wf) as runner:
        for _ in range(5):  # warm up connections and scripts
            await (await runner.run()).result()
        t = time.perf_counter()
        for _ in range(runs):
            res = await (await runner.run()).result()
        dt = time.perf_counter() - t
    assert res.state.n == STEPS
    return runs * STEPS / dt


async def ping_rate(url: str, n: int = 2000) -> float:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    try:
        await client.ping()
        t = time.perf_counter()
        for _ in range(n):
            await client.ping()
        return n / (time.perf_counter() - t)
    finally:
        await client.aclose()


def langgraph_sqlite_rate(path: str, runs: int) -> float:
    from langgraph.checkpoint.sqlite import SqliteSaver

    conn = sqlite3.connect(path, check_same_thread=False)
    try:
        graph = lg_linear(checkpointer=SqliteSaver(conn))
        for i in range(3):
            graph.invoke({"n": 0}, {"configurable": {"thread_id": f"warm{i}"}})
        t = time.perf_counter()
        for i in range(runs):
            out = graph.invoke({"n": 0}, {"configurable": {"thread_id": f"t{i}"}})
        dt = time.perf_counter() - t
    finally:
        conn.close()
    assert out["n"] == STEPS
    return runs * STEPS / dt


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


async def parked(url: str, count: int, samples: int = 50) -> tuple[float, float, int, float, float]:
    """Park ``count`` runs at a gate; return RSS before/after (MiB), Python heap held per
    parked run (bytes, by tracemalloc), and the median/max approve-to-resume latency (ms)."""
    resumed: dict[str, float] = {}

    def after(ctx):
        resumed[ctx.run_id] = time.perf_counter()
        return END

    wf = (
        Workflow("Parked")
        .flow({START: lambda ctx: Wait(HumanApproval(["lead"]), "After"), "After": after})
        .persistence(store="redis", url=url, key_prefix="bench:")
    )
    async with WorkflowRunner(wf) as runner:
        handles = [await runner.run() for _ in range(200)]
        while len(await runner.list_runs(status="waiting")) < 200:  # noqa: ASYNC110 (polls the store)
            await asyncio.sleep(0.05)
        gc.collect()
        before = rss_mib()
        tracemalloc.start()
        heap_before = tracemalloc.get_traced_memory()[0]
        for _ in range(count - 200):
            await runner.run()
        while runner.engine.local:  # noqa: ASYNC110 (every run still has to reach its gate)
            await asyncio.sleep(0.05)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - heap_before
        tracemalloc.stop()
        after_park = rss_mib()
        latencies = []
        for h in handles[:samples]:
            t = time.perf_counter()
            await runner.approve(h.run_id, by="lead")
            while h.run_id not in resumed:  # noqa: ASYNC110 (yield until the resumed step ran)
                await asyncio.sleep(0)
            latencies.append((resumed[h.run_id] - t) * 1000)
        return before, after_park, held // (count - 200), statistics.median(latencies), max(latencies)


@contextlib.contextmanager
def redis_url() -> Iterator[str]:
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("set REDIS_URL or install redis-server (make test installs it)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--dir",
                d,
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
        )
        try:
            for _ in range(200):
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.1):
                    break
                time.sleep(0.02)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            proc.wait()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--parked", type=int, default=10_000)
    args = ap.parse_args()

    with redis_url() as url, tempfile.TemporaryDirectory() as d:
        ratios, rates, pings = [], [], []
        for _ in range(args.repeats):
            rate = await steps_per_second(af_linear(store="redis", url=url, key_prefix="b:"), args.runs)
            ping = await ping_rate(url)
            rates.append(rate)
            pings.append(ping)
            ratios.append(rate / ping)
        print(f"redis: 10-step flow, one durable commit per step (median of {args.repeats})")
        print(f"  agentflow       {statistics.median(rates):>10,.0f} steps/s")
        print(f"  PING            {statistics.median(pings):>10,.0f} round trips/s")
        print(f"  steps per RTT   {statistics.median(ratios):>10.2f}    (target >= 0.4)")

        af, lg = [], []
        for i in range(args.repeats):
            af.append(await steps_per_second(af_linear(store="sqlite", path=f"{d}/af{i}.db"), args.runs))
            lg.append(langgraph_sqlite_rate(f"{d}/lg{i}.db", max(30, args.runs // 5)))
        print(f"sqlite: the same flow (median of {args.repeats})")
        print(f"  agentflow       {statistics.median(af):>10,.0f} steps/s")
        print(f"  langgraph       {statistics.median(lg):>10,.0f} steps/s  (SqliteSaver)")
        print(f"  ratio           {statistics.median(af) / statistics.median(lg):>10.1f}x   (target >= 5x)")

        before, after, per_run, median_ms, max_ms = await parked(url, args.parked)
        print(f"{args.parked:,} runs parked at a gate (redis)")
        print(f"  Python heap held per parked run {per_run:>6} bytes  (tracemalloc, after gc)")
        print(f"  RSS with 200 parked      {before:>8.1f} MiB")
        print(f"  RSS with {args.parked:,} parked {after:>8.1f} MiB  (+{after - before:.1f} MiB)")
        print(f"  approve -> resumed step  {median_ms:>8.2f} ms median, {max_ms:.2f} ms max  (target < 5 ms)")


if __name__ == "__main__":
    asyncio.run(main())
