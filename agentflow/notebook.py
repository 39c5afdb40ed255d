"""How a run shows itself in a notebook and a terminal: a snapshot, and a live view.

:class:`RunView` is what is known of a run at one moment: its ``RunInfo`` (status, step,
pending approvals, error, usage) and the events seen so far. It renders as HTML tables
(a summary, the history with step durations, the usage per step) and as plain text
for a terminal. Everything a run carries (step names, prompts, error messages, emitted
data) is untrusted and escaped.

:class:`LiveView` is a view in a running IPython kernel that follows the run
(``handle.events()`` in a task on the kernel's loop) and re-renders its display
(``display(..., display_id=True)`` then ``update``) at each event. IPython is imported
only then (``pip install 'agentflow-core[notebook]'``).
"""

from __future__ import annotations

import asyncio
import io
import json
from dataclasses import dataclass, field
from html import escape
from typing import TYPE_CHECKING, Any

from .errors import AgentflowError
from .types import FINAL, RunEvent, RunInfo, RunStatus, Usage

if TYPE_CHECKING:
    from IPython.display import DisplayHandle

    from .handle import RunHandle

__all__ = ["LiveView", "RunView", "show"]

#: Events after which the view reads the run's info again (status, pending, usage).
_INFO_KINDS = frozenset(
    {"run_started", "step_completed", "step_failed", "waiting", "decided", "paused", "resumed"}
)
_DETAIL = 120  # characters of an event's data shown in the history
_STREAM = 200  # characters of an agent's streamed text shown while it writes
_EVERY = 0.1  # seconds between two renders of a live view for events that change little
_FINAL_KINDS = frozenset(s.value for s in FINAL)


def _usage(u: Usage) -> str:
    cost = f", ${u.cost:.4f}" if u.cost is not None else ""
    return f"{u.input_tokens} in / {u.output_tokens} out tokens{cost}"


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str, sort_keys=True)
    return text if len(text) <= _DETAIL else text[: _DETAIL - 1] + "…"


def _detail(ev: RunEvent) -> str:
    """What one event says, in a line: the error, the decision, the approvers, the tokens."""
    d = ev.data
    if not isinstance(d, dict):
        return "" if d is None else _short(d)
    if ev.kind in ("step_failed", "failed") and "type" in d:
        return f"{d['type']}: {d.get('message', '')}"
    if ev.kind == "decided":
        how = "timed out" if d.get("timed_out") else "approved" if d.get("approved") else "rejected"
        how = "answered" if d.get("responded") else how
        said = d.get("comment")
        return f"{how} by {d.get('by') or '?'}" + (f": {said}" if said else "")
    if ev.kind == "waiting":
        if d.get("approvers"):
            return f"for {', '.join(map(str, d['approvers']))}" + (
                f": {d['prompt']}" if d.get("prompt") else ""
            )
        return _short({k: v for k, v in d.items() if v is not None})
    if ev.kind == "step_completed":
        return _usage(Usage.from_json(d["usage"])) if d.get("usage") else ""
    if ev.kind == "resumed" and d.get("retried"):
        err = d.get("error") or {}
        return f"retried after {err.get('type')}: {err.get('message')}" if err.get("type") else "retried"
    return _short(d)


@dataclass
class RunView:
    """A run as known at one moment: its info and the events seen so far, renderable.

    Attributes:
        run_id: the run.
        workflow: its workflow's name.
        status: the status last seen (None: not read yet).
        step: the step it is at, when known.
        info: its latest ``RunInfo`` (None until read).
        events: its events seen so far, oldest first (``agent_delta`` left out).
        note: a line shown under the summary (why the view stopped following, say).
        streaming: per agent, the end of the text it is streaming in the current step.
        limit: the history shows the latest this many events (None: all).
    """

    run_id: str
    workflow: str
    status: RunStatus | None = None
    step: str | None = None
    info: RunInfo | None = None
    events: list[RunEvent] = field(default_factory=list)
    note: str | None = None
    streaming: dict[str, str] = field(default_factory=dict)
    limit: int | None = 200

    def apply(self, ev: RunEvent) -> None:
        """Take in one more event (its status and step, when it says them).

        An ``agent_delta`` adds to what its agent is streaming, shown until the step ends.
        """
        if ev.kind == "agent_delta":
            if isinstance(ev.data, dict) and isinstance(ev.data.get("text"), str):
                agent = str(ev.data.get("agent") or "agent")
                self.streaming[agent] = (self.streaming.get(agent, "") + ev.data["text"])[-_STREAM:]
            return
        if self.events and ev.seq <= self.events[-1].seq:
            return
        self.events.append(ev)
        if ev.kind in ("step_completed", "step_failed"):
            self.streaming.clear()
        if ev.step is not None:
            self.step = ev.step

    def refresh(self, info: RunInfo) -> None:
        """Take in the run's latest ``RunInfo``."""
        self.info, self.status, self.step = info, info.status, info.step

    # -- what is shown ---------------------------------------------------------

    def summary(self) -> list[tuple[str, str]]:
        """The summary's rows: status, step, approvals waited for, error, usage, updated."""
        rows = [("run", self.run_id), ("workflow", self.workflow)]
        rows.append(("status", self.status.value if self.status else "unknown (await handle.info())"))
        if self.step:
            rows.append(("step", self.step))
        info = self.info
        if info is not None:
            for a in info.approvals:
                who = ", ".join(a.approvers)
                rows.append(
                    (
                        "waiting for",
                        f"{who} at {a.step} ({a.kind} {a.id})" + (f": {a.prompt}" if a.prompt else ""),
                    )
                )
            if info.error:
                rows.append(("error", f"{info.error.get('type')}: {info.error.get('message')}"))
            rows.append(("usage", _usage(info.usage)))
            rows.append(("updated", info.updated_at.isoformat(timespec="seconds")))
        for agent, text in self.streaming.items():
            rows.append(("writing", f"{agent}: …{text}" if len(text) >= _STREAM else f"{agent}: {text}"))
        if self.note:
            rows.append(("note", self.note))
        return rows

    def history(self) -> list[tuple[str, str, str, str, str, str]]:
        """The history's rows: seq, time since the first event, kind, step, duration, detail."""
        rows = []
        first = self.events[0].at if self.events else 0.0
        started: dict[str | None, float] = {}
        for ev in self.events:
            took = ""
            if ev.kind == "step_started":
                started[ev.step] = ev.at
            elif ev.kind in ("step_completed", "step_failed") and ev.step in started:
                took = f"{ev.at - started.pop(ev.step):.3f} s"
            rows.append((str(ev.seq), f"+{ev.at - first:.3f} s", ev.kind, ev.step or "", took, _detail(ev)))
        if self.limit is not None and len(rows) > self.limit:
            left = len(rows) - self.limit
            rows = [("…", "", f"{left} earlier events", "", "", ""), *rows[-self.limit :]]
        return rows

    def usage(self) -> list[tuple[str, str, str, str]]:
        """Usage per step that spent tokens (step, input, output, cost), then the run's total."""
        per: dict[str, Usage] = {}
        for ev in self.events:
            if ev.kind == "step_completed" and isinstance(ev.data, dict) and ev.data.get("usage"):
                name = ev.step or ""
                per[name] = per.get(name, Usage()) + Usage.from_json(ev.data["usage"])
        total = self.info.usage if self.info is not None else sum(per.values(), Usage())
        rows = [(s, str(u.input_tokens), str(u.output_tokens), _cost(u)) for s, u in per.items()]
        if per or total.total_tokens:
            rows.append(("total", str(total.input_tokens), str(total.output_tokens), _cost(total)))
        return rows

    def html(self) -> str:
        """The view as HTML: summary, history and usage tables, every value escaped."""
        parts = [
            f"<div class='agentflow-run'><strong>{escape(self.workflow)}</strong> "
            f"<code>{escape(self.run_id)}</code>",
            _html_table(None, self.summary(), th_first=True),
        ]
        if self.events:
            head = ("#", "at", "event", "step", "took", "detail")
            parts.append("<details open><summary>history</summary>")
            parts.append(_html_table(head, self.history()) + "</details>")
        usage = self.usage()
        if usage:
            parts.append(_html_table(("step", "input tokens", "output tokens", "cost"), usage))
        return "".join(parts) + "</div>"

    def text(self) -> str:
        """The view as plain text, readable in a terminal."""
        from rich import box
        from rich.console import Console
        from rich.table import Table

        out = io.StringIO()
        console = Console(
            file=out,
            width=110,
            no_color=True,
            color_system=None,
            highlight=False,
            force_terminal=False,
            force_jupyter=False,
        )
        lines = [f"{k:<12} {v}" for k, v in self.summary()]
        console.print(f"run {self.run_id} ({self.workflow})", markup=False)
        for line in lines[2:]:
            console.print("  " + line, markup=False, soft_wrap=True)
        for title, head, rows in (
            ("history", ("#", "at", "event", "step", "took", "detail"), self.history()),
            ("usage", ("step", "input tokens", "output tokens", "cost"), self.usage()),
        ):
            if rows:
                table = Table(*head, title=title, title_justify="left", box=box.SIMPLE_HEAD)
                for row in rows:
                    table.add_row(*(escape_markup(c) for c in row))
                console.print(table)
        return "\n".join(line.rstrip() for line in out.getvalue().strip().splitlines()) + "\n"

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        return {"text/plain": self.text(), "text/html": self.html()}

    def __repr__(self) -> str:
        return self.text()


def escape_markup(text: str) -> str:
    """``text`` shown as it is by rich (no ``[bold]`` markup from run data)."""
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def _cost(u: Usage) -> str:
    return "" if u.cost is None else f"${u.cost:.4f}"


def _html_table(head: tuple[str, ...] | None, rows: list[Any], th_first: bool = False) -> str:
    out = ["<table>"]
    if head:
        out.append("<tr>" + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr>")
    for row in rows:
        tags = ["th style='text-align:left'" if th_first else "td"] + ["td"] * (len(row) - 1)
        cells = [f"<{t}>{escape(c)}</{t.split()[0]}>" for t, c in zip(tags, row, strict=True)]
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "".join(out) + "</table>"


class LiveView:
    """A run's display in a running IPython kernel that re-renders as the run advances.

    Made by ``handle.display()`` (or by displaying a handle in a kernel): it shows the
    run at once, then follows its events in a task on the kernel's loop and updates the
    same output at each one, until the run reaches a final status (or :meth:`stop`).

    Attributes:
        view: the :class:`RunView` shown (updated in place).
        task: the task that follows the run.
    """

    def __init__(self, handle: RunHandle) -> None:
        try:
            from IPython import get_ipython
            from IPython.display import display
        except ImportError:
            raise AgentflowError(
                "handle.display() needs IPython: pip install 'agentflow-core[notebook]'"
            ) from None
        if get_ipython() is None:
            raise AgentflowError(
                "handle.display() shows a run in a running IPython kernel (a notebook); "
                "in a terminal, print(await handle.snapshot())"
            )
        loop = asyncio.get_running_loop()
        self._handle = handle
        self.view = handle._view or RunView(handle.run_id, handle._runner.spec.name, handle.status)
        handle._view = self.view
        shown = display(self.view._repr_mimebundle_(), raw=True, display_id=True)  # type: ignore[no-untyped-call]
        assert shown is not None  # display_id=True always gives a handle
        self._display: DisplayHandle = shown
        self._shown = 0  # the seq of the last event the display shows
        self._changed = asyncio.Event()  # set at each render
        self._last = 0.0  # the loop's time of the last render
        self._later: asyncio.TimerHandle | None = None  # a render put off (see _EVERY)
        self.task = loop.create_task(self._follow(), name=f"agentflow:view:{handle.run_id}")

    async def _follow(self) -> None:
        handle, view = self._handle, self.view
        try:
            view.refresh(await handle.info())
            self._render()
            async for ev in handle.events():
                view.apply(ev)
                if ev.kind in _INFO_KINDS or ev.kind in _FINAL_KINDS:
                    view.refresh(await handle.info())
                    self._render()
                else:
                    self._soon()  # step_started, emitted events, streamed text: at most every _EVERY s
            view.refresh(await handle.info())
        except asyncio.CancelledError:
            view.note = "no longer followed (stopped)"
            self._render()
            raise
        except Exception as err:  # shown where the user looks, not lost in a task
            view.note = f"no longer followed: {type(err).__name__}: {err}"
        self._render()

    def _soon(self) -> None:
        loop = asyncio.get_running_loop()
        if loop.time() - self._last >= _EVERY:
            self._render()
        elif self._later is None:
            self._later = loop.call_at(self._last + _EVERY, self._render)

    def _render(self) -> None:
        if self._later is not None:
            self._later.cancel()
            self._later = None
        self._last = asyncio.get_running_loop().time()
        self._shown = self.view.events[-1].seq if self.view.events else 0
        self._display.update(self.view._repr_mimebundle_(), raw=True)  # type: ignore[no-untyped-call]
        self._changed.set()

    async def wait(self, timeout: float | None = None) -> RunView:
        """Wait until the view stopped following (the run is final) and return it.

        Raises:
            TimeoutError: ``timeout`` seconds passed first (the view goes on).
        """
        await asyncio.wait_for(asyncio.shield(self.task), timeout)
        return self.view

    async def settled(self, timeout: float = 10.0) -> None:
        """Wait until the display shows every event the run has stored so far.

        Raises:
            TimeoutError: ``timeout`` seconds passed first.
        """
        store, run_id = self._handle._runner.store, self._handle.run_id
        async with asyncio.timeout(timeout):
            while not self.task.done():
                self._changed.clear()
                if not await store.events(run_id, self._shown):
                    break
                await self._changed.wait()

    def stop(self) -> None:
        """Stop following the run (the display keeps what it shows)."""
        self.task.cancel()

    def __repr__(self) -> str:
        return f"<LiveView of run {self._handle.run_id}>"


def show(handle: RunHandle) -> None:
    """Display ``handle`` in IPython: live where the kernel's loop runs it, a snapshot elsewhere."""
    from IPython.display import display

    try:
        loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    bound = handle._runner._loop
    if loop is not None and (bound is None or bound is loop):
        LiveView(handle)
    else:
        display(handle._repr_mimebundle_(), raw=True)  # type: ignore[no-untyped-call]
