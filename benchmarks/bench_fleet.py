"""Workers under load: an I/O-bound fleet, the hand-over latency, and a CPU-bound ceiling.

    python benchmarks/bench_fleet.py [--runs 2000] [--stores redis,sqlite,sqlite-full] [--quick]
        [--workers 1,2] [--concurrency 50,100] [--repeats 3] [--fleet-only]

1. **I/O-bound fleet.** ``--runs`` runs of 10 steps that each sleep 50 ms (standing in
   for model calls), started by a client (``execute=False``) and executed by W worker
   processes of concurrency C. Wall time from the first run queued to the last result,
   beside the ideal ``runs x 10 x 50 ms / (W x C)``: W = 1, 2, 4 and C = 50, 100 on
   Redis (and PostgreSQL when ``--stores`` names it), W = 1, 2 on SQLite: ``sqlite`` at
   ``durability="normal"``, ``sqlite-full`` at ``"full"`` (the default, a flush a commit).
2. **Hand-over latency**, one worker: ``approve()`` in the client to the next step
   starting in the worker, and the worker's last commit to ``result()`` waking in the
   client (the step stamps ``time.time()``; one machine, one clock). Median and p99.
3. **CPU-bound ceiling**: steps per second of one worker, and of two, with 100 runs in
   flight of steps that do nothing; on Redis with the server's CPU per step beside it
   (``INFO cpu``).

Redis: ``REDIS_URL``, or a ``redis-server`` on PATH started on a free port. PostgreSQL
(``--stores redis,postgres,sqlite``): ``DATABASE_URL``, or a throwaway server started with
Debian's ``initdb``/``pg_ctl`` (``make postgresql`` installs them).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from bench_stores import redis_url

from agentflow import END, START, HumanApproval, Next, Wait, Worker, Workflow, WorkflowRunner
from agentflow.stores.contract import Store

STEPS = 10
SLEEP = 0.05


def store_for(kind: str, target: str, prefix: str = "") -> Store:
    if kind in ("sqlite", "sqlite-full"):  # "sqlite": durability="normal"; "sqlite-full": the default
        from agentflow.stores import SqliteStore

        durability = "full" if kind == "sqlite-full" else "normal"
        return SqliteStore(target, key_prefix=prefix, durability=durability)
    if kind == "redis":
        from agentflow.stores.redis import RedisStore

        return RedisStore(target, key_prefix=prefix, max_connections=256)
    from agentflow.stores.postgres import PostgresStore

    return PostgresStore(target, key_prefix=prefix, max_connections=32)


def io_flow() -> Workflow:
    async def work(ctx: Any) -> Any:
        await asyncio.sleep(SLEEP)
        n = int(ctx.step_name[1:])
        return f"s{n + 1}" if n + 1 < STEPS else Next(END, output=n)

    steps: dict[str, Any] = {f"s{i}": work for i in range(STEPS)}
    return Workflow("FleetIO").flow({START: lambda ctx: "s0", **steps})


def cpu_flow() -> Workflow:
    def work(ctx: Any) -> Any:
        n = int(ctx.step_name[1:])
        return f"s{n + 1}" if n + 1 < STEPS else END

    steps: dict[str, Any] = {f"s{i}": work for i in range(STEPS)}
    return Workflow("FleetCPU").flow({START: lambda ctx: "s0", **steps})


def gated_flow() -> Workflow:
    return Workflow("FleetGate").flow(
        {
            START: lambda ctx: Wait(HumanApproval(["ops"]), "After"),
            "After": lambda ctx: Next(END, output=time.time()),
        }
    )


FLOWS = {"io": io_flow, "cpu": cpu_flow, "gate": gated_flow}


async def work(kind: str, target: str, prefix: str, flow: str, concurrency: int) -> None:
    worker = Worker(FLOWS[flow](), concurrency=concurrency, store=store_for(kind, target, prefix), grace=5)
    print("ready", flush=True)
    await worker.serve()


@contextlib.contextmanager
def workers(kind: str, target: str, prefix: str, flow: str, n: int, concurrency: int) -> Iterator[None]:
    me = os.path.abspath(__file__)
    procs = [
        subprocess.Popen(
            [sys.executable, me, "--worker", kind, target, prefix, flow, str(concurrency)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(n)
    ]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        yield
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=60)


async def fleet(kind: str, target: str, runs: int, w: int, c: int) -> float:
    prefix = f"io{time.monotonic_ns()}:"
    store = store_for(kind, target, prefix)
    with workers(kind, target, prefix, "io", w, c):
        async with WorkflowRunner(io_flow(), store=store, execute=False) as client:
            started = time.perf_counter()
            handles = await asyncio.gather(*(client.run() for _ in range(runs)))
            await asyncio.gather(*(h.result(timeout=600) for h in handles))
            wall = time.perf_counter() - started
    await store.close()
    return wall


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def handover(kind: str, target: str, samples: int) -> tuple[list[float], list[float]]:
    prefix = f"ho{time.monotonic_ns()}:"
    store = store_for(kind, target, prefix)
    to_worker: list[float] = []
    to_client: list[float] = []
    with workers(kind, target, prefix, "gate", 1, 100):
        async with WorkflowRunner(gated_flow(), store=store, execute=False) as client:
            for _ in range(samples):
                handle = await client.run()
                await handle.wait_for("waiting", timeout=30)
                decided = time.time()
                await client.approve(handle.run_id, by="ops")
                result = await handle.result(timeout=30)
                woke = time.time()
                stepped = float(result.output)
                to_worker.append(stepped - decided)
                events = [e async for e in handle.events()]
                committed = events[-1].at
                to_client.append(woke - committed)
    await store.close()
    return to_worker, to_client


def redis_cpu(url: str) -> float:
    import redis

    info = redis.Redis.from_url(url).info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


async def ceiling(kind: str, target: str, w: int, runs: int) -> tuple[float, float | None]:
    prefix = f"cpu{time.monotonic_ns()}:"
    store = store_for(kind, target, prefix)
    with workers(kind, target, prefix, "cpu", w, 100):
        async with WorkflowRunner(cpu_flow(), store=store, execute=False) as client:
            cpu0 = redis_cpu(target) if kind == "redis" else None
            started = time.perf_counter()
            handles = await asyncio.gather(*(client.run() for _ in range(runs)))
            await asyncio.gather(*(h.result(timeout=600) for h in handles))
            wall = time.perf_counter() - started
            per_step = None if cpu0 is None else (redis_cpu(target) - cpu0) / (runs * STEPS)
    await store.close()
    return runs * STEPS / wall, per_step


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """``REDIS_URL``, or a ``redis-server`` started on a free port (as bench_stores does)."""
    with redis_url() as (url, _ours):
        yield url


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """A throwaway PostgreSQL server (the tests' fixture class: initdb + pg_ctl on a free port)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from postgres_server import PostgresServer

    server = PostgresServer()
    server.init()
    server.start()
    try:
        yield server.url
    finally:
        server.remove()


async def main(args: argparse.Namespace) -> None:
    kinds = args.stores.split(",")
    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory() as d:
        targets = {}
        for kind in kinds:
            if kind == "redis":
                targets[kind] = stack.enter_context(redis_server())
            elif kind in ("sqlite", "sqlite-full"):
                targets[kind] = os.path.join(d, f"{kind}.db")
            elif kind == "postgres":
                targets[kind] = os.environ.get("DATABASE_URL") or stack.enter_context(postgres_server())
        print(f"1. I/O-bound fleet: {args.runs} runs x {STEPS} steps x {SLEEP * 1000:.0f} ms")
        head = f"{'store':<11} {'W':>2} {'C':>4} {'wall s':>8} {'ideal s':>8} {'over ideal':>11}"
        print(f"{head}  rounds, load")
        for kind in kinds:
            ws = (1, 2) if kind.startswith("sqlite") else (1, 2, 4)
            cs = (50,) if args.quick else (50, 100)
            if args.workers:
                ws = tuple(int(w) for w in args.workers.split(","))
            if args.concurrency:
                cs = tuple(int(c) for c in args.concurrency.split(","))
            for w in ws if not args.quick else ws[:2]:
                for c in cs:
                    ideal = args.runs * STEPS * SLEEP / (w * c)
                    walls, loads = [], []
                    for _ in range(args.repeats):
                        walls.append(await fleet(kind, targets[kind], args.runs, w, c))
                        loads.append(os.getloadavg()[0])
                    wall = statistics.median(walls)
                    rounds = " ".join(f"{x:.2f}" for x in walls)
                    print(
                        f"{kind:<11} {w:>2} {c:>4} {wall:>8.2f} {ideal:>8.2f} {wall / ideal - 1:>+10.1%}"
                        f"  [{rounds}], load {min(loads):.1f}-{max(loads):.1f}",
                        flush=True,
                    )
        if args.fleet_only:
            return
        print(f"\n2. Hand-over latency ({args.samples} samples, one worker), ms")
        print(f"{'store':<11} {'approve->step p50':>18} {'p99':>7} {'commit->result p50':>19} {'p99':>7}")
        for kind in kinds:
            a, b = await handover(kind, targets[kind], args.samples)
            print(
                f"{kind:<11} {statistics.median(a) * 1000:>18.2f} {pct(a, 0.99) * 1000:>7.2f} "
                f"{statistics.median(b) * 1000:>19.2f} {pct(b, 0.99) * 1000:>7.2f}",
                flush=True,
            )
        print("\n3. CPU-bound ceiling (100 runs in flight per worker, steps that do nothing)")
        for kind in kinds:
            for w in (1, 2):
                rate, cpu = await ceiling(kind, targets[kind], w, args.cpu_runs)
                extra = "" if cpu is None else f", Redis CPU {cpu * 1e6:.1f} µs per step"
                print(f"{kind:<11} W={w}: {rate:,.0f} steps/s{extra}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        kind, target, prefix, flow, concurrency = sys.argv[2:7]
        asyncio.run(work(kind, target, prefix, flow, int(concurrency)))
    else:
        ap = argparse.ArgumentParser(
            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        ap.add_argument("--runs", type=int, default=2000)
        ap.add_argument("--samples", type=int, default=200)
        ap.add_argument("--cpu-runs", type=int, default=1000)
        ap.add_argument("--stores", default="redis,postgres,sqlite,sqlite-full")
        ap.add_argument("--quick", action="store_true", help="fewer configurations")
        ap.add_argument("--workers", default="", help="worker counts W of the fleet, e.g. 1,2")
        ap.add_argument("--concurrency", default="", help="concurrencies C of the fleet, e.g. 50,100")
        ap.add_argument("--repeats", type=int, default=1, help="rounds per configuration (median shown)")
        ap.add_argument("--fleet-only", action="store_true", help="the I/O-bound fleet alone")
        asyncio.run(main(ap.parse_args()))
