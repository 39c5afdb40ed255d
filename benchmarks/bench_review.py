"""The review page with 10,000 pending approvals: SQLite and Redis, server side.

``--parked`` (10,000) runs wait at a gate (two workflows, approvers spread over
``--approvers`` people and a ``lead``), parked by running them, as a user's are. The
app (``create_app``, TokenAuth, the reviewer signed in with a bearer token) is driven
in this process through its ASGI interface, so what is timed is the server: from the
request reaching the app to the last byte of its response. Medians of ``--calls``:

* the inbox's first page, as HTML (``GET /``) and as JSON (``GET /api/approvals``),
  and the first page of one reviewer's ("mine"); target under 100 ms;
* an approval page (``GET /runs/{run}/approvals/{id}``), a different approval each
  call, and its JSON; target under 50 ms;
* a decision posted to the run going on in a worker: ``POST`` of an approval on an app
  that hands runs to workers (``execute=False``) until the gate's next step starts in
  a ``Worker`` serving the store (in this process; on Redis, woken through the store's
  queue); target under 50 ms.

Needs a Redis: ``REDIS_URL`` (keys under a prefix of their own, removed afterwards), or
a ``redis-server`` on PATH, started on a free loopback port.

    python benchmarks/bench_review.py [--parked 10000] [--calls 31] [--only sqlite|redis]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from bench_approvals import fill, review_workflow
from bench_core import Row, median, print_table
from bench_stores import bench_redis

from agentflow import END, START, HumanApproval, Steward, Wait, Worker, Workflow, WorkflowRunner
from agentflow.review import create_app
from agentflow.review.reviewers import Reviewers

#: perf_counter() when a decided run's next step started, by run id, and who waits for it.
_started: dict[str, float] = {}
_arrived: dict[str, asyncio.Event] = {}


class _Timed:
    """ASGI middleware: seconds from a request's arrival to its response's last byte."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.last = 0.0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t = time.perf_counter()

        async def sending(message: Any) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                self.last = time.perf_counter() - t

        await self.app(scope, receive, sending)


async def served(
    calls: int, timed: _Timed, request: Callable[[int], Awaitable[httpx.Response]]
) -> list[float]:
    """Server-side seconds of ``calls`` requests (after two warm-up ones); each must answer 200."""
    out = []
    for i in range(-2, calls):
        r = await request(i)
        assert r.status_code == 200, (r.status_code, r.text[:300])
        if i >= 0:
            out.append(timed.last)
    return out


def client(app: Any, token: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://review.local",
        headers={"Authorization": f"Bearer {token}"},
    )


async def pages(workflows: list[Workflow], args: argparse.Namespace) -> dict[str, list[float]]:
    """The inbox and approval pages of an app over ``workflows``' store (parked already)."""
    steward = Steward()
    for wf in workflows:
        steward.register(wf)
    async with WorkflowRunner(workflows[0]) as runner:
        token = await Reviewers(runner.store).add("lead")
        sample = await runner.approvals(limit=1000)
    assert len(sample) == 1000, len(sample)
    timed = _Timed(create_app(steward))
    app = timed.app
    picks = random.Random(7).sample(sample, args.calls + 2)
    try:
        async with client(timed, token) as http:
            out = {
                "inbox, first page (GET /)": await served(args.calls, timed, lambda i: http.get("/")),
                "inbox, first page (GET /api/approvals)": await served(
                    args.calls, timed, lambda i: http.get("/api/approvals")
                ),
                "inbox, mine (GET /?mine=1)": await served(args.calls, timed, lambda i: http.get("/?mine=1")),
                "approval page (GET /runs/{run}/approvals/{id})": await served(
                    args.calls, timed, lambda i: http.get(f"/runs/{picks[i].run_id}/approvals/{picks[i].id}")
                ),
                "approval (GET /api/runs/{run}/approvals/{id})": await served(
                    args.calls,
                    timed,
                    lambda i: http.get(f"/api/runs/{picks[i].run_id}/approvals/{picks[i].id}"),
                ),
            }
    finally:
        await app.state.review.close()
        await steward.close()
    return out


def handed_workflow(**persistence: Any) -> Workflow:
    """A gate whose next step notes when it started."""

    def ask(ctx: Any) -> Any:
        return Wait(HumanApproval(["lead"], prompt="Go on?"), "Next")

    def next_step(ctx: Any) -> Any:
        _started.setdefault(ctx.run_id, time.perf_counter())
        _arrived.setdefault(ctx.run_id, asyncio.Event()).set()
        return END

    return Workflow("Handed").flow({START: ask, "Next": next_step}).persistence(**persistence)


async def handed(persistence: dict[str, Any], args: argparse.Namespace) -> list[float]:
    """Seconds from posting a decision (to an app with ``execute=False``) to the next step
    starting in a worker."""
    wf = handed_workflow(**persistence)
    runs = args.calls + 2
    async with WorkflowRunner(wf) as runner:
        token = await Reviewers(runner.store).add("lead")
        handles = [await runner.run() for _ in range(runs)]
        for h in handles:
            await h.wait_for("waiting", timeout=30)
        parked = [(h.run_id, (await h.info()).approvals[0].id) for h in handles]
    steward = Steward()
    steward.register(wf)
    app = create_app(steward, execute=False)
    worker = Worker(wf, concurrency=10)
    serving = asyncio.create_task(worker.serve())
    out = []
    try:
        await asyncio.sleep(0.5)  # the worker is up and waits on its queue
        async with client(app, token) as http:
            for i, (run_id, approval) in enumerate(parked):
                t = time.perf_counter()
                r = await http.post(f"/api/runs/{run_id}/approvals/{approval}", json={"action": "approve"})
                assert r.status_code == 200, (r.status_code, r.text[:300])
                await _arrived.setdefault(run_id, asyncio.Event()).wait()
                if i >= 2:
                    out.append(_started[run_id] - t)
    finally:
        await worker.close()
        await serving
        await app.state.review.close()
        await steward.close()
    return out


def rows_for(store: str, times: dict[str, list[float]]) -> list[Row]:
    rows = []
    for what, xs in times.items():
        limit = 0.1 if what.startswith("inbox") else 0.05
        rows.append(
            Row(
                f"{store}: {what}",
                f"{median(xs) * 1000:.2f} ms",
                f"{len(xs)} calls, max {max(xs) * 1000:.2f} ms",
                target=f"< {limit * 1000:.0f} ms",
                ok=median(xs) < limit,
            )
        )
    return rows


async def bench(store: str, persistence: dict[str, Any], args: argparse.Namespace) -> list[Row]:
    workflows = [review_workflow(name, args.approvers, **persistence) for name in ("ReviewA", "ReviewB")]
    print(f"  {store}: parking {args.parked:,} runs", flush=True)
    await fill(workflows, args.parked, 0)
    times = await pages(workflows, args)
    times["decision posted -> next step started in a worker"] = await handed(persistence, args)
    for what, xs in times.items():
        print(f"    {what}: median {median(xs) * 1000:.2f} ms", flush=True)
    return rows_for(store, times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parked", type=int, default=10_000, help="approvals pending in the store")
    ap.add_argument("--approvers", type=int, default=20, help="reviewers the approvals are spread over")
    ap.add_argument("--calls", type=int, default=31, help="requests per measurement (median taken)")
    ap.add_argument("--only", choices=["sqlite", "redis"], action="append", help="stores to run")
    ap.add_argument("--dir", default=None, help="where the SQLite file goes (a real disk)")
    args = ap.parse_args()
    only = set(args.only or ["sqlite", "redis"])
    rows: list[Row] = []
    if "sqlite" in only:
        with tempfile.TemporaryDirectory(dir=args.dir) as d:
            path = os.path.join(d, "review.db")
            sqlite = {"store": "sqlite", "path": path, "durability": "normal"}
            rows += asyncio.run(bench("SQLite", sqlite, args))
    if "redis" in only:
        with bench_redis() as (url, prefix):
            rows += asyncio.run(bench("Redis", {"store": "redis", "url": url, "key_prefix": prefix}, args))
    print_table(f"review page, {args.parked:,} approvals pending (server side)", rows)


if __name__ == "__main__":
    main()
