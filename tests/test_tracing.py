"""OpenTelemetry traces (agentflow.tracing), read back through the SDK's in-memory exporter:
the span tree of a flow run (segment → steps), of an agent step (chat and execute_tool
spans with the GenAI attributes), a run that parks at a gate in one process and resumes
in another (the second segment links to the first, the decision is an event), and that
with no SDK configured, or no OpenTelemetry at all, nothing is recorded and nothing fails."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from llm_server import LLMServer, Reply, ToolCall
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.test.globals_test import reset_trace_globals
from opentelemetry.trace import StatusCode
from tracingflows import script, traced

from agentflow import (
    END,
    START,
    Agent,
    HumanApproval,
    Next,
    RunStatus,
    ToolContext,
    Workflow,
    WorkflowRunner,
    tool,
    tracing,
)
from agentflow.errors import RunFailedError
from agentflow.testing import ScriptedProvider, call

TESTS = Path(__file__).parent
AGENTFLOW = "agentflow"  # the instrumentation scope of agentflow's spans


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """A global SDK tracer provider recording into memory, for one test (the globals reset after)."""
    reset_trace_globals()
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    yield exporter
    provider.shutdown()
    reset_trace_globals()


def ours(finished: tuple[ReadableSpan, ...]) -> tuple[ReadableSpan, ...]:
    """agentflow's spans (an SDK may record its own inside them: anthropic's does)."""
    return tuple(
        s for s in finished if s.instrumentation_scope and s.instrumentation_scope.name == "agentflow"
    )


def tree(finished: tuple[ReadableSpan, ...]) -> list[str]:
    """agentflow's spans as an indented outline, children under their parent, in the order they started."""
    finished = ours(finished)
    ids = {s.context.span_id for s in finished}
    kids: dict[int | None, list[ReadableSpan]] = {}
    for s in sorted(finished, key=lambda s: s.start_time or 0):
        parent = s.parent.span_id if s.parent is not None and s.parent.span_id in ids else None
        kids.setdefault(parent, []).append(s)
    out: list[str] = []

    def walk(parent: int | None, depth: int) -> None:
        for s in kids.get(parent, []):
            out.append("  " * depth + s.name)
            walk(s.context.span_id, depth + 1)

    walk(None, 0)
    return out


def named(finished: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return sorted((s for s in finished if s.name == name), key=lambda s: s.start_time or 0)


def counting_flow() -> Workflow:
    async def add(ctx: Any) -> str:
        return "Check"

    def check(ctx: Any) -> Next:
        return Next(END, output={"ok": True})

    return Workflow("Count").flow({START: lambda ctx: "Add", "Add": add, "Check": check})


async def test_a_flow_run_is_one_segment_span_with_a_span_per_step(spans: InMemorySpanExporter) -> None:
    async with WorkflowRunner(counting_flow()) as runner:
        handle = await runner.run()
        result = await handle.result(timeout=10)
    assert result.status == RunStatus.COMPLETED
    finished = spans.get_finished_spans()
    assert tree(finished) == ["invoke_workflow Count", "  __start__", "  Add", "  Check"]
    (seg,) = named(finished, "invoke_workflow Count")
    assert dict(seg.attributes or {}) == {
        "gen_ai.operation.name": "invoke_workflow",
        "gen_ai.workflow.name": "Count",
        "agentflow.run.id": handle.run_id,
        "agentflow.workflow.version": "1",
        "agentflow.segment": 1,
        "agentflow.run.status": "completed",
    }
    assert seg.links == () and seg.status.status_code is StatusCode.UNSET
    steps = {s.name: dict(s.attributes or {}) for s in finished if s is not seg}
    assert steps["Add"] == {
        "agentflow.step.visit": 2,
        "agentflow.step.attempt": 1,
        "agentflow.step.outcome": "next",
        "agentflow.step.target": "Check",
    }
    assert steps["Check"]["agentflow.step.outcome"] == "end"
    # Every span of the run is in one trace, and the steps ended before their segment.
    assert {s.context.trace_id for s in finished} == {seg.context.trace_id}
    assert all((s.end_time or 0) <= (seg.end_time or 0) for s in finished)


async def test_imperative_steps_and_child_runs_nest_under_what_started_them(
    spans: InMemorySpanExporter,
) -> None:
    child = Workflow("Child").flow({START: lambda ctx: "Work", "Work": lambda ctx: Next(END, output=2)})

    async def main(ctx: Any) -> int:
        one = await ctx.step("fetch", lambda: 1)
        two = await ctx.run(child)
        return int(one + two)

    async with WorkflowRunner(Workflow("Parent").execute(main)) as runner:
        result = await (await runner.run()).result(timeout=10)
    assert result.output == 3
    finished = spans.get_finished_spans()
    assert tree(finished)[:2] == ["invoke_workflow Parent", "  fetch"]
    (fetch,) = named(finished, "fetch")
    assert fetch.attributes is not None and fetch.attributes["agentflow.step.outcome"] == "done"
    # The child's first segment is a child of the parent's segment: one trace for both.
    (parent, *_), (first_child, *_) = (
        named(finished, "invoke_workflow Parent"),
        named(finished, "invoke_workflow Child"),
    )
    assert first_child.parent is not None and first_child.context.trace_id == parent.context.trace_id


async def test_a_failing_step_fails_its_span_and_the_segment(spans: InMemorySpanExporter) -> None:
    def boom(ctx: Any) -> str:
        raise ValueError("the draft is empty")

    wf = Workflow("Fails").flow({START: lambda ctx: "Boom", "Boom": boom})
    async with WorkflowRunner(wf) as runner:
        with pytest.raises(RunFailedError, match="the draft is empty"):
            await (await runner.run()).result(timeout=10)
    finished = spans.get_finished_spans()
    (step,) = named(finished, "Boom")
    (seg,) = named(finished, "invoke_workflow Fails")
    assert step.attributes is not None and step.attributes["agentflow.step.outcome"] == "failed"
    assert step.status.status_code is StatusCode.ERROR
    assert [e.attributes["exception.type"] for e in step.events if e.attributes] == ["ValueError"]
    assert seg.status.status_code is StatusCode.ERROR and seg.attributes is not None
    assert seg.attributes["error.type"] == "ValueError" and seg.attributes["agentflow.run.status"] == "failed"


async def test_an_agent_step_has_chat_and_execute_tool_spans_with_the_genai_attributes(
    spans: InMemorySpanExporter, tmp_path: Path
) -> None:
    wf = traced(str(tmp_path / "agent.db"), ScriptedProvider(script()))
    async with WorkflowRunner(wf) as runner:
        handle = await runner.run()
        info = await handle.wait_for(RunStatus.WAITING, timeout=10)
    assert info.status == RunStatus.WAITING
    finished = spans.get_finished_spans()
    assert tree(finished) == [
        "invoke_workflow Traced",
        "  __start__",
        "    chat gpt-4o-mini",
        "    execute_tool outline",
        "    chat gpt-4o-mini",
        "  Review",
    ]
    first, second = named(finished, "chat gpt-4o-mini")
    assert dict(first.attributes or {}) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "scripted",
        "gen_ai.request.model": "gpt-4o-mini",
        "gen_ai.agent.name": "writer",
        "gen_ai.usage.input_tokens": 120,
        "gen_ai.usage.output_tokens": 12,
        "agentflow.usage.cost": 0.0003,
    }
    assert second.attributes is not None and second.attributes["gen_ai.usage.output_tokens"] == 30
    (call_span,) = named(finished, "execute_tool outline")
    assert dict(call_span.attributes or {}) == {
        "gen_ai.operation.name": "execute_tool",
        "gen_ai.tool.name": "outline",
        "gen_ai.tool.call.id": "call-1",
        "gen_ai.tool.type": "function",
        "agentflow.tool.idempotent": False,
        "agentflow.replayed": False,
    }
    # The tool ran between the model call that asked for it and the one that read its result.
    assert (first.end_time or 0) <= (call_span.start_time or 0) <= (second.start_time or 0)
    (review,) = named(finished, "Review")
    assert review.attributes is not None and review.attributes["agentflow.step.outcome"] == "wait"


@tool(approval=HumanApproval(approvers=["ops-lead"]))
async def deploy(ctx: ToolContext, version: str) -> dict[str, str]:
    """Deploy a version."""
    return {"deployed": version}


@tool(idempotent=True)
async def blockers(repo: str) -> list[str]:
    """Open blockers of a repository."""
    if repo == "broken":
        raise ConnectionError("the tracker is down")
    return []


async def test_a_step_run_again_after_a_tool_approval_marks_what_came_from_the_journal(
    spans: InMemorySpanExporter,
) -> None:
    model = ScriptedProvider(
        [[call("blockers", repo="broken"), call("deploy", version="1.2")], "Shipped 1.2."]
    )

    async def ship(ctx: Any) -> Next:
        async with ctx.agents.ops as ops:
            run = await ops.run("Ship 1.2")
        return Next(END, output=run.text)

    wf = (
        Workflow("Ship")
        .flow({START: ship})
        .agents({"ops": Agent(provider=model, model="m", tools=[blockers, deploy])})
    )
    async with WorkflowRunner(wf) as runner:
        handle = await runner.run()
        await handle.wait_for(RunStatus.WAITING, timeout=10)
        await runner.approve(handle.run_id, by="ops-lead")
        result = await (await runner.attach(handle.run_id)).result(timeout=10)
    assert result.output == "Shipped 1.2."
    finished = spans.get_finished_spans()
    assert tree(finished) == [
        "invoke_workflow Ship",
        "  __start__",
        "    chat m",
        "    execute_tool blockers",
        "invoke_workflow Ship",
        "  __start__",
        "    chat m",
        "    execute_tool blockers",
        "    execute_tool deploy",
        "    chat m",
    ]
    one, two = named(finished, "invoke_workflow Ship")
    assert one.attributes is not None and one.attributes["agentflow.run.status"] == "waiting"
    parked, done = named(finished, "__start__")  # the step parked on the call's approval, then ended
    assert parked.attributes is not None and parked.attributes["agentflow.step.outcome"] == "wait"
    assert done.attributes is not None and done.attributes["agentflow.step.outcome"] == "end"
    assert two.attributes is not None and two.attributes["agentflow.segment"] == 2
    assert [link.context.span_id for link in two.links] == [one.context.span_id]
    (decision,) = two.events
    assert decision.name == "agentflow.decision" and decision.attributes is not None
    assert decision.attributes["agentflow.decision.by"] == "ops-lead"
    assert decision.attributes["agentflow.decision.outcome"] == "approved"
    chats = named(finished, "chat m")
    assert [(c.attributes or {}).get("agentflow.replayed", False) for c in chats] == [False, True, False]
    assert "gen_ai.usage.input_tokens" not in (chats[1].attributes or {})  # a replay cost nothing
    first_try, replayed = named(finished, "execute_tool blockers")
    assert first_try.status.status_code is StatusCode.ERROR
    assert first_try.attributes is not None and first_try.attributes["error.type"] == "ConnectionError"
    assert replayed.attributes is not None and replayed.attributes["agentflow.replayed"] is True
    (ran,) = named(finished, "execute_tool deploy")
    assert ran.attributes is not None and ran.attributes["agentflow.replayed"] is False


async def test_a_run_parked_in_one_process_resumes_in_another_linked_to_its_first_segment(
    spans: InMemorySpanExporter, tmp_path: Path
) -> None:
    db = tmp_path / "runs.db"
    run_id = "traced-run-1"
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, str(TESTS / "tracingflows.py"), str(db), run_id],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(TESTS)},
    )
    assert proc.returncode == 0, proc.stderr
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    (first,) = [s for s in theirs if s["name"] == "invoke_workflow Traced"]
    assert first["attributes"]["agentflow.segment"] == 1
    assert first["attributes"]["agentflow.run.status"] == "waiting"
    assert {s["name"] for s in theirs if s["parent"] == first["span_id"]} == {"__start__", "Review"}

    async with WorkflowRunner(traced(str(db), ScriptedProvider())) as runner:
        await runner.approve(run_id, by="editor", comment="ship it")
        result = await (await runner.attach(run_id)).result(timeout=10)
    assert result.status == RunStatus.COMPLETED and result.output == "published"
    finished = spans.get_finished_spans()
    assert tree(finished) == ["invoke_workflow Traced", "  Publish"]
    (second,) = named(finished, "invoke_workflow Traced")
    assert second.attributes is not None
    assert second.attributes["agentflow.segment"] == 2 and second.attributes["agentflow.run.id"] == run_id
    (link,) = second.links
    assert trace.format_trace_id(link.context.trace_id) == first["trace_id"]
    assert trace.format_span_id(link.context.span_id) == first["span_id"]
    assert link.attributes is not None and link.attributes["agentflow.link"] == "previous_segment"
    (decision,) = second.events
    assert decision.attributes is not None
    assert decision.attributes["agentflow.decision.by"] == "editor"
    assert decision.attributes["agentflow.decision.outcome"] == "approved"
    assert decision.attributes["agentflow.step"] == "Review"
    waited = decision.attributes["agentflow.decision.waited_s"]
    assert isinstance(waited, float) and 0 <= waited < 60


async def test_a_rejection_that_ends_the_run_is_a_segment_of_its_own_with_the_decision(
    spans: InMemorySpanExporter, tmp_path: Path
) -> None:
    wf = traced(str(tmp_path / "rejected.db"), ScriptedProvider(script()))
    async with WorkflowRunner(wf) as runner:
        handle = await runner.run()
        await handle.wait_for(RunStatus.WAITING, timeout=10)
        await runner.reject(handle.run_id, by="editor", reason="off topic")
        info = await handle.wait_for(RunStatus.REJECTED, timeout=10)
    assert info.status == RunStatus.REJECTED
    finished = spans.get_finished_spans()
    one, two = named(finished, "invoke_workflow Traced")
    assert tree(finished)[-1] == "invoke_workflow Traced"  # the second did no work: no child span
    assert two.attributes is not None and two.attributes["agentflow.run.status"] == "rejected"
    assert two.attributes["agentflow.segment"] == 2
    assert [link.context.span_id for link in two.links] == [one.context.span_id]
    (decision,) = two.events
    assert decision.attributes is not None and decision.attributes["agentflow.decision.outcome"] == "rejected"


async def test_with_no_sdk_configured_nothing_is_recorded_and_runs_go_on(tmp_path: Path) -> None:
    reset_trace_globals()  # the API's default: a proxy provider, no SDK behind it
    assert tracing.tracer() is None
    wf = traced(str(tmp_path / "plain.db"), ScriptedProvider(script()))
    async with WorkflowRunner(wf) as runner:
        handle = await runner.run()
        await handle.wait_for(RunStatus.WAITING, timeout=10)
        await runner.approve(handle.run_id, by="editor")
        result = await (await runner.attach(handle.run_id)).result(timeout=10)
        loaded = await runner.store.load(handle.run_id)
    assert result.output == "published"
    assert loaded is not None and tracing.JOURNAL_KEY not in loaded.journal  # no span context kept
    # A provider set afterwards sees nothing of the run: no span was recorded before.
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    try:
        assert exporter.get_finished_spans() == ()
    finally:
        provider.shutdown()
        reset_trace_globals()


def test_without_opentelemetry_installed_agentflow_imports_and_runs() -> None:
    code = """
import asyncio, sys
sys.modules["opentelemetry"] = None  # as if the package were not installed: importing it fails
from agentflow import END, START, Next, Workflow, WorkflowRunner, tracing
assert tracing.tracer() is None
wf = Workflow("Plain").flow({START: lambda ctx: "Done", "Done": lambda ctx: Next(END, output=1)})
async def main():
    async with WorkflowRunner(wf) as runner:
        print((await (await runner.run()).result(timeout=10)).output)
asyncio.run(main())
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "1"


def test_a_program_that_does_not_trace_never_loads_opentelemetry() -> None:
    # Importing the API takes a few hundred milliseconds; a run need not pay for it.
    code = """
import asyncio, sys
from agentflow import END, START, Agent, Next, Workflow, WorkflowRunner
from agentflow.testing import ScriptedProvider
async def ask(ctx):
    async with ctx.agents.writer as writer:
        return Next(END, output=(await writer.send("hi")).text)
writer = Agent(provider=ScriptedProvider(["hello"]), model="m")
wf = Workflow("Plain").flow({START: ask}).agents({"writer": writer})
async def main():
    async with WorkflowRunner(wf) as runner:
        print((await (await runner.run()).result(timeout=10)).output)
asyncio.run(main())
print(sorted(m for m in sys.modules if m.startswith("opentelemetry")))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["hello", "[]"]


def test_a_damaged_span_context_in_the_journal_starts_an_unlinked_segment(
    spans: InMemorySpanExporter,
) -> None:
    class Spec:
        name, version = "Damaged", None

    for stored in ({"trace_id": "zz", "span_id": "01"}, {"segment": 3}, "not a dict"):
        seg = tracing.segment("r1", Spec(), {tracing.JOURNAL_KEY: stored}, ())
        assert seg is not None
        seg.end("waiting")
    finished = spans.get_finished_spans()
    assert [s.links for s in finished] == [(), (), ()]
    assert [(s.attributes or {})["agentflow.segment"] for s in finished] == [1, 4, 1]


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_model_calls_through_the_real_sdks_are_chat_spans_named_by_their_provider(
    kind: str, llm_env: LLMServer, spans: InMemorySpanExporter
) -> None:
    llm_env.script(
        Reply(
            tool_calls=[ToolCall("blockers", {"repo": "acme/app"}, id="c1")], input_tokens=50, output_tokens=7
        ),
        Reply(text="No blockers.", input_tokens=80, output_tokens=4),
        Reply(text="Shipping 1.2 now.", input_tokens=20, output_tokens=5),
    )

    async def ship(ctx: Any) -> Next:
        async with ctx.agents.ops as ops:
            run = await ops.run("Any blockers?")
        async with ctx.agents.notes as notes:  # streamed: a chat span around a generator
            said = [delta async for delta in notes.stream("Announce it")]
        return Next(END, output=[run.text, "".join(said)])

    agents = {
        "ops": Agent(provider=kind, model="gpt-4o-mini", tools=[blockers]),
        "notes": Agent(provider=kind, model="gpt-4o-mini"),
    }
    wf = Workflow(f"Real{kind}").flow({START: ship}).agents(agents)
    async with WorkflowRunner(wf) as runner:
        result = await (await runner.run()).result(timeout=20)
    assert result.output == ["No blockers.", "Shipping 1.2 now."]
    finished = spans.get_finished_spans()
    assert tree(finished) == [
        f"invoke_workflow Real{kind}",
        "  __start__",
        "    chat gpt-4o-mini",
        "    execute_tool blockers",
        "    chat gpt-4o-mini",
        "    chat gpt-4o-mini",
    ]
    chats = [dict(s.attributes or {}) for s in named(finished, "chat gpt-4o-mini")]
    assert {c["gen_ai.provider.name"] for c in chats} == {kind}
    assert [c["gen_ai.response.model"] for c in chats] == ["gpt-4o-mini"] * 3  # as the server said
    assert [
        (c["gen_ai.agent.name"], c["gen_ai.usage.input_tokens"], c["gen_ai.usage.output_tokens"])
        for c in chats
    ] == [
        ("ops", 50, 7),
        ("ops", 80, 4),
        ("notes", 20, 5),
    ]
    # The local server is not the hosted model: no price is known, so no cost is claimed.
    assert all("agentflow.usage.cost" not in c for c in chats)
    # A chat span is current while the call runs, so an SDK's own spans (anthropic's) nest
    # under it; a streamed call's span is not current (its generator yields inside it).
    chat_ids = [s.context.span_id for s in named(finished, "chat gpt-4o-mini")]
    (step,) = named(finished, "__start__")
    parents = [s.parent.span_id if s.parent else None for s in finished if s not in ours(finished)]
    assert set(parents) <= {*chat_ids[:2], step.context.span_id}
