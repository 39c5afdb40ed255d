"""Durable stores: SQLite against LangGraph and DBOS, Redis against its own round trip.

1. SQLite, the 10-step flow of ``bench_core`` with a durable commit per step, runs back
   to back, at each ``durability`` setting on every side alike: ``full`` is
   ``PRAGMA synchronous=FULL`` (a commit survives power loss), ``normal`` is
   ``synchronous=NORMAL`` (it survives a crash of the process), both in WAL mode.
   - agentflow: ``.persistence(store="sqlite", durability=...)`` (or
     ``SqliteStore(path, durability=...)``) when the installed agentflow has the option;
     without it, only the store's fixed setting is measured and said so.
   - LangGraph ``SqliteSaver`` (langgraph-checkpoint-sqlite) on a connection whose
     ``PRAGMA synchronous`` is set to match, with ``durability="sync"`` so that each
     step's checkpoint is written before the next step starts, as agentflow does.
   - DBOS on SQLite: a workflow of 10 steps, each step's output checkpointed. DBOS's own
     SQLite engine uses a rollback journal with the library default ``synchronous=FULL``;
     here it gets an engine with the same connection settings as its own (immediate
     transactions, busy timeout, foreign keys) plus WAL and the matching
     ``synchronous``, so both sides differ only in the engine.
   Targets: at least 10x LangGraph and 12x DBOS.
2. Redis, the same flow: one run at a time, steps per second against one client's
   sequential PING rate measured in the same rounds (target >= 0.5 steps per round
   trip); then 100 and 400 runs in flight in one process (each finished run replaced
   by a new one): errors (failed runs and any log record at WARNING or above; target
   none), p99 run latency (target < 0.5 s) and steps per PING round trip (target >= 1.0).
3. 10,000 runs parked at a gate on Redis: the process's memory before and after parking
   them (it should hold nothing per waiting run), then the median time from
   ``approve()`` to the resumed step running.

Every measurement runs for about ``--seconds``; the engines alternate round by round.
Medians are printed, and each ratio is the median of the per-round ratios with the
lowest and highest round in brackets. Database files live in a temporary folder on the
disk that holds ``--dir`` (default: the system temporary folder), so that ``full`` pays
its fsyncs.

Needs a Redis: ``REDIS_URL`` (its keys are written under a prefix of their own, removed
afterwards), or a ``redis-server`` on PATH, which is started on a free loopback port.

    python benchmarks/bench_stores.py [--seconds 1.0] [--repeats 5] [--parked 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import inspect
import logging
import os
import resource
import shutil
import socket
import sqlite3
import subprocess
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

from bench_core import STEPS, Row, af_linear, compare, lg_linear, median, pct, print_table, rounds

from agentflow import END, START, HumanApproval, Wait, Workflow, WorkflowRunner

LEVELS = {"full": "FULL", "normal": "NORMAL"}
# What agentflow's SQLite store used before it had a ``durability=`` option.
FIXED_DURABILITY = "normal"


# -- running flows for a while -------------------------------------------------------


async def af_rate(runner: WorkflowRunner, seconds: float) -> float:
    """Steps per second of 10-step runs back to back on ``runner`` for about ``seconds``."""
    for _ in range(3):  # warm up connections and scripts
        await (await runner.run()).result()
    runs, t = 0, time.perf_counter()
    while (dt := time.perf_counter() - t) < seconds or runs < 3:
        res = await (await runner.run()).result()
        runs += 1
    assert res.state.n == STEPS, res
    return runs * STEPS / dt


def sync_rate(one_run: Callable[[int], Any], seconds: float) -> float:
    """The same for a peer's synchronous run; ``one_run(i)`` returns the final counter."""
    for i in range(3):
        one_run(-1 - i)
    runs, t = 0, time.perf_counter()
    while (dt := time.perf_counter() - t) < seconds or runs < 3:
        out = one_run(runs)
        runs += 1
    assert out == STEPS, out
    return runs * STEPS / dt


# -- SQLite: agentflow, LangGraph, DBOS ----------------------------------------------


def durability_option() -> str | None:
    """Where this agentflow takes ``durability=``: ``"persistence"``, ``"store"`` or None."""
    from agentflow.stores import SqliteStore

    if "durability" in inspect.signature(Workflow.persistence).parameters:
        return "persistence"
    if "durability" in inspect.signature(SqliteStore).parameters:
        return "store"
    return None


def sqlite_settings() -> tuple[list[str], str]:
    """The durability settings to measure, and a line saying how agentflow is given them."""
    how = durability_option()
    if how == "persistence":
        return list(LEVELS), 'agentflow: .persistence(store="sqlite", durability=...)'
    if how == "store":
        return list(LEVELS), "agentflow: SqliteStore(path, durability=...)"
    return [FIXED_DURABILITY], (
        f"agentflow: no durability= option in this version; its store runs "
        f"synchronous={LEVELS[FIXED_DURABILITY]}, so only that setting is compared"
    )


def af_sqlite_runner(path: str, durability: str) -> tuple[WorkflowRunner, Any]:
    """A runner of the 10-step flow on SQLite at ``durability``, and a store to close (or None)."""
    how = durability_option()
    if how == "persistence":
        return WorkflowRunner(af_linear(store="sqlite", path=path, durability=durability)), None
    if how == "store":
        from agentflow.stores import SqliteStore

        store = SqliteStore(path, durability=durability)  # type: ignore[call-arg]
        return WorkflowRunner(af_linear(), store=store), store
    return WorkflowRunner(af_linear(store="sqlite", path=path)), None


async def af_sqlite_rate(path: str, durability: str, seconds: float) -> float:
    runner, store = af_sqlite_runner(path, durability)
    try:
        return await af_rate(runner, seconds)
    finally:
        await runner.close()
        if store is not None:
            await store.close()


def lg_sqlite_rate(path: str, durability: str, seconds: float) -> float:
    from langgraph.checkpoint.sqlite import SqliteSaver

    conn = sqlite3.connect(path, check_same_thread=False)
    try:
        saver = SqliteSaver(conn)
        saver.setup()  # sets WAL
        conn.execute(f"PRAGMA synchronous = {LEVELS[durability]}")
        level = conn.execute("PRAGMA synchronous").fetchone()[0]
        assert level == {"full": 2, "normal": 1}[durability], level
        graph = lg_linear(checkpointer=saver)
        opts = {"durability": "sync"} if "durability" in inspect.signature(graph.invoke).parameters else {}
        tag = os.urandom(4).hex()
        return sync_rate(
            lambda i: graph.invoke({"n": 0}, {"configurable": {"thread_id": f"{tag}-{i}"}}, **opts)["n"],
            seconds,
        )
    finally:
        conn.close()


class Dbos:
    """DBOS, launched once in this process (it is a singleton) on one SQLite file.

    The engine applies ``self.level`` to each new connection; ``set(level)`` drops the
    pooled connections so that the next ones use it.
    """

    def __init__(self, path: str) -> None:
        import sqlalchemy as sa
        from dbos import DBOS

        self.level = "FULL"
        self.engine = sa.create_engine(f"sqlite:///{path}")

        @sa.event.listens_for(self.engine, "connect")
        def pragmas(conn: Any, _record: Any) -> None:
            # What DBOS's own SQLite engine sets, then the journal and the sync level.
            conn.isolation_level = "IMMEDIATE"
            conn.execute("PRAGMA busy_timeout=30000")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self.level}")

        @DBOS.step()
        def inc(n: int) -> int:
            return n + 1

        @DBOS.workflow()
        def linear(n: int) -> int:
            for _ in range(STEPS):
                n = inc(n)
            return n

        self.linear = linear
        DBOS(
            config={
                "name": "agentflow-bench",
                "system_database_url": f"sqlite:///{path}",
                "system_database_engine": self.engine,
                "log_level": "WARNING",
            }
        )
        DBOS.launch()

    def set(self, durability: str) -> None:
        self.level = LEVELS[durability]
        self.engine.dispose()
        with self.engine.connect() as c:
            level = c.exec_driver_sql("PRAGMA synchronous").scalar()
        assert level == {"full": 2, "normal": 1}[durability], level

    def rate(self, durability: str, seconds: float) -> float:
        self.set(durability)
        return sync_rate(lambda i: self.linear(0), seconds)

    def close(self) -> None:
        from dbos import DBOS

        DBOS.destroy(destroy_registry=True)
        self.engine.dispose()


def sqlite_section(folder: str, seconds: float, repeats: int) -> None:
    settings, how = sqlite_settings()
    dbos = Dbos(f"{folder}/dbos.db")
    rows = []
    try:
        for d in settings:
            af, lg, db = rounds(
                repeats,
                lambda d=d: asyncio.run(af_sqlite_rate(f"{folder}/af-{d}.db", d, seconds)),
                lambda d=d: lg_sqlite_rate(f"{folder}/lg-{d}.db", d, seconds),
                lambda d=d: dbos.rate(d, seconds),
            )
            rows.append(compare(f"durability={d}: vs LangGraph SqliteSaver", af, lg, "{:,.0f}", at_least=10))
            rows.append(compare(f"durability={d}: vs DBOS", af, db, "{:,.0f}", at_least=12))
    finally:
        dbos.close()
    print_table(
        f"SQLite: {STEPS}-step flow, a durable commit per step, steps/s (median of {repeats} rounds)\n"
        f"  {how}; peers at the same PRAGMA synchronous, WAL on every side",
        rows,
    )


# -- Redis ------------------------------------------------------------------------------


async def ping_rate(url: str, n: int = 2000) -> float:
    """One client's sequential PING round trips per second."""
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


async def redis_sequential(url: str, prefix: str, seconds: float) -> float:
    async with WorkflowRunner(af_linear(store="redis", url=url, key_prefix=prefix)) as runner:
        return await af_rate(runner, seconds)


class LogCounter(logging.Handler):
    """Counts log records at WARNING or above, by logger and level."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: collections.Counter[str] = collections.Counter()

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[f"log {record.levelname} {record.name}"] += 1


@contextlib.contextmanager
def counting_logs() -> Iterator[LogCounter]:
    handler = LogCounter()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)


async def in_flight(
    url: str, prefix: str, concurrency: int, total: int
) -> tuple[float, list[float], collections.Counter[str]]:
    """``total`` runs, ``concurrency`` of them in flight at any time (a closed loop).

    Returns steps/s, each run's latency (start to result, seconds) and the errors seen.
    """
    errors: collections.Counter[str] = collections.Counter()
    latencies: list[float] = []
    remaining = total

    async def one(runner: WorkflowRunner) -> None:
        t = time.perf_counter()
        try:
            res = await asyncio.wait_for((await runner.run()).result(), 60)
            if res.state.n != STEPS:
                errors["wrong result"] += 1
        except Exception as exc:
            errors[type(exc).__name__] += 1
        latencies.append(time.perf_counter() - t)

    async def client(runner: WorkflowRunner) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await one(runner)

    with counting_logs() as logs:
        async with WorkflowRunner(af_linear(store="redis", url=url, key_prefix=prefix)) as runner:
            await asyncio.gather(*(one(runner) for _ in range(concurrency)))  # warm up: open connections
            latencies.clear()
            t = time.perf_counter()
            await asyncio.gather(*(client(runner) for _ in range(concurrency)))
            dt = time.perf_counter() - t
    errors.update(logs.counts)
    return total * STEPS / dt, latencies, errors


def redis_section(url: str, prefix: str, seconds: float, repeats: int) -> None:
    af, pings = rounds(
        repeats,
        lambda: asyncio.run(redis_sequential(url, f"{prefix}seq:", seconds)),
        lambda: asyncio.run(ping_rate(url)),
    )
    rows = [
        Row("PING round trips/s (one client)", f"{median(pings):,.0f}"),
        compare("one run at a time: steps/s, per RTT", af, pings, "{:,.0f}", at_least=0.5, unit=""),
    ]
    for conc in (100, 400):
        # About ``seconds`` of work per round at the sequential rate, and at least 3 runs per client.
        total = max(3 * conc, int(median(af) * seconds / STEPS))
        rates, pings_c, lat = [], [], []
        errs: collections.Counter[str] = collections.Counter()
        for _ in range(repeats):
            gc.collect()
            rate, latencies, errors = asyncio.run(in_flight(url, f"{prefix}c{conc}:", conc, total))
            rates.append(rate)
            lat += latencies
            errs += errors
            gc.collect()
            pings_c.append(asyncio.run(ping_rate(url)))
        p99 = pct(lat, 0.99)
        rows += [
            compare(f"{conc} in flight: steps/s, per RTT", rates, pings_c, "{:,.0f}", at_least=1.0, unit=""),
            Row(
                f"{conc} in flight: p99 run latency", f"{p99 * 1000:.0f} ms", target="< 500 ms", ok=p99 < 0.5
            ),
            Row(
                f"{conc} in flight: p50 run latency ({total} runs a round)", f"{pct(lat, 0.5) * 1000:.0f} ms"
            ),
            Row(f"{conc} in flight: errors", f"{sum(errs.values())}", target="0", ok=not errs),
        ]
        rows += [Row(f"    {what}", str(n)) for what, n in errs.most_common(5)]
    print_table(
        f"Redis: {STEPS}-step flow, a durable commit per step (median of {repeats} rounds; "
        f"ratio = agentflow steps/s over PING round trips/s)",
        rows,
        peer="PING/s",
    )


# -- parked runs ----------------------------------------------------------------------


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


async def parked(
    url: str, prefix: str, count: int, samples: int = 50
) -> tuple[float, float, int, float, float]:
    """Park ``count`` runs at a gate; return RSS before/after (MiB), Python heap held per
    parked run (bytes, by tracemalloc), and the median/max approve-to-resume latency (ms)."""
    resumed: dict[str, float] = {}
    gated = 0

    def gate(ctx: Any) -> Wait:
        nonlocal gated
        gated += 1
        return Wait(HumanApproval(["lead"]), "After")

    def after(ctx: Any) -> str:
        resumed[ctx.run_id] = time.perf_counter()
        return END

    wf = (
        Workflow("Parked")
        .flow({START: gate, "After": after})
        .persistence(store="redis", url=url, key_prefix=prefix)
    )
    # Made before the heap is measured, so that they do not count as held by the runs.
    ids = [os.urandom(16).hex() for _ in range(count)]
    first = min(200, count)
    async with WorkflowRunner(wf) as runner:

        async def all_parked(run_ids: list[str]) -> None:
            for run_id in run_ids:
                while (await (await runner.attach(run_id)).info()).status != "waiting":  # noqa: ASYNC110 (polls the store)
                    await asyncio.sleep(0.01)

        handles = [await runner.run(run_id=run_id) for run_id in ids[:first]]
        await all_parked(ids[:first])
        gc.collect()
        before = rss_mib()
        tracemalloc.start()
        heap_before = tracemalloc.get_traced_memory()[0]
        for run_id in ids[first:]:
            await runner.run(run_id=run_id)
        # Every gate step ran and the last run is parked (the others are checked below,
        # outside tracemalloc, which slows each call of the check several times).
        while gated < count:  # noqa: ASYNC110 (each run has to reach its gate)
            await asyncio.sleep(0.01)
        await all_parked(ids[-1:])
        await asyncio.sleep(0.2)  # let the last commits' tasks finish
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - heap_before
        tracemalloc.stop()
        after_park = rss_mib()
        await all_parked(ids[first:])
        latencies = []
        for h in handles[:samples]:
            t = time.perf_counter()
            await runner.approve(h.run_id, by="lead")
            while h.run_id not in resumed:  # noqa: ASYNC110 (yield until the resumed step ran)
                await asyncio.sleep(0)
            latencies.append((resumed[h.run_id] - t) * 1000)
    per_run = held // max(1, count - first)
    return before, after_park, per_run, median(latencies), max(latencies)


def parked_section(url: str, prefix: str, count: int) -> None:
    before, after, per_run, median_ms, max_ms = asyncio.run(parked(url, prefix, count))
    print_table(
        f"Redis: {count:,} runs parked at a gate",
        [
            Row("Python heap held per parked run (after gc)", f"{per_run} B"),
            Row("RSS with 200 parked", f"{before:.1f} MiB"),
            Row(f"RSS with {count:,} parked", f"{after:.1f} MiB", f"+{after - before:.1f} MiB"),
            Row("approve -> resumed step, median", f"{median_ms:.2f} ms", f"max {max_ms:.2f} ms"),
        ],
        peer="",
    )


# -- a Redis to talk to ------------------------------------------------------------------


@contextlib.contextmanager
def redis_url() -> Iterator[tuple[str, bool]]:
    """``(url, ours)``: ``REDIS_URL``, or a ``redis-server`` started on a free loopback port."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"], False
        return
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("set REDIS_URL or install redis-server (make test installs it)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        args = ["--port", str(port), "--bind", "127.0.0.1", "--dir", d, "--save", "", "--appendonly", "no"]
        proc = subprocess.Popen([binary, *args], stdout=subprocess.DEVNULL)
        try:
            for _ in range(200):
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.1):
                    break
                time.sleep(0.02)
            yield f"redis://127.0.0.1:{port}/0", True
        finally:
            proc.terminate()
            proc.wait()


async def drop_prefix(url: str, prefix: str) -> int:
    """Remove every key under ``prefix`` (every key of a store starts with its ``key_prefix``)."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    n = 0
    try:
        batch = []
        async for key in client.scan_iter(match=f"{prefix}*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                n += await client.unlink(*batch)
                batch.clear()
        if batch:
            n += await client.unlink(*batch)
    finally:
        await client.aclose()
    return n


@contextlib.contextmanager
def bench_redis() -> Iterator[tuple[str, str]]:
    """``(url, key_prefix)`` for a benchmark; on a Redis not started here, its keys are dropped after."""
    prefix = f"agentflow-bench-{os.getpid()}:"
    with redis_url() as (url, ours):
        try:
            yield url, prefix
        finally:
            if not ours:
                asyncio.run(drop_prefix(url, prefix))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=1.0, help="length of one measurement")
    ap.add_argument("--repeats", type=int, default=5, help="rounds (median taken)")
    ap.add_argument("--parked", type=int, default=10_000, help="runs parked at a gate (0: skip)")
    ap.add_argument("--dir", default=None, help="where the SQLite files go (a real disk)")
    ap.add_argument("--only", choices=["sqlite", "redis", "parked"], action="append", help="sections to run")
    args = ap.parse_args()
    only = set(args.only or ["sqlite", "redis", "parked"])

    t0 = time.perf_counter()
    if "sqlite" in only:
        with tempfile.TemporaryDirectory(dir=args.dir) as d:
            sqlite_section(d, args.seconds, args.repeats)
    if only & {"redis", "parked"}:
        with bench_redis() as (url, prefix):
            if "redis" in only:
                redis_section(url, prefix, args.seconds, args.repeats)
            if "parked" in only and args.parked:
                parked_section(url, f"{prefix}parked:", args.parked)
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
