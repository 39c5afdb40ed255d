"""Following a run: its steps as they start and finish, then its outcome.

On a terminal the step in flight is a spinner with the time it has taken so far (a
``rich`` Live view), and each step that finishes becomes a line above it. Elsewhere
(a pipe, ``NO_COLOR``) every event worth a line is one line of plain text::

    run 4f0c... of Release started
    step Draft started
    step Draft completed in 1.52 s (1,204 + 311 tokens, $0.0042)
    step Review waiting for editor: Publish?
    run 4f0c... is waiting at Review (approve with: agentflow approve MODULE 4f0c... --by editor)

``--json`` prints the events instead, one JSON object a line (``RunEvent.to_json`` and
the ``run_id``).
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console, ConsoleOptions, RenderResult
from rich.live import Live
from rich.markup import escape
from rich.spinner import Spinner
from rich.text import Text

from ..runner import RunHandle
from ..types import RunEvent, RunInfo, RunStatus, Usage
from .output import STATUS_STYLE, Output, dumps

__all__ = ["Follower", "describe_usage", "exit_code", "outcome"]

#: What ``agentflow`` exits with when the run it followed ended so (0 for the rest).
_FAILED = frozenset({RunStatus.FAILED, RunStatus.REJECTED, RunStatus.EXPIRED, RunStatus.STOPPED})


def exit_code(info: RunInfo) -> int:
    """1 when the run failed, was rejected, expired or was stopped; else 0 (done, or parked)."""
    return 1 if info.status in _FAILED else 0


def describe_usage(usage: Usage) -> str:
    """``"1,204 + 311 tokens, $0.0042"``; empty when no tokens were used."""
    if not usage.total_tokens:
        return ""
    cost = f", ${usage.cost}" if usage.cost is not None else ""
    return f"{usage.input_tokens:,} + {usage.output_tokens:,} tokens{cost}"


def _short(value: Any, width: int = 120) -> str:
    text = dumps(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def outcome(info: RunInfo, module: str, elapsed: float | None = None) -> tuple[str, str]:
    """The lines that end a follow (plain text, rich markup): the run's status, then what to do next."""
    rid, status = info.run_id, info.status.value
    head = f"run {rid} is {status}"
    took = f", {elapsed:.2f} s after it started" if elapsed is not None else ""
    usage = describe_usage(info.usage)
    usage = f" ({usage})" if usage else ""
    what, hint = "", ""
    if info.status == RunStatus.FAILED and info.error:
        err = info.error
        what = f" at step {err.get('step')!r}: {err.get('type')}: {err.get('message')}"
        hint = (
            f"agentflow show {module} {rid}   # the traceback\nagentflow retry {module} {rid}  # run it again"
        )
    elif info.status == RunStatus.WAITING and info.pending:
        a = info.pending
        what = f" at {a.step} for {', '.join(a.approvers) or 'anyone'}" + (
            f": {a.prompt}" if a.prompt else ""
        )
        by = a.approvers[0] if a.approvers else "NAME"
        hint = f"agentflow approve {module} {rid} --by {by}   # or reject"
    elif info.status == RunStatus.PAUSED:
        what, hint = f" before step {info.step!r}", f"agentflow resume {module} {rid}"
    elif info.status == RunStatus.REJECTED and info.decisions:
        d = info.decisions[-1]
        what = f" by {d.by}" + (f": {d.comment}" if d.comment else "")
    first = head + what + took + usage
    hints = "".join(f"\n  {h}" for h in hint.splitlines())
    style = STATUS_STYLE.get(status, "")
    markup = f"[{style}]{escape(head)}[/{style}]{escape(what + took + usage)}" if style else escape(first)
    return first + hints, markup + f"[dim]{escape(hints)}[/dim]"


class _InFlight:
    """The live part of the view: a spinner, the step in flight and its time so far."""

    def __init__(self) -> None:
        self.step: str | None = None
        self.since = 0.0
        self.spinner = Spinner("dots", style="cyan")

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if self.step is None:
            return
        took = max(0.0, time.time() - self.since)
        self.spinner.update(text=Text.assemble((self.step, "bold"), f"  running {took:.1f} s"))
        yield self.spinner


class Follower:
    """Prints the events of runs as they come, in the output's mode.

    Args:
        out: where and how to print.
        module: the module the command was given (the lines it prints name commands with it).
    """

    def __init__(self, out: Output, module: str) -> None:
        self.out = out
        self.module = module
        self._started: dict[str, float] = {}
        self._inflight = _InFlight()
        self._live: Live | None = None

    async def follow(self, handle: RunHandle, until_parked: bool = True) -> RunInfo:
        """Print ``handle``'s events, history first, until the run is final (or parked).

        ``until_parked``: also stop when the run waits at a gate or is paused (what a
        process that advances the run wants: nothing more happens here). Returns the
        run's info at the end, after printing its outcome line (unless ``--json``).
        """
        info: RunInfo | None = None
        if self.out.rich:
            self._live = Live(self._inflight, console=self.out.console, refresh_per_second=12, transient=True)
            self._live.start()
        try:
            async for ev in handle.events():
                self.event(ev)
                if until_parked and ev.kind in ("waiting", "paused"):
                    info = await handle.info()
                    # Parked at this very event (not at a later one the run has gone past).
                    if info.status.value == ev.kind:
                        break
                    info = None
        finally:
            if self._live is not None:
                self._live.stop()
                self._live = None
        if info is None:
            info = await handle.info()
        if not self.out.json:
            took = (info.updated_at - info.created_at).total_seconds()
            plain, markup = outcome(info, self.module, took)
            self.out.line(plain, markup)
        return info

    def _print(self, plain: str, markup: str) -> None:
        if self._live is not None:
            self._live.console.print(markup, highlight=False)
        else:
            self.out.line(plain, markup)

    def event(self, ev: RunEvent) -> None:
        """Print one event (or keep it for the spinner: a step that starts)."""
        if self.out.json:
            self.out.json_line({"run_id": ev.run_id, **ev.to_json()})
            return
        line = self._describe(ev)
        if line is not None:
            self._print(*line)

    def _describe(self, ev: RunEvent) -> tuple[str, str] | None:
        step, data = ev.step or "", ev.data if isinstance(ev.data, dict) else {}
        e = escape(step)
        if ev.kind == "run_started":
            wf = data.get("workflow")
            text = f"run {ev.run_id}" + (f" of {wf}" if wf else "") + " started"
            return text, f"[bold]{escape(text)}[/bold]"
        if ev.kind == "step_started":
            self._started[step] = ev.at
            self._inflight.step, self._inflight.since = step, ev.at
            if self._live is not None:
                return None  # the spinner shows it
            return f"step {step} started", f"[cyan]▶[/cyan] [bold]{e}[/bold] started"
        if ev.kind == "step_completed":
            took = self._took(step, ev.at)
            usage = describe_usage(Usage.from_json(data.get("usage")))
            extra = f" ({usage})" if usage else ""
            return (
                f"step {step} completed{took}{extra}",
                f"[green]✓[/green] [bold]{e}[/bold]{escape(took)}[dim]{escape(extra)}[/dim]",
            )
        if ev.kind == "step_failed":
            what = f"{data.get('type')}: {data.get('message')}"
            if data.get("retry"):
                text = f"step {step} attempt {data.get('attempt')} failed: {what}; retrying"
                return text, f"[yellow]↻[/yellow] [bold]{e}[/bold] {escape(text[len(step) + 6 :])}"
            took = self._took(step, ev.at)
            return (
                f"step {step} failed{took}: {what}",
                f"[red]✗[/red] [bold]{e}[/bold]{escape(took)}: [red]{escape(what)}[/red]",
            )
        if ev.kind == "waiting":
            self._clear(step)
            if data.get("kind") == "sleep":
                text = f"step {step} sleeping {data.get('seconds')} s"
            elif data.get("kind") == "children":
                text = f"step {step} waiting for {data.get('count')} child runs"
            else:
                who = ", ".join(data.get("approvers") or ()) or "anyone"
                about = data.get("prompt") or (f"call {data['tool']}" if data.get("tool") else "")
                text = f"step {step} waiting for {who}" + (f": {about}" if about else "")
            return text, f"[magenta]⏸[/magenta] {escape(text)}"
        if ev.kind == "decided":
            ok = data.get("approved")
            verdict = "approved" if ok else ("timed out" if data.get("timed_out") else "rejected")
            by = f" by {data['by']}" if data.get("by") else ""
            note = f": {data['comment']}" if data.get("comment") else ""
            text = f"step {step} decided: {verdict}{by}{note}"
            return text, f"[{'green' if ok else 'red'}]●[/] {escape(text)}"
        if ev.kind in ("paused", "resumed", "migrated", "agent_leak", "agent_throttled"):
            detail = ""
            if ev.kind == "resumed" and data.get("retried"):
                detail = " (retried)"
            elif ev.kind == "migrated":
                detail = f" from version {data.get('from')} to {data.get('to')}"
            text = f"{ev.kind} at step {step}{detail}" if step else f"{ev.kind}{detail}"
            return text, f"[yellow]{escape(text)}[/yellow]"
        if ev.kind == "agent_delta":
            return None  # a model's text as it streams: too many for lines
        if ev.kind in ("completed", "failed", "stopped", "rejected", "expired"):
            self._clear(None)
            return None  # the outcome line says it
        text = f"step {step} {ev.kind}: {_short(ev.data)}" if step else f"{ev.kind}: {_short(ev.data)}"
        return text, f"[dim]{escape(text)}[/dim]"  # what a step emitted (ctx.emit)

    def _took(self, step: str, at: float) -> str:
        started = self._started.pop(step, None)
        self._clear(step)
        return f" in {at - started:.2f} s" if started is not None else ""

    def _clear(self, step: str | None) -> None:
        if step is None or self._inflight.step == step:
            self._inflight.step = None
