"""Listing pending approvals from the store's index: SQLite and Redis.

With ``--parked`` (10,000) runs waiting at a gate, each with its approval pending (their
approvers spread over ``--approvers`` people, the runs over two workflows), and as many
runs finished beside them: ``runner.approvals(limit=50)`` — the review page's first
page — from a runner that did not park the runs; the median of ``--calls`` calls.
Beside it (no target): a page filtered by approver, by workflow, and the page after a
given approval. Target: the first page under 20 ms.

The runs get there by running (a one-step flow to the gate, many in flight), so their
approvals went through the index as a user's do; on SQLite at ``durability="normal"``,
which only makes storing them faster.

Needs a Redis: ``REDIS_URL`` (keys under a prefix of their own, removed afterwards), or
a ``redis-server`` on PATH, started on a free loopback port.

    python benchmarks/bench_approvals.py [--parked 10000] [--calls 21] [--only sqlite|redis]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bench_core import Row, median, print_table
from bench_stores import bench_redis

from agentflow import END, START, HumanApproval, Wait, Workflow, WorkflowRunner


def review_workflow(name: str, approvers: int, **persistence: Any) -> Workflow:
    """One step to a gate (input ``{"n": i, "park": true}``: approver ``i % approvers``), or to the end."""

    def ask(ctx: Any) -> Any:
        if not ctx.input["park"]:
            return END
        who = [f"reviewer-{ctx.input['n'] % approvers}", "lead"]
        return Wait(HumanApproval(who, prompt="Ship it?", context={"n": ctx.input["n"]}), "Done")

    return Workflow(name).flow({START: ask, "Done": lambda ctx: END}).persistence(**persistence)


async def fill(workflows: list[Workflow], parked: int, finished: int, concurrency: int = 64) -> float:
    """Park ``parked`` runs (and finish ``finished``) over ``workflows``; returns runs per second."""
    runners = [WorkflowRunner(wf) for wf in workflows]
    try:
        jobs = [(i, True) for i in range(parked)] + [(i, False) for i in range(finished)]
        total, t = len(jobs), time.perf_counter()
        step = max(1, total // 10)
        done = 0

        async def client() -> None:
            nonlocal done
            while jobs:
                n, park = jobs.pop()
                runner = runners[n % len(runners)]
                handle = await runner.run({"n": n, "park": park})
                if park:
                    await handle.wait_for("waiting", timeout=60)
                else:
                    await handle.result()
                done += 1
                if done % step == 0:
                    print(f"    {done:,} runs stored ({done / (time.perf_counter() - t):,.0f}/s)", flush=True)

        await asyncio.gather(*(client() for _ in range(concurrency)))
        return total / (time.perf_counter() - t)
    finally:
        for runner in runners:
            await runner.close()


async def timed(call: Callable[[], Awaitable[Any]], calls: int) -> list[float]:
    """Seconds per call of ``call`` (after one warm-up call)."""
    await call()
    out = []
    for _ in range(calls):
        t = time.perf_counter()
        await call()
        out.append(time.perf_counter() - t)
    return out


async def queries(wf: Workflow, parked: int, calls: int) -> dict[str, list[float]]:
    """The listings measured, from a runner that parked nothing."""
    async with WorkflowRunner(wf) as runner:
        first = await runner.approvals(limit=50)
        assert len(first) == 50, len(first)
        assert len(await runner.approvals(limit=parked + 10)) == parked, "not every parked approval is listed"
        middle = (await runner.approvals(limit=parked // 2))[-1].id

        async def page() -> None:
            assert len(await runner.approvals(limit=50)) == 50

        async def by_approver() -> None:
            assert len(await runner.approvals(approver="reviewer-3", limit=50)) == 50

        async def by_workflow() -> None:
            assert len(await runner.approvals(workflow="ReviewB", limit=50)) == 50

        async def after() -> None:
            assert len(await runner.approvals(limit=50, after=middle)) == 50

        return {
            "approvals(limit=50)": await timed(page, calls),
            "approvals(approver=..., limit=50)": await timed(by_approver, calls),
            "approvals(workflow=..., limit=50)": await timed(by_workflow, calls),
            f"approvals(limit=50, after=<the {parked // 2:,}th>)": await timed(after, calls),
        }


def rows_for(store: str, rate: float, args: argparse.Namespace, times: dict[str, list[float]]) -> list[Row]:
    rows = [
        Row(f"{store}: runs parked or finished by running them", f"{args.parked * 2:,}", f"{rate:,.0f}/s")
    ]
    for i, (what, xs) in enumerate(times.items()):
        ms = f"{median(xs) * 1000:.2f} ms"
        spread = f"{len(xs)} calls, max {max(xs) * 1000:.2f} ms"
        if i == 0:
            rows.append(Row(f"{store}: {what}", ms, spread, target="< 20 ms", ok=median(xs) < 0.02))
        else:
            rows.append(Row(f"{store}: {what}", ms, spread))
    return rows


async def bench(store: str, persistence: dict[str, Any], args: argparse.Namespace) -> list[Row]:
    workflows = [review_workflow(name, args.approvers, **persistence) for name in ("ReviewA", "ReviewB")]
    print(f"  {store}: parking {args.parked:,} runs and finishing as many", flush=True)
    rate = await fill(workflows, args.parked, args.parked)
    times = await queries(workflows[0], args.parked, args.calls)
    for what, xs in times.items():
        print(f"    {what}: median {median(xs) * 1000:.2f} ms", flush=True)
    return rows_for(store, rate, args, times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parked", type=int, default=10_000, help="runs waiting at a gate")
    ap.add_argument("--approvers", type=int, default=20, help="reviewers the approvals are spread over")
    ap.add_argument("--calls", type=int, default=21, help="calls per listing (median taken)")
    ap.add_argument("--dir", default=None, help="where the SQLite file goes")
    ap.add_argument("--only", choices=["sqlite", "redis"], action="append", help="stores to measure")
    args = ap.parse_args()
    only = set(args.only or ["sqlite", "redis"])

    t0 = time.perf_counter()
    rows: list[Row] = []
    if "sqlite" in only:
        with tempfile.TemporaryDirectory(dir=args.dir) as d:
            options = {"store": "sqlite", "path": f"{d}/approvals.db", "durability": "normal"}
            rows += asyncio.run(bench("sqlite", options, args))
    if "redis" in only:
        with bench_redis() as (url, prefix):
            options = {"store": "redis", "url": url, "key_prefix": f"{prefix}approvals:"}
            rows += asyncio.run(bench("redis", options, args))
    print_table(
        f"Approvals: {args.parked:,} pending (over {args.approvers} reviewers and 2 workflows) and "
        f"{args.parked:,} finished runs stored",
        rows,
        peer="",
    )
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
