"""What composition costs: a step that runs a child workflow, and a fan-out of child runs.

1. A run whose one step runs a child workflow (``Run(child, ...)``; the child one plain
   step) against a run of three plain steps of the same flow, in memory, milliseconds
   per run. The child step starts a run of its own, parks the parent, ends the child,
   resumes the parent and reads the child's result back. Target: no more than three
   plain steps' cost (ratio <= 1). And a run whose one step runs the three-step flow as
   a child against that flow run on its own: what wrapping a flow as a child adds, in
   units of the flow's own cost (ratio <= 2: it adds no more than its three steps).
2. ``Parallel.map`` of 1,000 child runs (each child three plain steps) against
   ``Parallel.map`` of 1,000 plain branches, milliseconds per fan-out, in memory
   (target: within 10x), then the same on SQLite and on Redis (printed; a child run is
   a durable run there, each of its steps a commit, where a branch is one journal entry).
   Beside each, the same 1,000 child runs started on their own (``runner.run`` each, then
   every result awaited): the floor of running that many runs, which the fan-out pays
   too; the second ratio is what composition adds to it.

Each measurement is repeated with the sides interleaved (one of each per round, each
from a collected heap); medians are printed, and a ratio is the median of the
per-round ratios, with the lowest and highest round in brackets.

Needs a Redis for the last row: ``REDIS_URL``, or a ``redis-server`` on PATH (started on
a free loopback port, as ``bench_stores.py`` does).

    python benchmarks/bench_compose.py [--runs 300] [--repeats 5] [--children 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from typing import Any

from bench_core import Row, compare, median, print_table, rounds
from bench_stores import redis_url
from pydantic import BaseModel

from agentflow import END, START, Next, Parallel, Run, Workflow, WorkflowRunner
from agentflow.stores.contract import Store

CHILDREN = 1000


class Leg(BaseModel):
    n: int


# -- 1. one child step against three plain steps -------------------------------------

unit = Workflow("Unit").flow({START: lambda ctx: END})
with_child = Workflow("WithChild").flow({START: lambda ctx: Run(unit, None, END)})
three_steps = Workflow("ThreeSteps").flow(
    {START: lambda ctx: "b", "b": lambda ctx: "c", "c": lambda ctx: END}
)
wraps_three = Workflow("WrapsThree").flow({START: lambda ctx: Run(three_steps, None, END)})


async def per_run_ms(wf: Workflow, runs: int) -> float:
    async with WorkflowRunner(wf) as runner:
        await (await runner.run()).result()  # warm up
        t = time.perf_counter()
        for _ in range(runs):
            res = await (await runner.run()).result()
        dt = time.perf_counter() - t
    assert res.status == "completed", res
    return dt / runs * 1000


# -- 2. a fan-out of child runs against a fan-out of branches -------------------------

leg = (
    Workflow("Leg")
    .input(Leg)
    .flow(
        {
            START: lambda ctx: "b",
            "b": lambda ctx: "c",
            "c": lambda ctx: Next(END, output=ctx.input.n * 2),
        }
    )
)


def run_leg(ctx: Any) -> Run:
    return Run(leg, {"n": ctx.item})


def plain_branch(ctx: Any) -> int:
    return int(ctx.item) * 2


def fan(name: str, fn: Any, n: int) -> Workflow:
    return Workflow(name).flow(
        {START: lambda ctx: Parallel.map(fn, range(n), "Join"), "Join": lambda ctx: END}
    )


async def fanout_ms(wf: Workflow, key: str, n: int, store: Store | None = None, times: int = 2) -> float:
    async with WorkflowRunner(wf, store=store) as runner:
        out = []
        for _ in range(times):
            t = time.perf_counter()
            res = await (await runner.run()).result(timeout=600)
            out.append(time.perf_counter() - t)
        assert list(res.step_results[key]) == [i * 2 for i in range(n)], res.step_results[key][:3]
    return median(out) * 1000


async def runs_ms(n: int, store: Store | None = None, times: int = 2) -> float:
    """``n`` runs of the child workflow started on their own, then every result awaited."""
    async with WorkflowRunner(leg, store=store) as runner:
        out = []
        for _ in range(times):
            t = time.perf_counter()
            handles = [await runner.run({"n": i}) for i in range(n)]
            results = [await h.result(timeout=600) for h in handles]
            out.append(time.perf_counter() - t)
        assert [r.output for r in results] == [i * 2 for i in range(n)]
    return median(out) * 1000


def store_of(kind: str, where: str) -> Store:
    if kind == "sqlite":
        from agentflow.stores import SqliteStore

        return SqliteStore(os.path.join(where, f"compose-{time.monotonic_ns()}.db"))
    from agentflow.stores.redis import RedisStore

    return RedisStore(where, key_prefix=f"bench-compose:{time.monotonic_ns()}:")


def durable_rows(kind: str, where: str, n: int, repeats: int) -> list[Row]:
    children, branches = fan("FanChildren", run_leg, n), fan("FanBranches", plain_branch, n)
    c, b, f = rounds(
        repeats,
        lambda: asyncio.run(fanout_ms(children, "run_leg", n, store_of(kind, where), times=1)),
        lambda: asyncio.run(fanout_ms(branches, "plain_branch", n, store_of(kind, where), times=1)),
        lambda: asyncio.run(runs_ms(n, store_of(kind, where), times=1)),
    )
    return [
        compare(f"{n:,} child runs vs {n:,} branches, {kind}", c, b, "{:.1f} ms"),
        compare(f"{n:,} child runs vs {n:,} runs on their own, {kind}", c, f, "{:.1f} ms"),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=300, help="runs per measurement of section 1")
    ap.add_argument("--repeats", type=int, default=5, help="rounds (median taken)")
    ap.add_argument("--children", type=int, default=CHILDREN, help="children (and branches) of section 2")
    ap.add_argument("--no-redis", action="store_true", help="skip the Redis row")
    args = ap.parse_args()
    n = args.children

    a, b = rounds(
        args.repeats,
        lambda: asyncio.run(per_run_ms(with_child, args.runs)),
        lambda: asyncio.run(per_run_ms(three_steps, args.runs)),
    )
    rows = [compare("a child step vs 3 plain steps, memory", a, b, "{:.3f} ms", at_most=1.0)]
    w, t = rounds(
        args.repeats,
        lambda: asyncio.run(per_run_ms(wraps_three, args.runs)),
        lambda: asyncio.run(per_run_ms(three_steps, args.runs)),
    )
    rows.append(compare("3 steps as a child vs on their own, memory", w, t, "{:.3f} ms", at_most=2.0))
    children, branches = fan("FanChildren", run_leg, n), fan("FanBranches", plain_branch, n)
    c, p, f = rounds(
        args.repeats,
        lambda: asyncio.run(fanout_ms(children, "run_leg", n)),
        lambda: asyncio.run(fanout_ms(branches, "plain_branch", n)),
        lambda: asyncio.run(runs_ms(n)),
    )
    rows.append(compare(f"{n:,} child runs vs {n:,} branches, memory", c, p, "{:.1f} ms", at_most=10.0))
    rows.append(compare(f"{n:,} child runs vs {n:,} runs on their own, memory", c, f, "{:.1f} ms"))
    with tempfile.TemporaryDirectory() as where:
        rows += durable_rows("sqlite", where, n, max(2, args.repeats // 2))
    if not args.no_redis:
        with redis_url() as (url, _ours):
            rows += durable_rows("redis", url, n, max(2, args.repeats // 2))
    print_table("Composition (medians; ratio = composed / plain, per round)", rows, peer="plain")


if __name__ == "__main__":
    main()
