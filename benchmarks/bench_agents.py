"""The agent loop against the bare SDK, pydantic-ai and the OpenAI Agents SDK, on one scripted conversation.

Every side runs the same loop through the real ``openai`` SDK (its default HTTP client)
against the local wire-protocol server of ``tests/llm_server.py``: 5 model turns, each
of the first four asking for 2 tool calls (tools that return at once), the fifth a
final answer.

* the floor: the loop written by hand over ``AsyncOpenAI`` (what the loop must do and no
  more: send, run the calls, append the results, send again);
* agentflow: ``handle.run(prompt)`` with two ``@tool`` functions, every reply and tool
  result journaled (a memory journal: the journal's own work, not a store's I/O);
* agentflow on Redis: the same loop as the step of a workflow run on the Redis store
  (the run started and its result awaited each time), every journal entry a commit;
* pydantic-ai: ``Agent(OpenAIChatModel(...), tools=[...]).run(prompt)``, if installed;
* the OpenAI Agents SDK: ``Runner.run(Agent(model=OpenAIChatCompletionsModel(...),
  tools=[function_tool(...)]), prompt)``, Chat Completions like the others, tracing
  disabled (``set_tracing_disabled(True)``), if installed.

Client CPU is the event loop thread's (``time.thread_time``: the LLM server runs on a
thread of its own and Redis in its own process, so their work is not counted); wall
time is the loop's. The sides are interleaved round by round; medians of the rounds are
printed, and each ratio is the median of the per-round ratios. Targets: agentflow
within 1.15x of the floor in client CPU per turn and within 3% in wall time; at most
0.7x pydantic-ai's and 0.7x the Agents SDK's CPU per turn.

Round trips to Redis are counted apart from the timed rounds, through a counting TCP
proxy between the store and ``redis-server`` (on a thread of its own): a round trip is a
write of the client after a reply (or at the start), however many commands it carries.
They are counted while ``handle.run`` runs, with the tools idempotent (as in the timed
rounds) and again with both tools ``idempotent=False``, against the promise: at most one
per model turn plus one per non-idempotent tool call. Each round trip of one loop is
listed with the commands it carried and the journal keys they wrote.

The server answers each request after ``--latency`` seconds (default 20 ms, well under a
real model's): CPU is the client's whatever the latency, and wall time shows what a
caller waits. Redis: ``REDIS_URL`` (its keys go under a prefix of their own, removed
afterwards), or a ``redis-server`` from PATH on a free loopback port.

    python benchmarks/bench_agents.py [--loops 40] [--repeats 7] [--latency 0.02] [--no-redis]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_core import Row, compare, median, print_table
from bench_stores import bench_redis
from llm_server import LLMServer, Reply, ToolCall

from agentflow import END, START, Agent, Next, Workflow, WorkflowRunner, tool
from agentflow.agents import AgentPools, AgentsConfig
from agentflow.testing import MemoryJournal

TURNS = 5
CALLS = 2  # tool calls per turn but the last


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


# -- agentflow in a workflow (the Redis side) -----------------------------------------


def af_workflow(tools: list[Any], **persistence: Any) -> Workflow:
    """One step that runs the loop; ``counter()`` is read around ``handle.run`` when set."""

    async def ship(ctx: Any) -> Next:
        async with ctx.agents.ops as ops:
            before = COUNTER.trips() if COUNTER else 0
            run = await ops.run("Ship 1.2?", max_turns=TURNS)
            if COUNTER:
                COUNTER.windows.append((before, COUNTER.trips()))
        return Next(END, output=run.text)

    return (
        Workflow("AgentLoop")
        .flow({START: lambda ctx: "Ship", "Ship": ship})
        .agents({"ops": Agent(provider="openai", model="m", tools=tools)})
        .persistence(**persistence)
    )


# -- peers -----------------------------------------------------------------------------


def pydantic_ai_agent(base_url: str) -> Any:
    try:
        from pydantic_ai import Agent as PAgent
        from pydantic_ai.models.openai import OpenAIChatModel
        from pydantic_ai.providers.openai import OpenAIProvider
    except ImportError:
        return None
    model = OpenAIChatModel("m", provider=OpenAIProvider(base_url=base_url, api_key="k"))
    return PAgent(model, tools=[lookup.fn, status.fn])


def agents_sdk_agent(client: Any) -> Any:
    """The OpenAI Agents SDK's ``Agent`` on Chat Completions through ``client``, tracing off."""
    try:
        from agents import Agent as SAgent
        from agents import OpenAIChatCompletionsModel, function_tool, set_tracing_disabled
    except ImportError:
        return None
    set_tracing_disabled(True)
    model = OpenAIChatCompletionsModel(model="m", openai_client=client)
    return SAgent(name="ops", model=model, tools=[function_tool(lookup.fn), function_tool(status.fn)])


# -- counting Redis round trips ----------------------------------------------------------


def _commands(buf: bytearray) -> list[list[bytes]]:
    """Complete RESP commands (arrays of bulk strings) at the head of ``buf``, removed from it."""
    out: list[list[bytes]] = []
    pos = 0
    while True:
        start = pos
        if pos >= len(buf) or buf[pos : pos + 1] != b"*":
            break
        end = buf.find(b"\r\n", pos)
        if end < 0:
            break
        n, pos = int(buf[pos + 1 : end]), end + 2
        args: list[bytes] = []
        for _ in range(n):
            end = buf.find(b"\r\n", pos)
            if end < 0:
                break
            size = int(buf[pos + 1 : end])
            if len(buf) < end + 2 + size + 2:
                break
            args.append(bytes(buf[end + 2 : end + 2 + size]))
            pos = end + 2 + size + 2
        if len(args) < n:
            pos = start
            break
        out.append(args)
    del buf[:pos]
    return out


def _script_names() -> dict[str, str]:
    """The Redis store's Lua scripts by SHA1, to name them in the listing (their SHAs if it moved)."""
    try:
        from agentflow.stores import lua
    except ImportError:
        return {}
    return {v.sha: n for n, v in vars(lua).items() if isinstance(getattr(v, "sha", None), str)}


@dataclass
class TripCounter:
    """A TCP proxy to Redis on a thread of its own, counting round trips and what they carry."""

    host: str
    port: int
    #: per round trip: the commands it carried, each as a short label.
    carried: list[list[str]] = field(default_factory=list)
    #: (round trips before, after) around each ``handle.run``.
    windows: list[tuple[int, int]] = field(default_factory=list)
    #: (round trips before, after) around each whole run, from ``runner.run()`` to its result.
    runs: list[tuple[int, int]] = field(default_factory=list)
    scripts: dict[str, str] = field(default_factory=_script_names)  # sha -> the store's name for it
    url: str = ""
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)

    def trips(self) -> int:
        return len(self.carried)

    def __enter__(self) -> TripCounter:
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        async def serve() -> None:
            self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
            self.url = f"redis://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/0"
            ready.set()

        def run() -> None:
            self._loop.run_until_complete(serve())
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        ready.wait()
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    async def _shutdown(self) -> None:
        """Close every connection (each side's reads end) and wait for their tasks."""
        self._server.close()
        for writer in self._writers:
            writer.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        self._writers += (writer, up_writer)
        replied = [True]  # the next write of the client starts a round trip

        async def up() -> None:
            buf = bytearray()
            while data := await reader.read(1 << 16):
                if replied[0]:
                    self.carried.append([])
                    replied[0] = False
                buf += data
                self.carried[-1] += [self._label(c) for c in _commands(buf)]
                up_writer.write(data)
                await up_writer.drain()
            up_writer.close()

        async def down() -> None:
            while data := await up_reader.read(1 << 16):
                replied[0] = True
                writer.write(data)
                await writer.drain()
            writer.close()

        try:
            await asyncio.gather(up(), down(), return_exceptions=True)
        finally:
            writer.close()
            up_writer.close()

    def _label(self, cmd: list[bytes]) -> str:
        name = cmd[0].decode().upper()
        if name == "EVALSHA":
            sha = cmd[1].decode()
            journal = [a.decode().split(":", 5)[-1] for a in cmd[3:] if a.startswith(b"agent:")]
            what = self.scripts.get(sha, sha[:8])
            return f"EVALSHA {what}" + (f" journal {journal}" if journal else "")
        if name == "ZRANGE" and len(cmd) > 1 and cmd[1].endswith(b":gates"):
            return "ZRANGE gates (the timer sweep, every 0.2 s)"
        return name


COUNTER: TripCounter | None = None


async def count_trips(url: str, prefix: str, loops: int, server: LLMServer) -> dict[str, Any]:
    """Round trips per loop while ``handle.run`` runs, idempotent tools and not."""
    global COUNTER
    parts = urlsplit(url)
    out: dict[str, Any] = {}
    for name, tools in (
        ("idempotent", [lookup, status]),
        ("non-idempotent", [tool(lookup.fn, idempotent=False), tool(status.fn, idempotent=False)]),
    ):
        with TripCounter(parts.hostname or "127.0.0.1", parts.port or 6379) as counter:
            wf = af_workflow(tools, store="redis", url=counter.url, key_prefix=f"{prefix}trips:{name}:")
            async with WorkflowRunner(wf) as runner:
                script(server, 1 + loops)
                await (await runner.run()).result()  # scripts loaded, connections open
                COUNTER = counter
                for _ in range(loops):
                    before = counter.trips()
                    await (await runner.run()).result()
                    counter.runs.append((before, counter.trips()))
                COUNTER = None
            trips = [counter.carried[a:b] for a, b in counter.windows]
            out[name] = {
                "all": [len(t) for t in trips],
                "journal": [sum(any("journal" in c for c in cs) for cs in t) for t in trips],
                "run": [b - a for a, b in counter.runs],
                "listing": trips[-1],
            }
    return out


def print_trips(trips: dict[str, Any]) -> None:
    calls = (TURNS - 1) * CALLS
    print(f"\nRedis round trips while handle.run runs ({TURNS} turns, {calls} tool calls)")
    for name, found in trips.items():
        promise = TURNS + (calls if name == "non-idempotent" else 0)
        n, every, run = median(found["journal"]), median(found["all"]), median(found["run"])
        mark = "ok" if n <= promise else "ABOVE THE PROMISE"
        print(
            f"  tools {name}: {n:g} journal round trips per loop ({n / TURNS:.2f} per model turn), "
            f"promise <= {promise} (one per turn{' + one per call' if name == 'non-idempotent' else ''})"
            f"  {mark}\n    {every:g} with the background ones (timer sweep, lease renewal); "
            f"{run:g} for the whole run (its creation and step commits too)"
        )
        for i, carried in enumerate(found["listing"], 1):
            print(f"    {i:2d}. {' + '.join(carried)}")


# -- measuring -------------------------------------------------------------------------


async def measure(loops: int, one: Callable[[], Awaitable[Any]]) -> tuple[float, float]:
    """Milliseconds of client CPU and of wall time per turn, over ``loops`` loops."""
    gc.collect()
    cpu, wall = time.thread_time(), time.perf_counter()
    for _ in range(loops):
        await one()
    turns = loops * TURNS
    return (time.thread_time() - cpu) / turns * 1000, (time.perf_counter() - wall) / turns * 1000


async def main(loops: int, repeats: int, latency: float, redis: tuple[str, str] | None) -> None:
    import openai

    with LLMServer(latency=latency) as server:
        os.environ["OPENAI_API_KEY"] = "k"
        os.environ["OPENAI_BASE_URL"] = server.openai_base_url
        client = openai.AsyncOpenAI(max_retries=0)
        pools = AgentPools(AgentsConfig({"ops": Agent(provider="openai", model="m", tools=[lookup, status])}))
        pai = pydantic_ai_agent(server.openai_base_url)
        sdk_client = openai.AsyncOpenAI(max_retries=0)
        sdk = agents_sdk_agent(sdk_client)
        runner = None
        if redis is not None:
            url, prefix = redis
            runner = WorkflowRunner(af_workflow([lookup, status], store="redis", url=url, key_prefix=prefix))

        async def af() -> None:
            async with pools.accessor(MemoryJournal()).ops as ops:
                await ops.run("Ship 1.2?", max_turns=TURNS)

        async def bare() -> None:
            await bare_loop(client)

        async def pyd() -> None:
            await pai.run("Ship 1.2?")

        async def oai() -> None:
            from agents import Runner

            await Runner.run(sdk, "Ship 1.2?", max_turns=TURNS * 2)

        async def af_redis() -> None:
            assert runner is not None
            await (await runner.run()).result()

        sides: dict[str, Callable[[], Awaitable[Any]]] = {"agentflow": af, "bare": bare}
        if pai is not None:
            sides["pydantic-ai"] = pyd
        if sdk is not None:
            sides["agents-sdk"] = oai
        if runner is not None:
            sides["agentflow-redis"] = af_redis
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
        trips = await count_trips(*redis, 5, server) if redis is not None else None
        if runner is not None:
            await runner.close()
        await client.close()
        await sdk_client.close()
        await pools.aclose()
    rows: list[Row] = [
        compare("client CPU per turn, ms", cpu["agentflow"], cpu["bare"], "{:.3f}", at_most=1.15),
        compare("wall time per turn, ms", wall["agentflow"], wall["bare"], "{:.3f}", at_most=1.03),
    ]
    if runner is not None:
        rows += [
            compare("a run on Redis: CPU per turn, ms", cpu["agentflow-redis"], cpu["bare"], "{:.3f}"),
            compare("a run on Redis: wall per turn, ms", wall["agentflow-redis"], wall["bare"], "{:.3f}"),
        ]
    title = (
        f"Agent loop, {TURNS} turns x {CALLS} tool calls, server latency {latency * 1000:g} ms "
        f"(median of {repeats} rounds)"
    )
    print_table(title, rows, "bare SDK")
    for name, label, install in (
        ("pydantic-ai", "pydantic-ai's Agent", "pydantic-ai-slim[openai]"),
        ("agents-sdk", "the OpenAI Agents SDK's Runner.run", "openai-agents"),
    ):
        if name not in sides:
            print(f"\n{label}: not installed (pip install '{install}'), not compared")
            continue
        print_table(
            f"Against {label}, same loop",
            [
                compare("client CPU per turn, ms", cpu["agentflow"], cpu[name], "{:.3f}", at_most=0.7),
                compare("wall time per turn, ms", wall["agentflow"], wall[name], "{:.3f}"),
            ],
            name,
        )
    if trips is not None:
        print_trips(trips)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--loops", type=int, default=40, help="agent loops per round and side")
    parser.add_argument("--repeats", type=int, default=7, help="rounds (median taken)")
    parser.add_argument("--latency", type=float, default=0.02, help="seconds the server takes per request")
    parser.add_argument("--no-redis", action="store_true", help="no Redis side, no round trips")
    args = parser.parse_args()
    if args.no_redis:
        asyncio.run(main(args.loops, args.repeats, args.latency, None))
    else:
        with bench_redis() as redis:
            asyncio.run(main(args.loops, args.repeats, args.latency, redis))
