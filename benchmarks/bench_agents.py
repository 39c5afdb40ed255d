"""The agent loop against the bare SDK and pydantic-ai, on the same scripted conversation.

Every side runs the same loop through the real ``openai`` SDK (its default HTTP client)
against the local wire-protocol server of ``tests/llm_server.py``: 5 model turns, each
of the first four asking for 2 tool calls (tools that return at once), the fifth a
final answer.

* the floor: the loop written by hand over ``AsyncOpenAI`` (what the loop must do and no
  more: send, run the calls, append the results, send again);
* agentflow: ``handle.run(prompt)`` with two ``@tool`` functions, every reply and tool
  result journaled (a memory journal: the journal's own work, not a store's I/O);
* pydantic-ai: ``Agent(OpenAIChatModel(...), tools=[...]).run(prompt)``, if installed.

Client CPU is the event loop thread's (``time.thread_time``: the server runs on a thread
of its own, so its work is not counted); wall time is the loop's. The sides are
interleaved round by round; medians of the rounds are printed, and each ratio is the
median of the per-round ratios. Targets: agentflow within 1.15x of the floor in client
CPU per turn and within 3% in wall time; at most 0.7x pydantic-ai's CPU per turn.

The server answers each request after ``--latency`` seconds (default 20 ms, well under a
real model's): CPU is the client's whatever the latency, and wall time shows what a
caller waits.

    python benchmarks/bench_agents.py [--loops 40] [--repeats 7] [--latency 0.02]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_core import Row, compare, print_table
from llm_server import LLMServer, Reply, ToolCall

from agentflow import Agent, tool
from agentflow.agents import AgentPools, AgentsConfig
from agentflow.testing import MemoryJournal

TURNS = 5


@tool(idempotent=True)
def lookup(repo: str) -> list[str]:
    """Open issues of a repository."""
    return [f"{repo}#1"]


@tool(idempotent=True)
def status(version: str) -> str:
    """Deployment status of a version."""
    return "live"


def script(server: LLMServer, loops: int) -> None:
    for _ in range(loops):
        for t in range(TURNS - 1):
            server.script(
                Reply(
                    tool_calls=[
                        ToolCall("lookup", {"repo": f"acme/app{t}"}),
                        ToolCall("status", {"version": f"1.{t}"}),
                    ]
                )
            )
        server.script("Ship it.")


# -- the floor: by hand over the bare SDK -------------------------------------------

BARE_TOOLS = [
    {
        "type": "function",
        "function": {"name": t.name, "description": t.description, "parameters": t.parameters},
    }
    for t in (lookup, status)
]
BARE_FNS: dict[str, Callable[..., Any]] = {"lookup": lookup.fn, "status": status.fn}


async def bare_loop(client: Any) -> str:
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Ship 1.2?"}]
    while True:
        reply = await client.chat.completions.create(model="m", messages=messages, tools=BARE_TOOLS)
        message = reply.choices[0].message
        if not message.tool_calls:
            return str(message.content)
        messages.append(message.model_dump(exclude_none=True))
        for call in message.tool_calls:
            result = BARE_FNS[call.function.name](**json.loads(call.function.arguments))
            messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)})


# -- pydantic-ai ---------------------------------------------------------------------


def pydantic_ai_agent(base_url: str) -> Any:
    try:
        from pydantic_ai import Agent as PAgent
        from pydantic_ai.models.openai import OpenAIChatModel
        from pydantic_ai.providers.openai import OpenAIProvider
    except ImportError:
        return None
    model = OpenAIChatModel("m", provider=OpenAIProvider(base_url=base_url, api_key="k"))
    return PAgent(model, tools=[lookup.fn, status.fn])


# -- measuring -------------------------------------------------------------------------


async def measure(loops: int, one: Callable[[], Awaitable[Any]]) -> tuple[float, float]:
    """Milliseconds of client CPU and of wall time per turn, over ``loops`` loops."""
    gc.collect()
    cpu, wall = time.thread_time(), time.perf_counter()
    for _ in range(loops):
        await one()
    turns = loops * TURNS
    return (time.thread_time() - cpu) / turns * 1000, (time.perf_counter() - wall) / turns * 1000


async def main(loops: int, repeats: int, latency: float) -> None:
    import openai

    with LLMServer(latency=latency) as server:
        os.environ["OPENAI_API_KEY"] = "k"
        os.environ["OPENAI_BASE_URL"] = server.openai_base_url
        client = openai.AsyncOpenAI(max_retries=0)
        pools = AgentPools(AgentsConfig({"ops": Agent(provider="openai", model="m", tools=[lookup, status])}))
        pai = pydantic_ai_agent(server.openai_base_url)

        async def af() -> None:
            async with pools.accessor(MemoryJournal()).ops as ops:
                await ops.run("Ship 1.2?", max_turns=TURNS)

        async def bare() -> None:
            await bare_loop(client)

        async def pyd() -> None:
            await pai.run("Ship 1.2?")

        sides: dict[str, Callable[[], Awaitable[Any]]] = {"agentflow": af, "bare": bare}
        if pai is not None:
            sides["pydantic-ai"] = pyd
        for one in sides.values():  # warm up
            script(server, 2)
            await measure(2, one)
        cpu: dict[str, list[float]] = {k: [] for k in sides}
        wall: dict[str, list[float]] = {k: [] for k in sides}
        for _ in range(repeats):
            for name, one in sides.items():
                script(server, loops)
                c, w = await measure(loops, one)
                cpu[name].append(c)
                wall[name].append(w)
        await client.close()
        await pools.aclose()
    rows: list[Row] = [
        compare("client CPU per turn, ms", cpu["agentflow"], cpu["bare"], "{:.3f}", at_most=1.15),
        compare("wall time per turn, ms", wall["agentflow"], wall["bare"], "{:.3f}", at_most=1.03),
    ]
    title = (
        f"Agent loop, {TURNS} turns x 2 tool calls, server latency {latency * 1000:g} ms "
        f"(median of {repeats} rounds)"
    )
    print_table(title, rows, "bare SDK")
    if pai is not None:
        print_table(
            "Against pydantic-ai's Agent, same loop",
            [compare("client CPU per turn, ms", cpu["agentflow"], cpu["pydantic-ai"], "{:.3f}", at_most=0.7)],
            "pydantic-ai",
        )
    else:
        print("\npydantic-ai is not installed (pip install 'pydantic-ai-slim[openai]'): not compared")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--loops", type=int, default=40, help="agent loops per round and side")
    parser.add_argument("--repeats", type=int, default=7, help="rounds (median taken)")
    parser.add_argument("--latency", type=float, default=0.02, help="seconds the server takes per request")
    args = parser.parse_args()
    asyncio.run(main(args.loops, args.repeats, args.latency))
