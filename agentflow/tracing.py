"""OpenTelemetry spans of runs, steps, model calls and tool calls.

agentflow records through ``opentelemetry-api`` (the ``otel`` extra) into whatever
tracer provider the application configured (``opentelemetry.trace.set_tracer_provider``,
or ``OTEL_PYTHON_TRACER_PROVIDER`` set before agentflow is imported). Zero cost when
tracing is off: agentflow never imports OpenTelemetry itself (the API takes a few hundred
milliseconds to import); a program that did not import it, or set a provider, is not
traced, and pays one dictionary look-up per run segment and per model or tool call.
With the API loaded but no SDK provider set, nothing is recorded either.

What is recorded (span names follow the GenAI semantic conventions, ``{operation} {target}``):

* ``invoke_workflow {workflow}``, one per *segment* of a run: from the moment a process
  starts advancing it until it parks at a gate, pauses, ends, fails or is let go of.
  Attributes: ``gen_ai.operation.name="invoke_workflow"``, ``gen_ai.workflow.name``,
  ``agentflow.run.id``, ``agentflow.workflow.version`` (when the workflow has one),
  ``agentflow.segment`` (1, 2, ... across the run's life) and, at its end,
  ``agentflow.run.status`` (where the segment left the run). A failed run's segment
  has an error status and ``error.type``.
* one span per step, named by the step, a child of its segment: ``agentflow.step.visit``,
  ``agentflow.step.attempt``, ``agentflow.step.outcome`` (``next``, ``end``, ``wait``,
  ``parallel``, ``run``; ``done`` for an imperative ``ctx.step``; ``failed``; ``wait``
  too for a step parked from inside, as on a tool call's approval; ``interrupted`` when
  the segment ended in the middle of it) and
  ``agentflow.step.target`` when the step named where the run goes.
* ``chat {model}`` per model call, a child of its step: ``gen_ai.operation.name="chat"``,
  ``gen_ai.provider.name``, ``gen_ai.request.model``, ``gen_ai.response.model`` (when
  the provider says which answered), ``gen_ai.agent.name``,
  ``gen_ai.usage.input_tokens``, ``gen_ai.usage.output_tokens`` and
  ``agentflow.usage.cost`` (USD, when the model's price is known). A call answered
  from the journal (a step that ran again) has ``agentflow.replayed=True`` and no usage:
  it cost nothing this time.
* ``execute_tool {tool}`` per tool call: ``gen_ai.operation.name="execute_tool"``,
  ``gen_ai.tool.name``, ``gen_ai.tool.call.id``, ``gen_ai.tool.type="function"``,
  ``agentflow.tool.idempotent`` and ``agentflow.replayed`` (its result came from the
  journal: the tool did not run). A tool's exception sets an error status.
* an event ``agentflow.decision`` on the segment that a decision resumed, one per
  decision made while the run was parked: ``agentflow.decision.by`` (absent for a
  timeout), ``agentflow.decision.outcome`` (``approved``, ``rejected``, ``responded``,
  ``timed_out``), ``agentflow.decision.waited_s`` (seconds from the park to the
  decision), ``agentflow.approval.id`` and ``agentflow.step``. A decision that ends the
  run there (a rejection, or a gate whose target is the end) gets a segment span of its
  own in the process that made it, with no step in it.

Model and tool calls are traced inside a traced segment only (the check is one context
variable read); an agent used outside any run (``AgentPools`` on its own) records none.

Segments across parked gaps: a segment's span is a child of whatever span was current
where the run was started or resumed (the request that started it, or that decided its
gate), so each segment lives in the trace of what caused it; it carries a link to the
segment before it (``agentflow.link="previous_segment"``). The link survives processes:
a segment that lets go of its run writes its trace and span id under the run's journal
key ``"trace"`` in its last commit, and the next segment, in whichever process, reads
it back. Find all the segments of a run by ``agentflow.run.id``, or follow the links.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry import context as otel_context
    from opentelemetry import trace as otel
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, Tracer

    from .types import Usage

__all__ = [
    "JOURNAL_KEY",
    "Segment",
    "StepSpan",
    "chat",
    "current",
    "end_chat",
    "ended_by_decision",
    "replayed_chat",
    "replayed_tool",
    "seal",
    "segment",
    "ToolSpan",
    "tool",
    "tracer",
]

#: The journal key under which a segment leaves its span context for the next one.
JOURNAL_KEY = "trace"

#: The API's variable naming a tracer provider to load (configuration without code), read
#: once: looking it up raises and catches a KeyError, too dear for every run.
_PROVIDER_NAMED = "OTEL_PYTHON_TRACER_PROVIDER" in os.environ

if not TYPE_CHECKING:
    # Loaded by tracer() once the application has loaded them: importing the API takes a
    # few hundred milliseconds, which a program that does not trace should not pay.
    otel = otel_context = None

_NULL: AbstractContextManager[None] = nullcontext()
_cached: tuple[object, Tracer] | None = None
_SEGMENT: ContextVar[Segment | None] = ContextVar("agentflow_trace_segment", default=None)


def tracer() -> Tracer | None:
    """The tracer agentflow records with; None when OpenTelemetry is absent or has no provider set."""
    global _cached, otel, otel_context
    # Only code that imported the API can have set a provider (or the API's variable names one).
    if "opentelemetry.trace" not in sys.modules and not _PROVIDER_NAMED:
        return None
    try:
        from opentelemetry import trace as api
    except ImportError:  # the optional dependency is not installed: tracing is off
        return None
    provider = api.get_tracer_provider()
    if isinstance(provider, api.ProxyTracerProvider | api.NoOpTracerProvider):
        return None
    if otel_context is None:
        from opentelemetry import context as otel_context

        otel = api
    cached = _cached
    if cached is not None and cached[0] is provider:
        return cached[1]
    got = provider.get_tracer("agentflow")
    _cached = (provider, got)
    return got


#: The segment the calling task advances when it is traced, else None: the one cheap
#: check (a context variable read, no Python call) that guards every traced path.
current = _SEGMENT.get


class StepSpan:
    """The span of one step, current (the parent of its model and tool calls) until it ends."""

    __slots__ = ("_token", "attempt", "span")

    def __init__(self, span: Span, attempt: int) -> None:
        self.span = span
        self.attempt = attempt
        self._token: Token[Context] | None = otel_context.attach(otel.set_span_in_context(span))

    def end(
        self,
        outcome: str,
        attempt: int | None = None,
        target: str | None = None,
        error: BaseException | None = None,
    ) -> None:
        """End the span with the step's ``outcome`` (once; later calls do nothing)."""
        token = self._token
        if token is None:
            return
        self._token = None
        span = self.span
        span.set_attribute("agentflow.step.outcome", outcome)
        if attempt is not None and attempt != self.attempt:
            span.set_attribute("agentflow.step.attempt", attempt)
        if target is not None:
            span.set_attribute("agentflow.step.target", target)
        if error is not None:
            _failed(span, error)
        otel_context.detach(token)
        span.end()


class Segment:
    """The ``invoke_workflow`` span of one run segment in this process."""

    __slots__ = ("_seg_token", "_step", "_token", "_tracer", "decisions", "number", "run_id", "span")

    def __init__(self, t: Tracer, span: Span, run_id: str, number: int, decisions: int) -> None:
        self._tracer = t
        self.span = span
        self.run_id = run_id
        self.number = number
        self.decisions = decisions
        self._step: StepSpan | None = None
        self._token: Token[Context] = otel_context.attach(otel.set_span_in_context(span))
        self._seg_token = _SEGMENT.set(self)

    def step(self, name: str, visit: int, attempt: int) -> StepSpan:
        """Start the span of step ``name``; the caller ends it, or :meth:`end` does if it cannot."""
        attributes = {"agentflow.step.visit": visit, "agentflow.step.attempt": attempt}
        self._step = StepSpan(self._tracer.start_span(name, attributes=attributes), attempt)
        return self._step

    def end(self, status: str, error: BaseException | None = None) -> None:
        """End the segment where it left the run (``status``: the run's status value)."""
        if self._step is not None:  # the step parked the run (a tool call's approval), or was cut off
            self._step.end("wait" if status == "waiting" else "interrupted")
            self._step = None
        span = self.span
        span.set_attribute("agentflow.run.status", status)
        if error is not None:
            _failed(span, error)
        _SEGMENT.reset(self._seg_token)
        otel_context.detach(self._token)
        span.end()


def segment(run_id: str, spec: Any, journal: Mapping[str, Any], decisions: Sequence[Any]) -> Segment | None:
    """Start the segment span of a run this task begins to advance; None when tracing is off.

    ``spec`` is the workflow's (its ``name``, and ``version`` when it has one),
    ``journal`` the run's (its :data:`JOURNAL_KEY` entry holds the last segment's span
    context), ``decisions`` the run's decisions as stored (JSON, oldest first): those
    made since the last segment become events of this one.
    """
    t = tracer()
    if t is None:
        return None
    span, number = _segment_span(t, run_id, spec, journal, decisions)
    return Segment(t, span, run_id, number, len(decisions))


def ended_by_decision(
    run_id: str, spec: Any, journal: Mapping[str, Any], decisions: Sequence[Any], status: str
) -> None:
    """A decision ended a parked run (a rejection, say) where it was made: a segment of no work.

    Its span carries the decision events and the link to the segment before, as a
    segment that resumed would, and ``agentflow.run.status`` where the decision left it.
    """
    t = tracer()
    if t is None:
        return
    span, _ = _segment_span(t, run_id, spec, journal, decisions)
    span.set_attribute("agentflow.run.status", status)
    span.end()


def _segment_span(
    t: Tracer, run_id: str, spec: Any, journal: Mapping[str, Any], decisions: Sequence[Any]
) -> tuple[Span, int]:
    workflow, version, previous = spec.name, getattr(spec, "version", None), journal.get(JOURNAL_KEY)
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": "invoke_workflow",
        "gen_ai.workflow.name": workflow,
        "agentflow.run.id": run_id,
    }
    if version is not None:
        attributes["agentflow.workflow.version"] = str(version)
    links = []
    number, seen, parked_at = 1, len(decisions), None
    if isinstance(previous, dict):
        number = int(previous.get("segment") or 0) + 1
        seen = int(previous.get("decisions") or 0)
        parked_at = previous.get("at")
        linked = _span_context(previous)
        if linked is not None:
            links.append(otel.Link(linked, {"agentflow.link": "previous_segment"}))
    attributes["agentflow.segment"] = number
    span = t.start_span(f"invoke_workflow {workflow}", attributes=attributes, links=links)
    for d in decisions[seen:]:
        if isinstance(d, dict):
            span.add_event("agentflow.decision", _decision(d, parked_at))
    return span, number


def seal(run_id: str, journal: dict[str, Any]) -> dict[str, Any]:
    """``journal`` (a commit's entries) with this segment's span context, for the next segment.

    Called on the commit that lets go of ``run_id``; returns ``journal`` unchanged when
    the run's segment is not traced here.
    """
    seg = _SEGMENT.get()
    if seg is None or seg.run_id != run_id:
        return journal
    ctx = seg.span.get_span_context()
    entry = {
        "trace_id": otel.format_trace_id(ctx.trace_id),
        "span_id": otel.format_span_id(ctx.span_id),
        "segment": seg.number,
        "decisions": seg.decisions,
        "at": time.time(),
    }
    return {**journal, JOURNAL_KEY: entry}


# -- agents -------------------------------------------------------------------


def chat(provider: str, model: str, agent: str, current: bool = True) -> AbstractContextManager[Span | None]:
    """The ``chat`` span of one model call in a traced segment (else a no-op context).

    ``current``: the span is the current one while the call runs (the parent of an
    HTTP client's spans); an async generator that yields inside it passes False.
    """
    seg = _SEGMENT.get()
    if seg is None:
        return _NULL
    t = seg._tracer
    attributes = _chat_attributes(provider, model, agent)
    if not current:
        return t.start_span(f"chat {model}", attributes=attributes)
    return _current(t, f"chat {model}", attributes)


def end_chat(span: Span | None, usage: Usage, model: str | None = None) -> None:
    """Record what a model call consumed, and the ``model`` that answered, on its span (when there is one)."""
    if span is None:
        return
    if model:
        span.set_attribute("gen_ai.response.model", model)
    span.set_attribute("gen_ai.usage.input_tokens", usage.input_tokens)
    span.set_attribute("gen_ai.usage.output_tokens", usage.output_tokens)
    if usage.cost is not None:
        span.set_attribute("agentflow.usage.cost", float(usage.cost))


def replayed_chat(provider: str, model: str, agent: str) -> None:
    """A model call answered from the journal: a span that says so."""
    seg = _SEGMENT.get()
    if seg is None:
        return
    t = seg._tracer
    attributes = _chat_attributes(provider, model, agent)
    attributes["agentflow.replayed"] = True
    t.start_span(f"chat {model}", attributes=attributes).end()


class ToolSpan:
    """The ``execute_tool`` span of one tool call, current (the parent of what the tool does) till it ends."""

    __slots__ = ("_token", "span")

    def __init__(self, span: Span) -> None:
        self.span = span
        self._token = otel_context.attach(otel.set_span_in_context(span))

    def end(self, error: str | None = None) -> None:
        """End the span; ``error`` (``"Type: message"``) when the call failed."""
        span = self.span
        if error is not None:
            span.set_attribute("error.type", error.split(":", 1)[0])
            span.set_status(otel.Status(otel.StatusCode.ERROR, error))
        otel_context.detach(self._token)
        span.end()


def tool(name: str, call_id: str, idempotent: bool) -> ToolSpan | None:
    """Start the ``execute_tool`` span of one tool call; None outside a traced segment."""
    seg = _SEGMENT.get()
    if seg is None:
        return None
    attributes = _tool_attributes(name, call_id, idempotent)
    attributes["agentflow.replayed"] = False
    return ToolSpan(seg._tracer.start_span(f"execute_tool {name}", attributes=attributes))


def replayed_tool(name: str, call_id: str, idempotent: bool) -> None:
    """A tool call whose result came from the journal (the tool did not run): a span that says so."""
    seg = _SEGMENT.get()
    if seg is None:
        return
    t = seg._tracer
    attributes = _tool_attributes(name, call_id, idempotent)
    attributes["agentflow.replayed"] = True
    t.start_span(f"execute_tool {name}", attributes=attributes).end()


# -- helpers ------------------------------------------------------------------


@contextmanager
def _current(t: Tracer, name: str, attributes: dict[str, Any]) -> Iterator[Span]:
    with t.start_as_current_span(name, attributes=attributes, record_exception=True) as span:
        yield span


def _chat_attributes(provider: str, model: str, agent: str) -> dict[str, Any]:
    return {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": provider,
        "gen_ai.request.model": model,
        "gen_ai.agent.name": agent,
    }


def _tool_attributes(name: str, call_id: str, idempotent: bool) -> dict[str, Any]:
    return {
        "gen_ai.operation.name": "execute_tool",
        "gen_ai.tool.name": name,
        "gen_ai.tool.call.id": call_id,
        "gen_ai.tool.type": "function",
        "agentflow.tool.idempotent": idempotent,
    }


def _failed(span: Span, error: BaseException) -> None:
    span.record_exception(error)
    span.set_attribute("error.type", type(error).__name__)
    span.set_status(otel.Status(otel.StatusCode.ERROR, f"{type(error).__name__}: {error}"))


def _span_context(stored: dict[str, Any]) -> Any:
    """The stored span context of a segment, or None when it is missing or damaged."""
    try:
        trace_id, span_id = int(stored["trace_id"], 16), int(stored["span_id"], 16)
    except (KeyError, TypeError, ValueError):
        return None
    ctx = otel.SpanContext(
        trace_id, span_id, is_remote=True, trace_flags=otel.TraceFlags(otel.TraceFlags.SAMPLED)
    )
    return ctx if ctx.is_valid else None


def _decision(d: dict[str, Any], parked_at: Any) -> dict[str, Any]:
    if d.get("timed_out"):
        outcome = "timed_out"
    elif d.get("responded"):
        outcome = "responded"
    else:
        outcome = "approved" if d.get("approved") else "rejected"
    attributes: dict[str, Any] = {"agentflow.decision.outcome": outcome}
    if d.get("by") is not None:
        attributes["agentflow.decision.by"] = str(d["by"])
    for key, name in (("approval", "agentflow.approval.id"), ("step", "agentflow.step")):
        if d.get(key) is not None:
            attributes[name] = str(d[key])
    at = d.get("at")
    if isinstance(at, int | float) and isinstance(parked_at, int | float):
        attributes["agentflow.decision.waited_s"] = round(max(0.0, at - parked_at), 3)
    return attributes
