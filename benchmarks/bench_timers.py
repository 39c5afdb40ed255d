"""Durable timers at scale: memory held by sleeping runs, and how late a due timer fires.

On the in-memory store, SQLite and Redis:

1. ``--sleeping`` (10,000) runs parked on ``Wait(Sleep(3600), ...)``: the tasks alive
   (target: none per run) and the Python heap held per sleeping run, after gc, by
   tracemalloc (target: under 100 bytes, on SQLite and Redis). The in-memory store keeps
   its runs (records, events) in this same heap: its figure is printed with no target.
2. With those runs still sleeping, ``--timers`` (200) more runs whose timers come due
   spread over ``--spread`` (4) seconds: the lateness of each (the time its target step
   starts minus the due time stored with the run), median, p90 and max. Target: median
   under 250 ms. Then ``--burst`` (1,000) timers due at the same instant: how late the
   median and the last of them start (no target; it shows the cost of moving many runs
   on at once).

The runner's sweeper looks for due timers every ``SWEEP_INTERVAL`` seconds (0.2), so a
timer is on average about half of that late, plus the store round trips of the sweep.

Needs a Redis: ``REDIS_URL`` (keys under a prefix of their own, removed afterwards), or
a ``redis-server`` on PATH, started on a free loopback port.

    python benchmarks/bench_timers.py [--sleeping 10000] [--timers 200] [--burst 1000]
                                      [--only memory|sqlite|redis]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import tempfile
import time
import tracemalloc
from typing import Any

from bench_core import Row, median, pct, print_table
from bench_stores import bench_redis

from agentflow import END, START, Sleep, Wait, Workflow, WorkflowRunner

#: Runs started at once while parking (each is a create and a commit on the store).
_IN_FLIGHT = 64


def timer_workflow(**persistence: Any) -> tuple[Workflow, dict[str, float], list[int]]:
    """START sleeps until ``ctx.input["until"]`` (a Unix time); After records when it started.

    Returns the workflow, that record, and a one-item count of the naps taken.
    """
    started: dict[str, float] = {}
    naps = [0]

    def nap(ctx: Any) -> Wait:
        naps[0] += 1
        return Wait(Sleep(max(0.001, ctx.input["until"] - time.time())), "After")

    def after(ctx: Any) -> str:
        started[ctx.run_id] = time.time()
        return END

    wf = Workflow("Timers").flow({START: nap, "After": after})
    if persistence:
        wf = wf.persistence(**persistence)
    return wf, started, naps


async def start(runner: WorkflowRunner, inputs: list[dict[str, float]], ids: list[str]) -> None:
    """Start a run per input, ``_IN_FLIGHT`` at a time (each is a create and a commit on the store)."""
    for i in range(0, len(ids), _IN_FLIGHT):
        chunk = zip(inputs[i : i + _IN_FLIGHT], ids[i : i + _IN_FLIGHT], strict=True)
        await asyncio.gather(*(runner.run(inp, run_id=rid) for inp, rid in chunk))


async def sleeping(runner: WorkflowRunner, ids: list[str]) -> None:
    """Wait until every run of ``ids`` is sleeping (reads each run's record)."""
    for rid in ids:
        await (await runner.attach(rid)).wait_for("waiting", timeout=60)


async def heap_per_sleeping_run(runner: WorkflowRunner, naps: list[int], count: int) -> tuple[float, int]:
    """Park ``count`` runs; the Python heap they hold, per run, and the tasks they added."""
    ids = [os.urandom(16).hex() for _ in range(count)]
    inputs = [{"until": time.time() + 3600.0} for _ in range(count)]
    warm = min(200, count // 10)
    await start(runner, inputs[:warm], ids[:warm])  # connections, caches, the sweeper: warmed up first
    await sleeping(runner, ids[:warm])
    await asyncio.sleep(0.5)  # the warm-up runs' last callbacks
    tasks = len(asyncio.all_tasks())
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    await start(runner, inputs[warm:], ids[warm:])
    # Every run took its nap and the last one is parked; the others are checked below,
    # outside tracemalloc (reading a record back leaves its strings in pydantic's cache
    # of decoded JSON strings, which the runs themselves do not).
    while naps[0] < count:  # noqa: ASYNC110 (each run has to reach its timer)
        await asyncio.sleep(0.01)
    await sleeping(runner, ids[-1:])
    await asyncio.sleep(0.5)  # a sweep or two, and the last commits' callbacks
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    added = len(asyncio.all_tasks()) - tasks
    await sleeping(runner, ids)
    return held / (count - warm), added


async def lateness(runner: WorkflowRunner, started: dict[str, float], until: list[float]) -> list[float]:
    """Park a run per due time of ``until``; the lateness (s) of each one's target step.

    The due time compared with is the one stored with the run (its ``waiting`` event).
    """
    ids = [os.urandom(16).hex() for _ in until]
    await start(runner, [{"until": u} for u in until], ids)
    last = max(until)
    while not all(rid in started for rid in ids):
        if time.time() > last + 60:
            raise SystemExit(f"{sum(rid not in started for rid in ids)} timers did not fire within 60 s")
        await asyncio.sleep(0.05)
    late = []
    for rid in ids:
        waiting = next(e for e in await runner.store.events(rid) if e.kind == "waiting")
        late.append(started[rid] - waiting.data["deadline"])
    return late


def ms(x: float) -> str:
    return f"{x * 1000:.0f} ms"


async def bench(label: str, args: argparse.Namespace, **persistence: Any) -> list[Row]:
    wf, started, naps = timer_workflow(**persistence)
    async with WorkflowRunner(wf) as runner:
        print(f"  {label}: parking {args.sleeping:,} sleeping runs", flush=True)
        t = time.perf_counter()
        heap, tasks = await heap_per_sleeping_run(runner, naps, args.sleeping)
        took = time.perf_counter() - t
        print(
            f"  {label}: parked in {took:.1f} s; {args.timers} timers due over {args.spread:g} s", flush=True
        )
        # Due times far enough ahead for every run to be parked before the first is due.
        ahead = 1.0 + 2 * took * max(args.timers, args.burst) / args.sleeping
        t0 = time.time() + ahead
        spread = [t0 + args.spread * i / max(1, args.timers - 1) for i in range(args.timers)]
        late = await lateness(runner, started, spread)
        burst = await lateness(runner, started, [time.time() + ahead] * args.burst) if args.burst else []
    in_store = label == "memory"
    rows = [
        Row(
            f"{label}: tasks added by {args.sleeping:,} sleeping runs", str(tasks), target="0", ok=tasks <= 0
        ),
        Row(
            f"{label}: Python heap held per sleeping run",
            f"{heap:.0f} B",
            "the store's own data: records, events" if in_store else "",
            target="" if in_store else "< 100 B",
            ok=None if in_store else heap < 100,
        ),
        Row(
            f"{label}: lateness of a due timer, median ({args.timers} due over {args.spread:g} s)",
            ms(median(late)),
            f"p90 {ms(pct(late, 0.9))}, max {ms(max(late))}",
            target="< 250 ms",
            ok=median(late) < 0.25,
        ),
    ]
    if burst:
        rows.append(
            Row(
                f"{label}: {args.burst:,} timers due at once: lateness median",
                ms(median(burst)),
                f"last {ms(max(burst))}",
            )
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--sleeping", type=int, default=10_000, help="runs left sleeping (heap and tasks measured)"
    )
    ap.add_argument("--timers", type=int, default=200, help="timers whose lateness is measured")
    ap.add_argument("--spread", type=float, default=4.0, help="seconds those timers come due over")
    ap.add_argument("--burst", type=int, default=1000, help="timers due at the same instant (0: skip)")
    ap.add_argument("--dir", default=None, help="where the SQLite file goes")
    ap.add_argument(
        "--only", choices=["memory", "sqlite", "redis"], action="append", help="stores to measure"
    )
    args = ap.parse_args()
    only = set(args.only or ["memory", "sqlite", "redis"])

    t0 = time.perf_counter()
    rows: list[Row] = []
    if "memory" in only:
        rows += asyncio.run(bench("memory", args))
    if "sqlite" in only:
        with tempfile.TemporaryDirectory(dir=args.dir) as d:
            rows += asyncio.run(bench("sqlite", args, store="sqlite", path=f"{d}/timers.db"))
    if "redis" in only:
        with bench_redis() as (url, prefix):
            rows += asyncio.run(bench("redis", args, store="redis", url=url, key_prefix=prefix))
    print_table(
        f"Timers: {args.sleeping:,} runs sleeping in one process (each store at its defaults)", rows, peer=""
    )
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
