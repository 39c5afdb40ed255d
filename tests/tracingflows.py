"""A workflow for the tracing tests, runnable as a subprocess that starts a run and leaves it parked.

    python tests/tracingflows.py DB_PATH RUN_ID

The process configures an OpenTelemetry SDK with an in-memory exporter, starts a run of
``Traced`` on the SQLite file ``DB_PATH``, waits until it parks at its gate, closes its
runner and prints its finished spans as one JSON line (``spans`` in the tests).
"""

from __future__ import annotations

import asyncio
import json
import sys
from decimal import Decimal
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from agentflow import END, START, Agent, HumanApproval, Next, RunStatus, Wait, Workflow, WorkflowRunner, tool
from agentflow.agents import ProviderReply, ToolUse
from agentflow.testing import ScriptedProvider
from agentflow.types import Usage


@tool
async def outline(topic: str) -> list[str]:
    """The sections a piece on ``topic`` needs."""
    return [f"why {topic}", f"how {topic}"]


def script() -> list[Any]:
    """The model's part in step Draft: one tool call, then the draft."""
    ask = ToolUse("call-1", "outline", '{"topic": "durable runs"}')
    return [
        ProviderReply("", usage=Usage(120, 12, Decimal("0.0003")), tool_calls=(ask,)),
        ProviderReply("Durable runs outlive processes.", usage=Usage(200, 30, Decimal("0.0005"))),
    ]


def traced(path: str, model: ScriptedProvider) -> Workflow:
    """Draft (an agent with a tool) → Review (a gate) → Publish."""

    async def draft(ctx: Any) -> Next:
        async with ctx.agents.writer as writer:
            run = await writer.run("Draft a line about durable runs")
        return Next("Review", output=run.text)

    return (
        Workflow("Traced")
        .flow(
            {
                START: draft,
                "Review": lambda ctx: Wait(HumanApproval(approvers=["editor"]), "Publish"),
                "Publish": lambda ctx: Next(END, output="published"),
            }
        )
        .agents({"writer": Agent(provider=model, model="gpt-4o-mini", tools=[outline])})
        .persistence(store="sqlite", path=path)
    )


def as_json(span: ReadableSpan) -> dict[str, Any]:
    """What the tests compare of a span recorded in another process."""
    ctx = span.get_span_context()
    assert ctx is not None
    return {
        "name": span.name,
        "trace_id": trace.format_trace_id(ctx.trace_id),
        "span_id": trace.format_span_id(ctx.span_id),
        "parent": trace.format_span_id(span.parent.span_id) if span.parent else None,
        "attributes": dict(span.attributes or {}),
    }


async def main(path: str, run_id: str) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    async with WorkflowRunner(traced(path, ScriptedProvider(script()))) as runner:
        handle = await runner.run(None, run_id=run_id)
        info = await handle.wait_for(RunStatus.WAITING, timeout=30)
        assert info.status == RunStatus.WAITING, info
    print(json.dumps([as_json(s) for s in exporter.get_finished_spans()]), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
