"""Agent pool benchmarks.

(a) The median cost of ``await ctx.agents.writer`` + ``await writer.close()`` on the
    uncontended path (target: under 20 µs).
(b) 1,000 calls, 32 at a time, against tests/llm_server.py answering after 50 ms, two
    ways on the same load: through agentflow (a pool of 32 handles, the OpenAI provider,
    a journal per step) and through the bare SDK (``openai.AsyncOpenAI`` with its default
    HTTP client, each call under an ``asyncio.Semaphore(32)``). The two alternate in one
    process, round after round, so drifts of the machine hit both alike; the medians of
    wall time, their ratio (target: agentflow within 3 % of the bare SDK) and the CPU
    per call of this process are printed. The ideal is 1000 / 32 * 50 ms = 1.5625 s. The
    server runs in its own process, as a real API would, so its CPU time does not
    compete with the client's for one GIL. The same comparison follows for Anthropic
    (``anthropic.AsyncAnthropic``, Messages).

Run: ``.venv/bin/python benchmarks/bench_pool.py [rounds]``.
"""

from __future__ import annotations

import asyncio
import gc
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import anthropic
import openai
from agentflow_anthropic import AnthropicProvider
from agentflow_openai import OpenAIProvider

from agentflow.agents import Agent, AgentPools, AgentsConfig, Provider
from agentflow.testing import MemoryJournal, ScriptedProvider

SERVER = Path(__file__).resolve().parents[1] / "tests" / "llm_server.py"
CALLS, CONCURRENCY, LATENCY = 1000, 32, 0.05

#: One measured load: (wall seconds, CPU seconds of this process).
Load = Callable[[], Awaitable[tuple[float, float]]]


@contextmanager
def llm_server_process(latency: float) -> Iterator[str]:
    """Run tests/llm_server.py in a child process; yield its OpenAI base URL."""
    proc = subprocess.Popen(
        [sys.executable, str(SERVER), str(latency)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip().removeprefix("OPENAI_BASE_URL=")
        yield url
    finally:
        assert proc.stdin is not None
        proc.stdin.close()  # the server exits when its stdin closes
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


async def acquire_release(per_round: int = 20_000, rounds: int = 15) -> float:
    """Median µs of one uncontended acquire + release, over ``rounds`` rounds."""
    pools = AgentPools(AgentsConfig({"writer": Agent(provider=ScriptedProvider(), model="m")}, max_handles=4))
    agents = pools.accessor(MemoryJournal())
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(per_round):
            writer = await agents.writer
            await writer.close()
        samples.append((time.perf_counter() - started) / per_round * 1e6)
    # Handles a step forgot are what close_all() is for; here every one was closed.
    assert await agents.close_all() == []
    return statistics.median(samples)


async def measure(calls: int, one: Callable[[int], Awaitable[None]]) -> tuple[float, float]:
    """Wall and CPU seconds of ``calls`` concurrent ``one(i)``, after a warm-up of one per slot."""
    await asyncio.gather(*(one(i) for i in range(CONCURRENCY)))  # connections open, code paths warm
    gc.collect()
    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(one(i) for i in range(calls)))
    return time.perf_counter() - started, time.process_time() - cpu


async def agentflow_calls(provider: Provider, calls: int = CALLS) -> tuple[float, float]:
    """``calls`` one-call steps through a pool of ``CONCURRENCY`` handles, each with its own journal."""
    pools = AgentPools(
        AgentsConfig({"writer": Agent(provider=provider, model="bench")}, max_handles=CONCURRENCY)
    )

    async def step(i: int) -> None:
        # One step execution per call, with its own accessor and journal, like the engine's.
        async with pools.accessor(MemoryJournal(scope=f"run:{i}")).writer as writer:
            await writer.send(f"call {i}")

    try:
        elapsed, cpu = await measure(calls, step)
        stats = pools.statistics()["writer"]
        assert stats.open == 0 and stats.total_calls == calls + CONCURRENCY, stats
    finally:
        await pools.aclose()
    return elapsed, cpu


async def bare_openai_calls(base_url: str, calls: int = CALLS) -> tuple[float, float]:
    """The same load through ``AsyncOpenAI`` alone: its default client, a semaphore of ``CONCURRENCY``."""
    client = openai.AsyncOpenAI(api_key="bench", base_url=base_url)
    slots = asyncio.Semaphore(CONCURRENCY)

    async def call(i: int) -> None:
        async with slots:
            completion = await client.chat.completions.create(
                model="bench", messages=[{"role": "user", "content": f"call {i}"}]
            )
            assert completion.choices[0].message.content

    try:
        return await measure(calls, call)
    finally:
        await client.close()


async def bare_anthropic_calls(base_url: str, calls: int = CALLS) -> tuple[float, float]:
    """The same load through ``AsyncAnthropic`` alone: its default client, a semaphore of ``CONCURRENCY``."""
    client = anthropic.AsyncAnthropic(api_key="bench", base_url=base_url)
    slots = asyncio.Semaphore(CONCURRENCY)

    async def call(i: int) -> None:
        async with slots:
            message = await client.messages.create(
                model="bench", max_tokens=1024, messages=[{"role": "user", "content": f"call {i}"}]
            )
            assert message.content

    try:
        return await measure(calls, call)
    finally:
        await client.close()


async def compare(name: str, ours: Load, bare: Load, rounds: int) -> None:
    """Run the two loads alternately (each goes first in every other round); print medians and ratio."""
    runs: dict[str, list[tuple[float, float]]] = {"agentflow": [], "bare": []}
    for i in range(rounds):
        order = [("agentflow", ours), ("bare", bare)]
        for label, load in order if i % 2 == 0 else order[::-1]:
            runs[label].append(await load())
    ideal = CALLS / CONCURRENCY * LATENCY
    wall = {label: statistics.median(w for w, _ in done) for label, done in runs.items()}
    cpu = {label: statistics.median(c for _, c in done) / CALLS * 1000 for label, done in runs.items()}
    ratio = wall["agentflow"] / wall["bare"]
    print(f"    {name}, {CALLS} calls, {CONCURRENCY} at a time, {LATENCY * 1000:.0f} ms server latency:")
    for label, what in (("agentflow", "pool + provider + journal"), ("bare", "bare SDK + semaphore")):
        print(
            f"      {label:<9} ({what}): median of {rounds} {wall[label]:.3f} s "
            f"({(wall[label] / ideal - 1) * 100:+.1f} % vs ideal {ideal:.4f} s), "
            f"CPU per call {cpu[label]:.2f} ms"
        )
    verdict = "within" if ratio <= 1.03 else "OVER"
    print(f"      ratio agentflow / bare: {ratio:.3f} ({verdict} the 3 % target)")
    # The spread says how far the machine's other load can be trusted to have hit both alike.
    paired = " ".join(f"{a[0] / b[0]:.2f}" for a, b in zip(runs["agentflow"], runs["bare"], strict=True))
    print(f"      round by round: {paired}")


async def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    cost = await acquire_release()
    print(f"(a) acquire + release, uncontended: median {cost:.2f} µs  (target < 20 µs)")
    print(f"(b) agentflow against the bare SDK ({os.cpu_count()} CPUs, Python {platform.python_version()}):")
    with llm_server_process(LATENCY) as base_url:
        messages_url = base_url.removesuffix("/v1")  # the Anthropic SDK adds /v1/messages
        await compare(
            f"OpenAI SDK {openai.__version__} (Chat Completions)",
            lambda: agentflow_calls(OpenAIProvider(api_key="bench", base_url=base_url)),
            lambda: bare_openai_calls(base_url),
            rounds,
        )
        await compare(
            f"Anthropic SDK {anthropic.__version__} (Messages)",
            lambda: agentflow_calls(AnthropicProvider(api_key="bench", base_url=messages_url)),
            lambda: bare_anthropic_calls(messages_url),
            rounds,
        )


if __name__ == "__main__":
    asyncio.run(main())
