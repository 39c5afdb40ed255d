"""Core engine speed in memory, against the peers a user would pick instead, in one process.

1. A 10-step linear flow, each step adding one to a counter in the state, many runs
   back to back (steps per second):
   agentflow on its in-memory store, a LangGraph ``StateGraph`` through ``invoke`` (no
   checkpointer), and pydantic-graph's v1 API (``BaseNode`` / ``Graph`` / ``End``, its
   default in-memory persistence). Targets: at least 20x LangGraph, 10x pydantic-graph.
2. A fan-out of 1,000 branches with a join: agentflow ``Parallel.map`` against a bare
   ``asyncio.gather`` of 1,000 coroutines doing the same work (the floor any asyncio
   fan-out pays), milliseconds per fan-out. Target: within 1.2x of the floor. LangGraph
   ``Send`` is printed beside it for reference.

Each measurement is repeated, the engines interleaved (one repeat of each, then the next
round), each from a collected heap. Medians are printed; a ratio is the median of the
per-round ratios, with the lowest and highest round in brackets. The machine is noisy:
compare ratios, not one-off times.

The peers run with their defaults, as a user gets them (LangGraph with sync nodes on
``invoke``). pydantic-graph's default opens a tracing span per node (``auto_instrument``,
through logfire-api, even with nothing configured to receive them) and that is most of
its cost, so it is measured a second time without them (``auto_instrument=False``, and
``infer_name=False``) for reference: agentflow records spans only when an OpenTelemetry
tracer provider is set (``agentflow.tracing``), and none is set here.

    python benchmarks/bench_core.py [--runs 2000] [--repeats 7] [--fanouts 5] [--branch-io 0]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import operator
import statistics
import time
import types
from collections.abc import Callable, Sequence
from typing import Annotated, Any, TypedDict

from pydantic import BaseModel

from agentflow import END, START, Parallel, Workflow, WorkflowRunner

STEPS = 10
FANOUT = 1000
BRANCH_IO = 0.0  # seconds each fan-out branch awaits (``--branch-io``), on every side alike


# -- reporting, shared by the other benchmarks ---------------------------------------


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def pct(xs: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``xs``, nearest rank."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * len(s) + 0.5) - 1))]


@dataclasses.dataclass
class Row:
    """One line of a result table: what was measured, both sides, their ratio, the target."""

    what: str
    agentflow: str
    peer: str = ""
    ratio: str = ""
    target: str = ""
    ok: bool | None = None


def per_round(num: Sequence[float], den: Sequence[float]) -> list[float]:
    """The ratio of two interleaved series, round by round."""
    return [a / b for a, b in zip(num, den, strict=True)]


def ratio_text(ratios: Sequence[float], unit: str = "x") -> str:
    """``12.3x [11.0-13.1]``: the median ratio, lowest and highest round."""
    return f"{median(ratios):.2f}{unit} [{min(ratios):.2f}-{max(ratios):.2f}]"


def compare(
    what: str,
    af: Sequence[float],
    peer: Sequence[float],
    fmt: str,
    at_least: float | None = None,
    at_most: float | None = None,
    swap: bool = False,
    unit: str = "x",
) -> Row:
    """A row comparing two interleaved series; the ratio is ``af / peer`` round by round.

    ``swap``: the series were given peer first (the ratio is ``peer-time / agentflow-time``).
    """
    ratios = per_round(af, peer)
    a, p = (peer, af) if swap else (af, peer)
    target, ok = "", None
    if at_least is not None:
        target, ok = f">= {at_least:g}{unit}", median(ratios) >= at_least
    elif at_most is not None:
        target, ok = f"<= {at_most:g}{unit}", median(ratios) <= at_most
    return Row(what, fmt.format(median(a)), fmt.format(median(p)), ratio_text(ratios, unit), target, ok)


def print_table(title: str, rows: Sequence[Row], peer: str = "peer") -> None:
    """Print ``rows`` under ``title``; ``peer`` heads the third column."""
    head = Row("", "agentflow", peer, "ratio [min-max]", "target")
    cols = [
        max(len(getattr(r, f)) for r in [head, *rows])
        for f in ("what", "agentflow", "peer", "ratio", "target")
    ]
    print(f"\n{title}")
    for r in [head, *rows]:
        mark = "" if r.ok is None else ("  ok" if r.ok else "  MISSED")
        cells = (r.what, r.agentflow, r.peer, r.ratio, r.target)
        line = "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, cols, strict=True))
        )
        print(f"  {line}{mark}")


def rounds(repeats: int, *measures: Callable[[], float]) -> list[list[float]]:
    """Run ``measures`` one after the other, ``repeats`` times, each from a collected heap."""
    out: list[list[float]] = [[] for _ in measures]
    for _ in range(repeats):
        for i, m in enumerate(measures):
            gc.collect()
            out[i].append(m())
    return out


# -- agentflow -------------------------------------------------------------------


class Counter(BaseModel):
    n: int = 0


def _inc(i: int) -> Callable[[Any], Any]:
    nxt = f"s{i + 1}" if i + 1 < STEPS else END

    async def s(ctx: Any) -> str:
        ctx.set_state(n=ctx.state.n + 1)
        return nxt

    s.__name__ = f"s{i}"
    return s


def af_linear(**persistence: Any) -> Workflow:
    """The 10-step flow; ``persistence`` options go to ``.persistence()`` (memory without)."""
    steps = {f"s{i}": _inc(i) for i in range(1, STEPS)}
    wf = Workflow("Linear").state(Counter).flow({START: _inc(0), **steps})
    return wf.persistence(**persistence) if persistence else wf


async def work(ctx: Any) -> int:
    if BRANCH_IO:
        await asyncio.sleep(BRANCH_IO)
    return ctx.item * 2


def af_fanout() -> Workflow:
    return Workflow("FanOut").flow(
        {START: lambda ctx: Parallel.map(work, range(FANOUT), "join"), "join": lambda ctx: END}
    )


async def af_linear_rate(runs: int) -> float:
    async with WorkflowRunner(af_linear()) as runner:
        await (await runner.run()).result()  # warm up
        t = time.perf_counter()
        for _ in range(runs):
            res = await (await runner.run()).result()
        dt = time.perf_counter() - t
    assert res.state.n == STEPS, res
    return runs * STEPS / dt


async def af_fanout_ms(rounds: int) -> float:
    async with WorkflowRunner(af_fanout()) as runner:
        await (await runner.run()).result()  # warm up
        times = []
        for _ in range(rounds):
            t = time.perf_counter()
            res = await (await runner.run()).result()
            times.append(time.perf_counter() - t)
            assert list(res.step_results["work"]) == [i * 2 for i in range(FANOUT)]
    return median(times) * 1000


# -- the floor: bare asyncio --------------------------------------------------------


async def bare_work(i: int) -> int:
    if BRANCH_IO:
        await asyncio.sleep(BRANCH_IO)
    return i * 2


async def gather_ms(rounds: int) -> float:
    await asyncio.gather(*(bare_work(i) for i in range(FANOUT)))  # warm up
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        results = list(await asyncio.gather(*(bare_work(i) for i in range(FANOUT))))
        times.append(time.perf_counter() - t)
        assert results == [i * 2 for i in range(FANOUT)]
    return median(times) * 1000


# -- LangGraph ---------------------------------------------------------------------


def lg_linear(checkpointer: Any = None) -> Any:
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


def lg_fanout() -> Any:
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
    graph.invoke({"n": 0})  # warm up
    t = time.perf_counter()
    for _ in range(runs):
        out = graph.invoke({"n": 0})
    dt = time.perf_counter() - t
    assert out["n"] == STEPS
    return runs * STEPS / dt


def lg_fanout_ms(rounds: int) -> float:
    graph = lg_fanout()
    graph.invoke({"results": []})  # warm up
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        out = graph.invoke({"results": []})
        times.append(time.perf_counter() - t)
        assert len(out["results"]) == FANOUT
    return median(times) * 1000


# -- pydantic-graph (v1 API) ---------------------------------------------------------


@dataclasses.dataclass
class PGState:
    n: int = 0


def pg_linear(lean: bool = False) -> tuple[Any, type]:
    """The 10-step flow as ten ``BaseNode`` classes; returns the graph and its first node.

    ``lean``: without the tracing spans pydantic-graph opens by default.
    """
    from pydantic_graph import BaseNode, End, GraphRunContext
    from pydantic_graph.graph import Graph

    def node(i: int, nxt: type | None) -> type:
        if nxt is None:

            async def run(self: Any, ctx: Any) -> Any:
                ctx.state.n += 1
                return End(ctx.state.n)

        else:

            async def run(self: Any, ctx: Any) -> Any:
                ctx.state.n += 1
                return nxt()

        # pydantic-graph reads the edges from the return annotation of ``run``.
        run.__annotations__ = {"ctx": GraphRunContext[PGState], "return": nxt or End[int]}
        body = {"run": run, "__module__": __name__}
        return types.new_class(f"P{i}", (BaseNode[PGState, None, int],), exec_body=lambda ns: ns.update(body))

    nodes: list[type] = []
    for i in reversed(range(STEPS)):
        nodes.insert(0, node(i, nodes[0] if nodes else None))
    graph = Graph(nodes=nodes, state_type=PGState, run_end_type=int, auto_instrument=not lean)
    return graph, nodes[0]


def has_pydantic_graph_v1() -> bool:
    """Whether the installed pydantic-graph has the v1 API (2.x keeps only the builder)."""
    import importlib.util

    try:
        return importlib.util.find_spec("pydantic_graph.graph") is not None
    except ModuleNotFoundError:  # no pydantic_graph at all
        return False


async def pg_linear_rate(runs: int, lean: bool = False) -> float:
    graph, first = pg_linear(lean)
    await graph.run(first(), state=PGState(), infer_name=not lean)  # warm up
    t = time.perf_counter()
    for _ in range(runs):
        res = await graph.run(first(), state=PGState(), infer_name=not lean)
    dt = time.perf_counter() - t
    assert res.output == STEPS and res.state.n == STEPS, res
    return runs * STEPS / dt


def main() -> None:
    global BRANCH_IO
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=2000, help="agentflow linear runs per measurement")
    ap.add_argument("--repeats", type=int, default=7, help="rounds (median taken)")
    ap.add_argument("--fanouts", type=int, default=5, help="fan-outs per measurement")
    ap.add_argument("--branch-io", type=float, default=0.0, help="seconds each branch awaits (default 0)")
    args = ap.parse_args()
    BRANCH_IO = args.branch_io

    # The peers are slower: fewer runs keep each measurement about as long.
    lg_runs, pg_runs = max(20, args.runs // 10), max(20, args.runs // 4)
    measures = [lambda: asyncio.run(af_linear_rate(args.runs)), lambda: lg_linear_rate(lg_runs)]
    if has_pydantic_graph_v1():
        measures += [
            lambda: asyncio.run(pg_linear_rate(pg_runs)),
            lambda: asyncio.run(pg_linear_rate(pg_runs * 2, lean=True)),
        ]
    else:
        print(
            "pydantic-graph's v1 API (pydantic_graph.graph) is not installed: its rows are left out "
            "(pip install 'pydantic-graph>=1.0,<2', or pip install -e '.[bench]')"
        )
    af, lg, *pg = rounds(args.repeats, *measures)
    rows = [compare("vs LangGraph invoke", af, lg, "{:,.0f}", at_least=20)]
    if pg:
        rows += [
            compare("vs pydantic-graph v1 (defaults)", af, pg[0], "{:,.0f}", at_least=10),
            compare("vs pydantic-graph v1, no spans", af, pg[1], "{:,.0f}"),
        ]
    title = f"In memory: {STEPS}-step flow, state update per step, steps/s (median of {args.repeats} rounds)"
    print_table(title, rows)

    af_f, bare, lg_f = rounds(
        args.repeats,
        lambda: asyncio.run(af_fanout_ms(args.fanouts)),
        lambda: asyncio.run(gather_ms(args.fanouts)),
        lambda: lg_fanout_ms(max(2, args.fanouts // 2)),
    )
    io = f", each branch awaiting {BRANCH_IO * 1000:g} ms" if BRANCH_IO else ""
    print_table(
        f"In memory: fan-out of {FANOUT:,} branches and a join{io}, ms per fan-out "
        f"(median of {args.repeats} rounds; agentflow: the whole run)",
        [
            compare("vs bare asyncio.gather (time / floor)", af_f, bare, "{:.2f}", at_most=1.2),
            compare("vs LangGraph Send (speed-up)", lg_f, af_f, "{:.2f}", swap=True),
        ],
    )


if __name__ == "__main__":
    main()
