"""Core engine speed against LangGraph, same workloads, one process.

1. A 10-step linear flow updating state at every step, many runs back to back:
   steps per second (agentflow on its in-memory store vs a LangGraph StateGraph with
   no checkpointer).
2. A fan-out of 1,000 branches with a join (agentflow ``Parallel.map`` vs LangGraph
   ``Send``): milliseconds per fan-out.

Each measurement is repeated; medians are printed with the ratios.

    python benchmarks/bench_core.py [--runs 2000] [--repeats 7]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import operator
import statistics
import time
from typing import Annotated, TypedDict

from pydantic import BaseModel

from agentflow import END, START, Parallel, Workflow, WorkflowRunner

STEPS = 10
FANOUT = 1000


# -- agentflow -------------------------------------------------------------------


class Counter(BaseModel):
    n: int = 0


def _inc(i: int):
    nxt = f"s{i + 1}" if i + 1 < STEPS else END

    def s(ctx):
        ctx.set_state(n=ctx.state.n + 1)
        return nxt

    s.__name__ = f"s{i}"
    return s


def af_linear(**persistence) -> Workflow:
    """The 10-step flow; ``persistence`` options go to ``.persistence()`` (memory without)."""
    steps = {f"s{i}": _inc(i) for i in range(1, STEPS)}
    wf = Workflow("Linear").state(Counter).flow({START: _inc(0), **steps})
    return wf.persistence(**persistence) if persistence else wf


def work(ctx):
    return ctx.item * 2


def af_fanout() -> Workflow:
    return Workflow("FanOut").flow(
        {
            START: lambda ctx: Parallel.map(work, range(FANOUT), "join"),
            "join": lambda ctx: END if len(ctx.step_results["work"]) == FANOUT else "join",
        }
    )


async def af_linear_rate(runs: int) -> float:
    runner = WorkflowRunner(af_linear())
    try:
        t = time.perf_counter()
        for _ in range(runs):
            h = await runner.run()
            res = await h.result()
        dt = time.perf_counter() - t
        assert res.state.n == STEPS
        return runs * STEPS / dt
    finally:
        await runner.close()


async def af_fanout_ms(rounds: int) -> float:
    runner = WorkflowRunner(af_fanout())
    try:
        times = []
        for _ in range(rounds):
            t = time.perf_counter()
            h = await runner.run()
            res = await h.result()
            times.append(time.perf_counter() - t)
            assert len(res.step_results["work"]) == FANOUT
        return statistics.median(times) * 1000
    finally:
        await runner.close()


# -- LangGraph ---------------------------------------------------------------------


def lg_linear(checkpointer=None):
    from langgraph.graph import END as LG_END
    from langgraph.graph import START as LG_START
    from langgraph.graph import StateGraph

    class S(TypedDict):
        n: int

    g = StateGraph(S)
    for i in range(STEPS):
        g.add_node(f"s{i}", lambda s: {"n": s["n"] + 1})
    g.add_edge(LG_START, "s0")
    for i in range(STEPS - 1):
        g.add_edge(f"s{i}", f"s{i + 1}")
    g.add_edge(f"s{STEPS - 1}", LG_END)
    return g.compile(checkpointer=checkpointer)


def lg_fanout():
    from langgraph.graph import END as LG_END
    from langgraph.graph import START as LG_START
    from langgraph.graph import StateGraph
    from langgraph.types import Send

    class S(TypedDict):
        results: Annotated[list[int], operator.add]

    class W(TypedDict):
        i: int

    g = StateGraph(S)
    g.add_node("fan", lambda s: {})
    g.add_node("work", lambda w: {"results": [w["i"] * 2]})
    g.add_node("join", lambda s: {})
    g.add_edge(LG_START, "fan")
    g.add_conditional_edges("fan", lambda s: [Send("work", {"i": i}) for i in range(FANOUT)], ["work"])
    g.add_edge("work", "join")
    g.add_edge("join", LG_END)
    return g.compile()


def lg_linear_rate(runs: int) -> float:
    graph = lg_linear()
    t = time.perf_counter()
    for _ in range(runs):
        out = graph.invoke({"n": 0})
    dt = time.perf_counter() - t
    assert out["n"] == STEPS
    return runs * STEPS / dt


def lg_fanout_ms(rounds: int) -> float:
    graph = lg_fanout()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        out = graph.invoke({"results": []})
        times.append(time.perf_counter() - t)
        assert len(out["results"]) == FANOUT
    return statistics.median(times) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=2000, help="linear runs per measurement")
    ap.add_argument("--repeats", type=int, default=7, help="measurements per engine (median taken)")
    ap.add_argument("--fanouts", type=int, default=5, help="fan-outs per measurement")
    args = ap.parse_args()

    af_rates, lg_rates, af_fan, lg_fan = [], [], [], []
    lg_runs = max(50, args.runs // 10)
    # Interleaved, each measurement starting from a collected heap so neither engine pays
    # for the other's garbage.
    for _ in range(args.repeats):
        gc.collect()
        af_rates.append(asyncio.run(af_linear_rate(args.runs)))
        gc.collect()
        lg_rates.append(lg_linear_rate(lg_runs))
        gc.collect()
        af_fan.append(asyncio.run(af_fanout_ms(args.fanouts)))
        gc.collect()
        lg_fan.append(lg_fanout_ms(max(2, args.fanouts // 2)))
    af_r, lg_r = statistics.median(af_rates), statistics.median(lg_rates)
    af_f, lg_f = statistics.median(af_fan), statistics.median(lg_fan)
    print(f"linear {STEPS}-step flow, state update per step (median of {args.repeats}):")
    print(f"  agentflow  {af_r:>10,.0f} steps/s")
    print(f"  langgraph  {lg_r:>10,.0f} steps/s")
    print(f"  ratio      {af_r / lg_r:>10.1f}x   (target >= 20x)")
    print(f"fan-out of {FANOUT} branches with a join (median of {args.repeats}):")
    print(f"  agentflow  {af_f:>10.2f} ms")
    print(f"  langgraph  {lg_f:>10.2f} ms")
    print(f"  ratio      {lg_f / af_f:>10.1f}x   (target >= 10x)")


if __name__ == "__main__":
    main()
