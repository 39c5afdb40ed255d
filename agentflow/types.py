"""The public value types: statuses and their lifecycle, runs, events, decisions, usage.

A run's status moves along one lifecycle, written down once here::

    pending ──► running ──► completed | failed | stopped
                 │   ▲
                 │   └──── paused   (pause(): the step in flight finishes first)
                 │   └──── waiting  (a gate; approve/reject/timeout moves it on)
                 └────────► waiting ──► rejected | expired   (no on_reject / on_timeout)

Final statuses are completed, failed, stopped, rejected and expired.

Everything in this module that a store persists holds JSON-able values only (or
pydantic models, which a durable store dumps to JSON); nothing names Python code.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, NamedTuple
from urllib.parse import urlsplit

__all__ = [
    "FINAL",
    "LIFECYCLE_KINDS",
    "NO_USAGE",
    "Approval",
    "Decision",
    "ParentRef",
    "RunEvent",
    "RunInfo",
    "RunResult",
    "RunStatus",
    "Usage",
    "WEBHOOK_EVENTS",
    "Webhook",
]


class RunStatus(enum.StrEnum):
    """Status of a run; a ``str`` so ``RunStatus.COMPLETED == "completed"``."""

    PENDING = "pending"
    RUNNING = "running"
    PAUSED = "paused"
    WAITING = "waiting"
    COMPLETED = "completed"
    FAILED = "failed"
    STOPPED = "stopped"
    REJECTED = "rejected"
    EXPIRED = "expired"

    @property
    def is_final(self) -> bool:
        """True for the statuses a run never leaves."""
        return self in FINAL


FINAL = frozenset(
    {RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.STOPPED, RunStatus.REJECTED, RunStatus.EXPIRED}
)

#: Event kinds the engine emits; ``ctx.emit`` may not use them (watchers rely on them).
LIFECYCLE_KINDS = frozenset(
    {
        "run_started",
        "step_started",
        "step_completed",
        "step_failed",
        "waiting",
        "decided",
        "paused",
        "resumed",
        "completed",
        "failed",
        "stopped",
        "rejected",
        "expired",
        "agent_leak",
        "agent_throttled",
        "migrated",
    }
)


def utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens an agent call (or a step, or a run) consumed, and what they cost.

    ``cost`` is in USD, from the genai-prices data for the call's provider and model;
    None when no call of it had a known price (an unknown model, a self-hosted server).
    A sum counts the calls whose price is known.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cost: Decimal | None = None

    @property
    def total_tokens(self) -> int:
        """Input plus output tokens."""
        return self.input_tokens + self.output_tokens

    def __add__(self, other: Usage) -> Usage:
        a, b = self.cost, other.cost
        cost = a if b is None else b if a is None else a + b
        return Usage(self.input_tokens + other.input_tokens, self.output_tokens + other.output_tokens, cost)

    def to_json(self) -> dict[str, Any]:
        """The stored form (a cost as a decimal string, so no cent is lost to a float)."""
        out: dict[str, Any] = {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens}
        if self.cost is not None:
            out["cost"] = str(self.cost)
        return out

    @classmethod
    def from_json(cls, data: Any) -> Usage:
        """Read the stored form back."""
        if not data:
            return cls()
        cost = data.get("cost")
        return cls(
            int(data.get("input_tokens", 0)),
            int(data.get("output_tokens", 0)),
            None if cost is None else Decimal(str(cost)),
        )


#: No tokens: what a step that made no agent call used (one shared instance).
NO_USAGE = Usage()


@dataclass(frozen=True, slots=True)
class Decision:
    """A reviewer's decision at a gate.

    Attributes:
        approved: True for approve, False for reject or timeout.
        by: who decided (None for a timeout).
        comment: the approver's comment, or the rejecting reviewer's reason.
        data: a reviewer's edit of the reviewed content (JSON-able), if any.
        at: when it was decided (UTC).
        timed_out: True when no decision came before the gate's timeout.
        approval: the id of the :class:`Approval` it decided.
        responded: True when a reviewer answered a tool call with its result
            (``runner.respond``) instead of letting the tool run; ``data`` is
            ``{"result": ...}`` then.
    """

    approved: bool
    by: str | None
    comment: str | None = None
    data: Any = None
    at: datetime = field(default_factory=lambda: datetime.now(UTC))
    timed_out: bool = False
    approval: str | None = None
    responded: bool = False

    @property
    def reason(self) -> str | None:
        """The comment, under the name a rejection usually gives it."""
        return self.comment

    def to_json(self) -> dict[str, Any]:
        """The stored form."""
        return {
            "approved": self.approved,
            "by": self.by,
            "comment": self.comment,
            "data": self.data,
            "at": self.at.timestamp(),
            "timed_out": self.timed_out,
            "approval": self.approval,
            "responded": self.responded,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Decision:
        """Read the stored form back."""
        return cls(
            approved=bool(data["approved"]),
            by=data.get("by"),
            comment=data.get("comment"),
            data=data.get("data"),
            at=utc(float(data["at"])),
            timed_out=bool(data.get("timed_out", False)),
            approval=data.get("approval"),
            responded=bool(data.get("responded", False)),
        )


def _when(value: Any) -> datetime | None:
    return None if value is None else utc(float(value))


@dataclass(frozen=True, slots=True)
class Approval:
    """A decision a run waits for: at a gate, on a tool call, or on a tool call's unknown outcome.

    Attributes:
        id: globally unique, and the same after a crash and a re-park (it is derived
            from the run, the step and its visit).
        kind: ``"gate"``, ``"tool_call"`` or ``"tool_outcome"``.
        run_id: the run that waits.
        step: the step it waits at.
        approvers: who may decide.
        quorum: how many distinct approvals it takes.
        prompt: what the reviewer is asked.
        context: JSON-able data for review (an agent's draft, a diff).
        form: the JSON schema the reviewer's ``data`` must fit, or None.
        deadline: when it times out (UTC), or None.
        votes: who approved so far (while the quorum is not met).
        created_at: when the run started waiting for it (UTC).
        agent / tool / arguments: the agent, tool and arguments of a tool call (None for
            a gate).
        workflow: the workflow of the run.
        visit: the visit of ``step`` the run waits at.
    """

    id: str
    kind: str
    run_id: str
    step: str | None
    approvers: tuple[str, ...]
    quorum: int = 1
    prompt: str | None = None
    context: Any = None
    form: dict[str, Any] | None = None
    deadline: datetime | None = None
    votes: tuple[str, ...] = ()
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    agent: str | None = None
    tool: str | None = None
    arguments: Any = None
    workflow: str = ""
    visit: int = 0

    def to_json(self) -> dict[str, Any]:
        """The stored form (what ``pending["approvals"]`` and ``Store.approvals`` hold)."""
        return {
            "id": self.id,
            "kind": self.kind,
            "run_id": self.run_id,
            "workflow": self.workflow,
            "step": self.step,
            "visit": self.visit,
            "approvers": list(self.approvers),
            "quorum": self.quorum,
            "prompt": self.prompt,
            "context": self.context,
            "form": self.form,
            "deadline": None if self.deadline is None else self.deadline.timestamp(),
            "votes": list(self.votes),
            "created_at": self.created_at.timestamp(),
            "agent": self.agent,
            "tool": self.tool,
            "arguments": self.arguments,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Approval:
        """Read the stored form back."""
        return cls(
            id=str(data["id"]),
            kind=str(data.get("kind", "gate")),
            run_id=str(data["run_id"]),
            step=data.get("step"),
            approvers=tuple(data.get("approvers") or ()),
            quorum=int(data.get("quorum", 1)),
            prompt=data.get("prompt"),
            context=data.get("context"),
            form=data.get("form"),
            deadline=_when(data.get("deadline")),
            votes=tuple(data.get("votes") or ()),
            created_at=utc(float(data.get("created_at") or 0.0)),
            agent=data.get("agent"),
            tool=data.get("tool"),
            arguments=data.get("arguments"),
            workflow=str(data.get("workflow") or ""),
            visit=int(data.get("visit") or 0),
        )


class RunEvent(NamedTuple):
    """Something that happened to a run (immutable; a named tuple, cheap to make).

    Attributes:
        kind: run_started, step_started, step_completed, step_failed, waiting, decided,
            paused, resumed, completed, failed, stopped, rejected, expired, agent_leak,
            agent_throttled (a model call waited for its agent's ``RateLimit``), migrated
            (a newer definition upgraded the run: data ``from``, ``to``, ``path``,
            ``steps``, see ``Workflow.migrate``), or the
            name given to ``ctx.emit``; ``agent_delta`` (live only, never stored:
            its ``seq`` is that of the stored event it follows).
        run_id: the run.
        step: the step it happened in, if any.
        data: JSON-able details.
        at: Unix time in seconds.
        seq: 1-based position in the run's history.
    """

    kind: str
    run_id: str
    step: str | None = None
    data: Any = None
    at: float = 0.0
    seq: int = 0

    @property
    def time(self) -> datetime:
        """``at`` as an aware UTC datetime."""
        return utc(self.at)

    def to_json(self) -> dict[str, Any]:
        """The stored form."""
        return {"kind": self.kind, "step": self.step, "data": self.data, "at": self.at, "seq": self.seq}

    @classmethod
    def from_json(cls, run_id: str, data: dict[str, Any]) -> RunEvent:
        """Read the stored form back."""
        return cls(
            kind=str(data["kind"]),
            run_id=run_id,
            step=data.get("step"),
            data=data.get("data"),
            at=float(data["at"]),
            seq=int(data["seq"]),
        )


class ParentRef(NamedTuple):
    """The run (and its step) that started a child run (``RunInfo.parent``)."""

    run_id: str
    step: str

    @classmethod
    def from_json(cls, data: Any) -> ParentRef | None:
        """Read a stored ``RunRecord.parent`` back (None for a run started on its own)."""
        if not isinstance(data, dict):
            return None
        return cls(str(data["run_id"]), str(data["step"]))


@dataclass(frozen=True, slots=True)
class RunInfo:
    """A snapshot of a run for display and control.

    Attributes:
        pending: the first of ``approvals``, or None.
        error: failure details while status is ``failed``.
        usage: tokens the run's agent calls consumed.
        decisions: every decision taken at the run's gates, oldest first.
        approvals: every approval the run waits for (its children's included, when
            read through a runner), oldest first.
        parent: the run and step that started this run, for a child run (else None).
        children: ids of the child runs this run started, oldest first.
        version: the workflow version the run is at: the one it started on, or the one
            a migration brought it to (``Workflow(..., version=...)``).
    """

    run_id: str
    workflow: str
    status: RunStatus
    step: str | None
    pending: Approval | None
    error: dict[str, Any] | None
    usage: Usage
    created_at: datetime
    updated_at: datetime
    decisions: tuple[Decision, ...] = ()
    approvals: tuple[Approval, ...] = ()
    parent: ParentRef | None = None
    children: tuple[str, ...] = ()
    version: str = "1"

    def _repr_html_(self) -> str:
        rows = [
            ("run", self.run_id),
            ("workflow", self.workflow),
            ("status", self.status.value),
            ("step", self.step or ""),
            ("version", self.version),
            ("waiting for", ", ".join(self.pending.approvers) if self.pending else ""),
            ("error", f"{self.error['type']}: {self.error['message']}" if self.error else ""),
            ("tokens", f"{self.usage.input_tokens} in / {self.usage.output_tokens} out"),
            ("updated", self.updated_at.isoformat(timespec="seconds")),
        ]
        from html import escape

        body = "".join(f"<tr><th>{k}</th><td>{escape(str(v))}</td></tr>" for k, v in rows if v != "")
        return f"<table>{body}</table>"


@dataclass(frozen=True, slots=True)
class RunResult:
    """A finished run: its status, output, final state and latest step outputs."""

    status: RunStatus
    output: Any
    state: Any
    step_results: dict[str, Any]


#: The events a :class:`Webhook` can be sent: an approval a run now waits for, and its decision.
WEBHOOK_EVENTS = ("approval_pending", "approval_decided")


@dataclass(frozen=True, slots=True)
class Webhook:
    """Where ``approval_pending`` / ``approval_decided`` are POSTed, and how they are signed.

    Each delivery is a JSON body signed with HMAC-SHA256 of ``f"{timestamp}.{body}"``
    under ``secret`` (``X-Agentflow-Signature: sha256=<hex>``, ``X-Agentflow-Timestamp``);
    ``X-Agentflow-Delivery`` is the same for every attempt of one approval's event, so a
    receiver can drop repeats. :func:`agentflow.webhooks.verify` checks one.

    Given to ``.persistence(webhooks=[...])`` or ``create_app(webhooks=[...])``, which
    reject a wrong one (see :meth:`problem`) with ``WorkflowDefinitionError``.

    Attributes:
        url: an ``http://`` or ``https://`` URL.
        secret: the shared signing secret (not empty).
        events: which of :data:`WEBHOOK_EVENTS` to send.
        timeout: seconds one attempt may take.
        attempts: attempts in all for one delivery (retried on connection errors,
            timeouts, 5xx and 429; another 4xx is not retried).
    """

    url: str
    secret: str = field(repr=False)
    events: tuple[str, ...] = WEBHOOK_EVENTS
    timeout: float = 10.0
    attempts: int = 8

    def __post_init__(self) -> None:
        if not isinstance(self.events, tuple):
            object.__setattr__(self, "events", tuple(self.events))

    def problem(self) -> str | None:
        """What is wrong with this webhook, or None when it can be used."""
        try:
            url = urlsplit(self.url) if isinstance(self.url, str) else None
        except ValueError:
            url = None
        if url is None or url.scheme not in ("http", "https") or not url.hostname:
            return f"a webhook's url must be an http:// or https:// URL, got {self.url!r}"
        if not isinstance(self.secret, str) or not self.secret:
            return f"the webhook to {self.url} needs a secret to sign its deliveries with"
        unknown = [e for e in self.events if e not in WEBHOOK_EVENTS]
        if unknown or not self.events:
            known = list(WEBHOOK_EVENTS)
            return f"the webhook to {self.url}: events must be some of {known}, got {list(self.events)}"
        if not self.timeout > 0:
            return f"the webhook to {self.url}: timeout must be positive, got {self.timeout}"
        if not isinstance(self.attempts, int) or self.attempts < 1:
            return f"the webhook to {self.url}: attempts must be at least 1, got {self.attempts}"
        return None
