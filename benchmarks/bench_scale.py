"""The cost of a step must not grow with what is stored: SQLite and Redis.

1. With ``--runs`` (100,000) finished runs of a workflow stored, and ``--parked`` (5)
   runs of it waiting at a gate: ``runner.recover()`` with nothing to recover, and
   ``runner.list_runs(status="waiting")`` (which must return the parked runs), each the
   median of several calls from a runner that did not create the runs. Target: each
   under 20 ms.

   The runs are stored by running them (a one-step flow, many in flight), so they went
   through the store's whole lifecycle as a user's runs do; on SQLite at
   ``durability="normal"`` when the store has the option, which only makes that faster.
2. A run whose state holds 1 MB (a string field set by its first step), then steps that
   do not touch the state: bytes written to the store per step. Target: under 50 KB.
   Beside it, steps that change one small field of that state (a few bytes, of a new
   length each time; no target). Measured between the starts of consecutive steps, so
   one step's commit falls in each interval (the first interval of a run is left out):
   on SQLite the bytes this process hands to ``write()`` (``wchar`` of ``/proc/self/io``:
   WAL frames, and any checkpoint into the database file), on Redis the growth of the
   server's ``total_net_input_bytes`` (the store's requests; the reading itself is
   subtracted). Median over the steps, and the mean (which includes the occasional WAL
   checkpoint).

Needs a Redis: ``REDIS_URL`` (keys under a prefix of their own, removed afterwards), or
a ``redis-server`` on PATH, started on a free loopback port. Linux (``/proc``).

    python benchmarks/bench_scale.py [--runs 100000] [--calls 7] [--only sqlite|redis]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bench_core import Row, median, print_table
from bench_stores import bench_redis, durability_option
from pydantic import BaseModel

from agentflow import END, START, HumanApproval, Wait, Workflow, WorkflowRunner

MB = 1_000_000


# -- many stored runs ---------------------------------------------------------------------


def scale_workflow(**persistence: Any) -> Workflow:
    """One step to the end, or (input ``{"park": true}``) to a gate."""
    return (
        Workflow("Scale")
        .flow(
            {
                START: lambda ctx: "Gate" if ctx.input["park"] else END,
                "Gate": lambda ctx: Wait(HumanApproval(["ops"]), "Done"),
                "Done": lambda ctx: END,
            }
        )
        .persistence(**persistence)
    )


async def fill(wf: Workflow, runs: int, parked: int, concurrency: int = 64) -> float:
    """Store ``runs`` finished runs and ``parked`` waiting ones; returns runs per second."""
    async with WorkflowRunner(wf) as runner:
        left, done, t = runs, 0, time.perf_counter()
        step = max(1, runs // 10)

        async def client() -> None:
            nonlocal left, done
            while left > 0:
                left -= 1
                res = await (await runner.run({"park": False})).result()
                assert res.status == "completed", res
                done += 1
                if done % step == 0:
                    print(f"    {done:,} runs stored ({done / (time.perf_counter() - t):,.0f}/s)", flush=True)

        await asyncio.gather(*(client() for _ in range(concurrency)))
        rate = runs / (time.perf_counter() - t)
        for _ in range(parked):
            await runner.run({"park": True})
        deadline = time.monotonic() + 60
        while len(await runner.list_runs(status="waiting")) < parked:
            assert time.monotonic() < deadline, "parked runs did not reach their gate"
            await asyncio.sleep(0.05)
    return rate


async def queries(wf: Workflow, parked: int, calls: int, budget: float) -> tuple[list[float], list[float]]:
    """Seconds per ``recover()`` and per ``list_runs(status="waiting")``, calls alternating.

    ``calls`` of each, or fewer (at least 3) once ``budget`` seconds are spent. A first
    call of each is a warm-up, kept as a measurement when it took over a second.
    """
    async with WorkflowRunner(wf) as runner:

        async def recover() -> None:
            handles = await runner.recover()
            assert not handles, f"recover() found {len(handles)} runs to recover"

        async def waiting() -> None:
            infos = await runner.list_runs(status="waiting")
            assert len(infos) == parked, f"list_runs(status='waiting') returned {len(infos)}, not {parked}"

        kinds = (recover, waiting)
        times: tuple[list[float], list[float]] = ([], [])
        start = time.perf_counter()
        for call, out in zip(kinds, times, strict=True):
            t = time.perf_counter()
            await call()
            if (dt := time.perf_counter() - t) > 1.0:
                out.append(dt)
        while (done := min(map(len, times))) < calls and (done < 3 or time.perf_counter() - start < budget):
            for call, out in zip(kinds, times, strict=True):
                if len(out) < calls:
                    t = time.perf_counter()
                    await call()
                    out.append(time.perf_counter() - t)
    return times


# -- bytes written per step ------------------------------------------------------------------


class Big(BaseModel):
    blob: str = ""
    tag: str = ""


def wchar() -> int:
    """Bytes this process has handed to write() so far."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("wchar:"):
                return int(line.split()[1])
    raise RuntimeError("no wchar in /proc/self/io")


def big_workflow(
    meter: Callable[[], Awaitable[int]], readings: list[int], steps: int, touch: bool
) -> Workflow:
    """A first step that puts 1 MB in the state, then ``steps`` steps that read ``meter``
    at their start (into ``readings``) and change nothing in the state (or, with
    ``touch``, one small field)."""
    blob = os.urandom(MB // 2).hex()

    def first(ctx: Any) -> str:
        ctx.set_state(blob=blob)
        return "Tick"

    async def tick(ctx: Any) -> str:
        readings.append(await meter())
        if touch:
            # A new length each time, so that no store can get away with patching bytes in place.
            ctx.set_state(tag="t" * len(readings))
        return "Tick" if len(readings) <= steps + 1 else END

    return Workflow("Big").state(Big).flow({START: first, "Tick": tick})


async def bytes_per_step(
    runner_for: Callable[[Workflow], WorkflowRunner],
    meter: Callable[[], Awaitable[int]],
    overhead: int,
    steps: int,
    touch: bool,
    runs: int = 3,
) -> list[int]:
    """Bytes written between the starts of consecutive steps, less the meter's own ``overhead``.

    The first interval of each run is left out: it may still hold the commit of the step
    that set the 1 MB.
    """
    deltas: list[int] = []
    for _ in range(runs):
        readings: list[int] = []
        async with runner_for(big_workflow(meter, readings, steps, touch)) as runner:
            res = await (await runner.run()).result()
            assert res.status == "completed" and len(res.state.blob) == MB, res.status
        deltas += [b - a - overhead for a, b in itertools.pairwise(readings[1:])]
    return deltas


# -- the two stores -------------------------------------------------------------------------


def kb(n: float) -> str:
    return f"{n / 1000:,.1f} KB"


def rows_for(
    store: str, rate: float, runs: int, rec: list[float], lst: list[float], still: list[int], small: list[int]
) -> list[Row]:
    def ms(xs: list[float]) -> str:
        return f"{median(xs) * 1000:.2f} ms"

    return [
        Row(f"{store}: runs stored by running them", f"{runs:,}", f"{rate:,.0f} runs/s"),
        Row(
            f"{store}: recover(), nothing to do",
            ms(rec),
            f"{len(rec)} calls",
            target="< 20 ms",
            ok=median(rec) < 0.02,
        ),
        Row(
            f"{store}: list_runs(status='waiting')",
            ms(lst),
            f"{len(lst)} calls",
            target="< 20 ms",
            ok=median(lst) < 0.02,
        ),
        Row(
            f"{store}: bytes per step, 1 MB state untouched",
            kb(median(still)),
            f"mean {kb(statistics.fmean(still))}",
            target="< 50 KB",
            ok=median(still) < 50_000,
        ),
        Row(
            f"{store}: bytes per step, one small field set",
            kb(median(small)),
            f"mean {kb(statistics.fmean(small))}",
        ),
    ]


async def sqlite_bench(folder: str, args: argparse.Namespace) -> list[Row]:
    path = f"{folder}/scale.db"
    # Stored faster without an fsync per commit; what is measured does not depend on it.
    opts = {"durability": "normal"} if durability_option() == "persistence" else {}
    durability = opts.get("durability", "the store's default")
    print(f"  sqlite: storing {args.runs:,} runs in {path}, durability {durability}", flush=True)
    rate = await fill(scale_workflow(store="sqlite", path=path, **opts), args.runs, args.parked)
    rec, lst = await queries(
        scale_workflow(store="sqlite", path=path, **opts), args.parked, args.calls, args.budget
    )

    async def meter() -> int:
        return wchar()

    def runner_for(wf: Workflow) -> WorkflowRunner:
        return WorkflowRunner(wf.persistence(store="sqlite", path=f"{folder}/big.db"))

    still = await bytes_per_step(runner_for, meter, 0, args.steps, touch=False)
    small = await bytes_per_step(runner_for, meter, 0, args.steps, touch=True)
    return rows_for("sqlite", rate, args.runs, rec, lst, still, small)


async def redis_bench(url: str, prefix: str, args: argparse.Namespace) -> list[Row]:
    import redis.asyncio as aioredis

    print(f"  redis: storing {args.runs:,} runs at {url}", flush=True)
    wf = scale_workflow(store="redis", url=url, key_prefix=f"{prefix}scale:")
    rate = await fill(wf, args.runs, args.parked)
    rec, lst = await queries(wf, args.parked, args.calls, args.budget)

    client = aioredis.Redis.from_url(url)
    try:

        async def meter() -> int:
            return int((await client.info("stats"))["total_net_input_bytes"])

        a, b = await meter(), await meter()
        overhead = b - a  # one INFO request

        def runner_for(wf: Workflow) -> WorkflowRunner:
            return WorkflowRunner(wf.persistence(store="redis", url=url, key_prefix=f"{prefix}big:"))

        still = await bytes_per_step(runner_for, meter, overhead, args.steps, touch=False)
        small = await bytes_per_step(runner_for, meter, overhead, args.steps, touch=True)
    finally:
        await client.aclose()
    return rows_for("redis", rate, args.runs, rec, lst, still, small)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=100_000, help="finished runs to store")
    ap.add_argument("--parked", type=int, default=5, help="runs waiting at a gate among them")
    ap.add_argument(
        "--calls", type=int, default=7, help="calls of recover() and of list_runs() (median taken)"
    )
    ap.add_argument(
        "--budget", type=float, default=30.0, help="seconds per query kind before stopping at 3 calls"
    )
    ap.add_argument("--steps", type=int, default=20, help="steps per run in the bytes-per-step measurement")
    ap.add_argument("--dir", default=None, help="where the SQLite files go")
    ap.add_argument("--only", choices=["sqlite", "redis"], action="append", help="stores to measure")
    args = ap.parse_args()
    only = set(args.only or ["sqlite", "redis"])

    t0 = time.perf_counter()
    rows: list[Row] = []
    if "sqlite" in only:
        with tempfile.TemporaryDirectory(dir=args.dir) as d:
            rows += asyncio.run(sqlite_bench(d, args))
    if "redis" in only:
        with bench_redis() as (url, prefix):
            rows += asyncio.run(redis_bench(url, prefix, args))
    print_table(
        f"Scale: {args.runs:,} finished runs and {args.parked} waiting stored; a 1 MB state "
        f"(its runs at each store's default settings)",
        rows,
        peer="",
    )
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
