"""Records: the run lifecycle and the shapes that cross the store boundary.

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
from typing import Any, NamedTuple

__all__ = [
    "FINAL",
    "Commit",
    "Decision",
    "OutputRecord",
    "RunEvent",
    "RunInfo",
    "RunRecord",
    "RunResult",
    "RunStatus",
    "Usage",
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


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens an agent call (or a step, or a run) consumed."""

    input_tokens: int = 0
    output_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        """Input plus output tokens."""
        return self.input_tokens + self.output_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.input_tokens + other.input_tokens, self.output_tokens + other.output_tokens)

    def to_json(self) -> dict[str, int]:
        """The stored form."""
        return {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens}

    @classmethod
    def from_json(cls, data: Any) -> Usage:
        """Read the stored form back."""
        if not data:
            return cls()
        return cls(int(data.get("input_tokens", 0)), int(data.get("output_tokens", 0)))


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
    """

    approved: bool
    by: str | None
    comment: str | None = None
    data: Any = None
    at: datetime = field(default_factory=lambda: datetime.now(UTC))
    timed_out: bool = False

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
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Decision:
        """Read the stored form back."""
        return cls(
            approved=bool(data["approved"]),
            by=data.get("by"),
            comment=data.get("comment"),
            data=data.get("data"),
            at=_utc(float(data["at"])),
            timed_out=bool(data.get("timed_out", False)),
        )


class RunEvent(NamedTuple):
    """Something that happened to a run (immutable; a named tuple, cheap to make).

    Attributes:
        kind: run_started, step_started, step_completed, step_failed, waiting, decided,
            paused, resumed, completed, failed, stopped, rejected, expired, agent_leak,
            or the name given to ``ctx.emit``.
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
        return _utc(self.at)

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


@dataclass(frozen=True, slots=True)
class OutputRecord:
    """One step output in a run's history: ``visit`` orders them."""

    visit: int
    step: str
    value: Any

    def to_json(self) -> dict[str, Any]:
        """The stored form."""
        return {"visit": self.visit, "step": self.step, "value": self.value}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> OutputRecord:
        """Read the stored form back."""
        return cls(int(data["visit"]), str(data["step"]), data.get("value"))


@dataclass(frozen=True, slots=True)
class RunRecord:
    """A run as a store holds it (everything but its outputs, events and journal).

    Attributes:
        step: the step to run next, or the step in flight while running.
        visit: how many steps the run has started (the ``max_steps`` count).
        pending: the waiting gate (JSON) while status is ``waiting``.
        decisions: every decision taken at the run's gates (JSON).
        error: ``{"step", "type", "message", "traceback"}`` when failed.
        event_count: how many events the run's history holds.
        lease_owner / lease_token / lease_expires: who advances the run, its fencing
            token, and the Unix time its lease runs out.
        control: ``"pause"`` or ``"stop"`` when another process asked the owner to.
    """

    run_id: str
    workflow: str
    status: RunStatus
    input: Any
    state: Any = None
    step: str | None = None
    visit: int = 0
    pending: Any = None
    decisions: tuple[Any, ...] = ()
    output: Any = None
    error: Any = None
    usage: Any = None
    created_at: float = 0.0
    updated_at: float = 0.0
    event_count: int = 0
    lease_owner: str | None = None
    lease_token: int = 0
    lease_expires: float = 0.0
    control: str | None = None


#: RunRecord fields a :class:`Commit` may set.
COMMIT_FIELDS = frozenset(
    {"status", "state", "step", "visit", "pending", "decisions", "output", "error", "usage", "control"}
)


@dataclass(slots=True)
class Commit:
    """What the owner of a run writes in one atomic commit.

    Attributes:
        fields: RunRecord fields to set (names from ``COMMIT_FIELDS``).
        outputs: step outputs to append to the run's history.
        events: events to append (their ``seq`` continue ``event_count``).
        journal: journal entries to write (key → JSON-able value).
        release: drop the lease: the run leaves this process (waiting, paused, final).
    """

    fields: dict[str, Any] = field(default_factory=dict)
    outputs: list[OutputRecord] = field(default_factory=list)
    events: list[RunEvent] = field(default_factory=list)
    journal: dict[str, Any] = field(default_factory=dict)
    release: bool = False


@dataclass(frozen=True, slots=True)
class RunInfo:
    """A snapshot of a run for display and control.

    Attributes:
        pending: the waiting gate (approvers, quorum, prompt, context, deadline,
            approvals so far) while status is ``waiting``, else None.
        error: failure details while status is ``failed``.
        usage: tokens the run's agent calls consumed.
        decisions: every decision taken at the run's gates, oldest first.
    """

    run_id: str
    workflow: str
    status: RunStatus
    step: str | None
    pending: dict[str, Any] | None
    error: dict[str, Any] | None
    usage: Usage
    created_at: datetime
    updated_at: datetime
    decisions: tuple[Decision, ...] = ()

    @classmethod
    def from_record(cls, rec: RunRecord) -> RunInfo:
        """Build the snapshot from a stored record."""
        return cls(
            run_id=rec.run_id,
            workflow=rec.workflow,
            status=rec.status,
            step=rec.step,
            pending=rec.pending,
            error=rec.error,
            usage=Usage.from_json(rec.usage),
            created_at=_utc(rec.created_at),
            updated_at=_utc(rec.updated_at),
            decisions=tuple(Decision.from_json(d) for d in rec.decisions),
        )

    def _repr_html_(self) -> str:
        rows = [
            ("run", self.run_id),
            ("workflow", self.workflow),
            ("status", self.status.value),
            ("step", self.step or ""),
            ("waiting for", ", ".join(self.pending.get("approvers", [])) if self.pending else ""),
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
