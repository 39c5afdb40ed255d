"""Fleet-wide provider limits (§16): ``Agent(limit=RateLimit(...))`` across runners and processes.

Real parts: the Redis and Postgres stores on real servers, SQLite in a file, a real
second process; the agent's calls are logged by a scripted provider, and the combined
log must keep to the limit. On the memory store the limit holds across the runners of
one process.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
from limitflows import CALLS, LIMIT, calls_of, limited

from agentflow import END, START, Agent, Next, RateLimit, Workflow, WorkflowDefinitionError, WorkflowRunner
from agentflow._runtime.limits import limiter_for
from agentflow.agents.pool import limit_key
from agentflow.stores import MemoryStore, Store
from agentflow.stores.capabilities import Quota, RateLimits
from agentflow.stores.limits import SLOT_POLL, ProcessLimits
from agentflow.testing import ScriptedProvider

SCRIPT = str(Path(__file__).with_name("limitflows.py"))
#: The same machine's clock stamps every call, a little after its turn was granted: two
#: calls a window apart may look this much closer.
_JITTER = 0.05


def assert_kept(calls: list[tuple[float, float, int]], limit: RateLimit) -> None:
    """No more than ``limit.requests`` calls start in any window, and (``concurrent=1``) none overlap."""
    starts = [c[0] for c in calls]
    n = limit.requests
    assert n is not None
    for i in range(len(starts) - n):
        assert starts[i + n] - starts[i] >= limit.window - _JITTER, (i, starts)
    if limit.concurrent == 1:
        for (_, end, _), (start, _, _) in itertools.pairwise(calls):
            assert start >= end, calls


# -- declaring limits ----------------------------------------------------------------


def test_a_rate_limit_is_checked_when_declared():
    with pytest.raises(WorkflowDefinitionError, match="needs requests_per_minute"):
        RateLimit()
    with pytest.raises(WorkflowDefinitionError, match="positive"):
        RateLimit(requests_per_minute=0)
    with pytest.raises(WorkflowDefinitionError, match="positive"):
        RateLimit(concurrent=-1)
    with pytest.raises(WorkflowDefinitionError, match="whole number"):
        RateLimit(concurrent=1.5)  # type: ignore[arg-type]
    with pytest.raises(WorkflowDefinitionError, match="widen the window"):
        RateLimit(requests_per_minute=30, window=1.0)
    limit = RateLimit(requests_per_minute=300, tokens_per_minute=6000, window=1.0)
    assert (limit.requests, limit.tokens, limit.concurrent) == (5, 100, None)
    with pytest.raises(WorkflowDefinitionError, match="takes a RateLimit"):
        Agent(provider="openai", model="m", limit={"concurrent": 1})  # type: ignore[arg-type]


def test_the_limit_key_defaults_to_provider_model_and_agent():

    assert (
        limit_key("writer", Agent(provider="openai", model="gpt-4o", limit=LIMIT)) == "openai:gpt-4o:writer"
    )
    shared = RateLimit(concurrent=2, key="openai-team")
    assert limit_key("critic", Agent(provider=ScriptedProvider(), model="m", limit=shared)) == "openai-team"


# -- the stores' limits: one behaviour on every store that keeps them -----------------

LIMIT_STORES = ["process", "sqlite", "redis", "postgres"]


@pytest.fixture(params=LIMIT_STORES)
def limits(request: pytest.FixtureRequest, make_store) -> RateLimits:
    if request.param == "process":
        return ProcessLimits()
    store = make_store(request.param)
    assert isinstance(store, RateLimits)
    return store


def quota(requests=None, tokens=None, concurrent=None, window=0.5) -> Quota:
    return Quota(requests, tokens, concurrent, window, 30.0)


async def test_requests_in_a_window(limits: RateLimits):
    q = quota(requests=3)
    for t in "abc":
        assert await limits.acquire_limit("k", t, q, 0) == (0.0, None)
    wait, why = await limits.acquire_limit("k", "d", q, 0)
    assert why == "requests_per_minute" and 0 < wait <= 0.5
    assert await limits.acquire_limit("k", "a", q, 0) == (0.0, None)  # asked again: granted already
    assert (await limits.acquire_limit("other", "d", q, 0))[0] == 0.0  # another limit, its own window
    await asyncio.sleep(wait + 0.01)
    assert await limits.acquire_limit("k", "d", q, 0) == (0.0, None)


async def test_tokens_are_reserved_then_counted(limits: RateLimits):
    q = quota(tokens=100)
    assert (await limits.acquire_limit("k", "a", q, 60))[0] == 0.0
    wait, why = await limits.acquire_limit("k", "b", q, 60)
    assert why == "tokens_per_minute" and 0 < wait <= 0.5
    await limits.release_limit("k", "a", q, 20)  # it used 20: room for 60 more
    assert (await limits.acquire_limit("k", "b", q, 60))[0] == 0.0
    assert (await limits.acquire_limit("k", "c", q, 30))[1] == "tokens_per_minute"
    await limits.release_limit("k", "b", q, None)  # kept at 60


async def test_a_call_bigger_than_the_window_goes_alone(limits: RateLimits):
    q = quota(tokens=100)
    assert (await limits.acquire_limit("k", "big", q, 500))[0] == 0.0
    wait, why = await limits.acquire_limit("k", "next", q, 1)
    assert why == "tokens_per_minute" and wait > 0.4
    assert (await limits.acquire_limit("k2", "big", q, 500))[0] == 0.0


async def test_concurrent_slots_are_held_until_released(limits: RateLimits):
    q = quota(concurrent=1, window=60.0)
    assert (await limits.acquire_limit("k", "a", q, 0))[0] == 0.0
    assert await limits.acquire_limit("k", "b", q, 0) == (SLOT_POLL, "concurrent")
    await limits.renew_limit("k", "a", q)
    await limits.release_limit("k", "a", q, None)
    assert (await limits.acquire_limit("k", "b", q, 0))[0] == 0.0


async def test_a_dead_holders_slot_frees_itself(limits: RateLimits):
    q = Quota(None, None, 1, 60.0, 0.2)
    assert (await limits.acquire_limit("k", "dead", q, 0))[0] == 0.0
    assert (await limits.acquire_limit("k", "b", q, 0))[1] == "concurrent"
    await asyncio.sleep(0.25)
    assert (await limits.acquire_limit("k", "b", q, 0))[0] == 0.0


async def test_redis_limits_share_a_hash_tag_and_expire(make_store):
    from agentflow.stores.keys import limit_keys, slot

    store = make_store("redis", key_prefix="app")
    q = Quota(2, 100, 1, 1.0, 2.0)
    assert (await store.acquire_limit("openai:gpt-4o:writer", "a", q, 10))[0] == 0.0
    keys = limit_keys("app", "openai:gpt-4o:writer")
    assert len({slot(k.encode()) for k in keys}) == 1
    for k in keys:
        assert 0 < await store.client.pttl(k) <= 4000  # window + hold + a second
    await store.release_limit("openai:gpt-4o:writer", "a", q, 7)
    assert await store.client.hget(keys[1], "a") == b"7"


# -- agents of several runners and processes --------------------------------------------


async def _throttled(store: Store, run_ids: list[str]) -> list[dict]:
    found = []
    for run_id in run_ids:
        found += [e.data for e in await store.events(run_id) if e.kind == "agent_throttled"]
    return found


def _spawn(kind: str, url: str, log: str, runs: int, skew: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, SCRIPT, kind, url, log, str(runs), str(skew)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", ["sqlite", "redis", "postgres"])
async def test_two_runners_and_a_process_share_one_limit(kind, make_store, request, tmp_path):
    log = str(tmp_path / "calls.log")
    a, b = make_store(kind), make_store(kind)
    url = getattr(a, "path", None) or request.getfixturevalue(f"{kind}_url")
    # On Redis and Postgres the other process's clock runs an hour ahead: the store's
    # clock judges the window. SQLite's is the machine's (as for leases).
    other = _spawn(kind, str(url), log, runs=2, skew=0.0 if kind == "sqlite" else 3600.0)
    try:
        assert other.stdout is not None and other.stdin is not None
        ready = await asyncio.to_thread(other.stdout.readline)
        assert ready.strip() == "ready", other.stderr.read() if other.stderr else ""
        async with WorkflowRunner(limited(log), store=a) as ra, WorkflowRunner(limited(log), store=b) as rb:
            assert limiter_for(a).fleet_wide
            other.stdin.write("go\n")
            other.stdin.flush()
            handles = [await r.run() for r in (ra, rb) for _ in range(2)]
            results = await asyncio.gather(*(h.result(timeout=60) for h in handles))
            out, err = await asyncio.to_thread(other.communicate, timeout=60)
            assert other.returncode == 0, err
            assert [r.output for r in results] == [CALLS] * 4  # nobody got an error
            stats = [ra.agent_statistics()["writer"], rb.agent_statistics()["writer"], json.loads(out)]
            throttled = await _throttled(a, [h.run_id for h in handles])
    finally:
        if other.poll() is None:
            other.kill()
            other.wait()
    calls = calls_of(log)
    assert len(calls) == 6 * CALLS and len({pid for *_, pid in calls}) == 2
    assert_kept(calls, LIMIT)
    assert calls[-1][0] - calls[0][0] >= 2 * LIMIT.window - _JITTER  # 12 calls: three windows
    local = stats[:2]
    assert all(s.total_calls == 2 * CALLS for s in local)
    waited = sum(s.waited for s in local) + stats[2]["waited"]
    assert waited >= 6  # 7 of the 12 calls at least cannot go in the first window
    assert sum(s.wait_seconds for s in local) + stats[2]["wait_seconds"] > 2 * LIMIT.window
    for s in local:
        assert s.last_wait <= s.wait_seconds
    assert len(throttled) == sum(s.waited for s in local)
    for data in throttled:
        assert data["agent"] == "writer" and data["key"] == "clocked:test:writer"
        assert data["seconds"] > 0 and data["limit"] in ("requests_per_minute", "concurrent")
    assert any(d["limit"] == "requests_per_minute" for d in throttled)


@pytest.mark.timeout(60)
async def test_the_memory_store_limits_the_runners_of_one_process(tmp_path):
    log = str(tmp_path / "calls.log")
    store = MemoryStore()
    assert not limiter_for(store).fleet_wide
    limit = RateLimit(requests_per_minute=180, window=1.0, concurrent=1)  # 3 a second
    async with (
        WorkflowRunner(limited(log, limit), store=store) as ra,
        WorkflowRunner(limited(log, limit), store=MemoryStore()) as rb,
    ):
        handles = [await r.run() for r in (ra, rb) for _ in range(2)]
        results = await asyncio.gather(*(h.result(timeout=30) for h in handles))
        assert [r.output for r in results] == [CALLS] * 4
        stats = ra.agent_statistics()["writer"], rb.agent_statistics()["writer"]
        throttled = await _throttled(store, [h.run_id for h in handles[:2]])
    calls = calls_of(log)
    assert len(calls) == 4 * CALLS
    assert_kept(calls, limit)
    assert sum(s.waited for s in stats) >= 5 and stats[0].waited == len(throttled)


@pytest.mark.timeout(30)
async def test_streamed_calls_and_tokens_per_minute(tmp_path):
    """``handle.stream`` waits its turn too; a reservation is corrected by the reply's usage."""
    provider = ScriptedProvider(["one two three"] * 3)
    # 60 tokens a second; a call reserves max_tokens=30 plus its prompt / 4, and uses 4 to 12.
    limit = RateLimit(tokens_per_minute=3600, window=1.0, key="streamed")

    async def talk(ctx):
        async with ctx.agents.writer as w:
            for _ in range(3):
                async for _delta in w.stream("hi"):
                    pass
        return Next(END, output=w.last_reply.usage.total_tokens)

    agent = Agent(provider=provider, model="m", max_tokens=30, limit=limit)
    wf = Workflow("Streamed").flow({START: talk}).agents({"writer": agent})
    async with WorkflowRunner(wf, store=MemoryStore()) as runner:
        handle = await runner.run()
        result = await handle.result(timeout=20)
        stats = runner.agent_statistics()["writer"]
    assert result.output > 0 and len(provider.requests) == 3
    # Reserved, two calls would not fit a window; corrected to their real usage, three do.
    assert stats.waited == 0 and stats.total_calls == 3
