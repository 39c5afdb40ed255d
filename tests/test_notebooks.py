"""Notebooks: the example notebook run on a real kernel, displays, one loop per runner, run_sync.

``examples/notebook.ipynb`` is executed by nbclient on an ipykernel started for it, and
the text of its cells' outputs is checked: the workflow's graph, the live view of the
run parked at its gate, the decision, the retry, the history and the fork.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

from agentflow import (
    END,
    START,
    AgentflowError,
    EventLoopError,
    HumanApproval,
    Next,
    RunEvent,
    RunInfo,
    RunResult,
    RunStatus,
    Wait,
    Workflow,
    WorkflowRunner,
    run_sync,
)
from agentflow.notebook import RunView

ROOT = Path(__file__).resolve().parent.parent


def _outputs(nb: Any, tag: str) -> tuple[str, dict[str, str]]:
    """The stdout text and the last rich output's data of the cell tagged ``tag``."""
    (cell,) = [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]
    stdout = "".join(o["text"] for o in cell.outputs if o["output_type"] == "stream")
    errors = [o for o in cell.outputs if o["output_type"] == "error"]
    assert not errors, errors
    rich = [o["data"] for o in cell.outputs if "data" in o]
    return stdout, (rich[-1] if rich else {})


def test_the_example_notebook_runs_on_a_kernel_and_shows_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")  # jupyter_core's paths of now (no warning)
    nb = nbformat.read(ROOT / "examples" / "notebook.ipynb", as_version=4)
    client = NotebookClient(
        nb, timeout=30, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "examples")}}
    )
    client.execute()

    _, graph = _outputs(nb, "graph")
    assert "```mermaid\nflowchart TD" in graph["text/markdown"]
    assert "Review (gate) -> File (approved), END (rejected)" in graph["text/plain"]

    # The live view: one output, updated in place until the run parked at the gate.
    (live_cell,) = [c for c in nb.cells if "live" in c.get("metadata", {}).get("tags", [])]
    assert [o["output_type"] for o in live_cell.outputs] == ["display_data"]
    _, live = _outputs(nb, "live")
    text = live["text/plain"]
    assert "status       waiting" in text
    assert "waiting for  lead at Review" in text and "File this ticket?" in text
    assert "waiting          Review" in text  # the history's last row: the run parked
    assert "usage        21 in / 11 out tokens" in text
    assert "<table>" in live["text/html"] and "<th>event</th>" in live["text/html"]

    out, _ = _outputs(nb, "pending")
    assert out.splitlines()[0] == "waiting at Review for ['lead']: File this ticket?"
    out, _ = _outputs(nb, "approve")
    assert out.strip() == "failed at File: ConnectionError: issue tracker unreachable"
    out, _ = _outputs(nb, "retry")
    assert out.startswith("retried: {'label': 'normal'")

    _, history = _outputs(nb, "history")
    text = history["text/plain"]
    assert "status       completed" in text
    for row in ("approved by lead: right, file it", "step_failed", "retried after ConnectionError"):
        assert row in text, row
    assert "__start__   21             11" in text  # the agent's tokens, per step

    out, shown = _outputs(nb, "fork")
    assert out.splitlines()[0].startswith("forked: {'label': 'urgent'")
    (fork_cell,) = [c for c in nb.cells if "fork" in c.get("metadata", {}).get("tags", [])]
    assert "display_data" in [o["output_type"] for o in fork_cell.outputs]  # shown by _ipython_display_
    assert "status       completed" in shown["text/plain"]
    out, _ = _outputs(nb, "run_sync")
    assert out.strip() == "waiting at Review"  # run_sync in the kernel, whose loop is running


# -- displays -------------------------------------------------------------------------

EVIL = "<script>alert(1)</script>"


def _gated() -> Workflow:
    def start(ctx: Any) -> str:
        ctx.emit("note", {"html": EVIL})
        return "Review"

    def review(ctx: Any) -> Wait:
        return Wait(HumanApproval(approvers=["ann"], prompt=f"ship {EVIL}?"), "Ship")

    def ship(ctx: Any) -> Next:
        return Next(END, output={"shipped": True})

    return Workflow("Gated", "ship behind a gate").flow({START: start, "Review": review, "Ship": ship})


async def test_a_snapshot_renders_history_and_pending_as_escaped_tables() -> None:
    async with WorkflowRunner(_gated()) as runner:
        handle = await runner.run()
        await handle.wait_for("waiting", timeout=10)
        before = handle._repr_mimebundle_()  # no view yet: what the handle knows
        assert "status" in before["text/plain"] and handle.run_id in before["text/html"]

        view = await handle.snapshot()
        bundle = view._repr_mimebundle_()
        html, text = bundle["text/html"], bundle["text/plain"]
        assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
        assert f"ship {EVIL}?" in text  # text is shown as it is
        assert [r[2] for r in view.history()] == [
            "run_started",
            "step_started",
            "note",
            "step_completed",
            "step_started",
            "step_completed",
            "waiting",
        ]
        assert "waiting for  ann at Review" in text
        assert handle._repr_mimebundle_() == bundle  # the handle shows its latest view
        with pytest.raises(AgentflowError, match="running IPython kernel"):
            handle.display()  # IPython is installed, but this is no kernel
        await runner.approve(handle.run_id, by="ann")
        await handle.result(timeout=10)
        done = (await handle.snapshot()).text()
        assert "approved by ann" in done and "status       completed" in done


def test_a_workflow_shows_its_graph_and_a_text_outline() -> None:
    bundle = _gated()._repr_mimebundle_()
    assert bundle["text/markdown"].startswith("**Gated**: ship behind a gate\n\n```mermaid\nflowchart TD")
    assert bundle["text/plain"].splitlines() == [
        "Workflow 'Gated': ship behind a gate",
        "  START -> Review",
        "  Review (gate) -> Ship (approved)",
        "  Ship -> END",
    ]


# -- one event loop per runner ----------------------------------------------------------


def _quick() -> Workflow:
    def only(ctx: Any) -> Next:
        return Next(END, output={"n": ctx.input["n"] * 2})

    return Workflow("Quick").flow({START: only})


def test_a_runner_used_from_a_second_loop_raises_instead_of_orphaning_the_run() -> None:
    runner = WorkflowRunner(_quick())

    async def first() -> RunResult:
        return await (await runner.run({"n": 1})).result()

    assert asyncio.run(first()).output == {"n": 2}
    with pytest.raises(EventLoopError, match=r"workflow 'Quick'.*closed now.*new WorkflowRunner"):
        asyncio.run(runner.run({"n": 2}))
    with pytest.raises(EventLoopError):
        asyncio.run(runner.list_runs())
    asyncio.run(runner.close())  # from any loop; then the runner may serve a new one
    assert asyncio.run(first()).output == {"n": 2}


async def test_a_runner_called_from_a_thread_with_its_own_loop_raises() -> None:
    async with WorkflowRunner(_gated()) as runner:
        handle = await runner.run()
        await handle.wait_for("waiting", timeout=10)
        errors: list[BaseException] = []

        def other_thread() -> None:
            for call in (lambda: runner.approve(handle.run_id, by="ann"), handle.result, handle.info):
                try:
                    asyncio.run(call())
                except BaseException as err:
                    errors.append(err)

        thread = threading.Thread(target=other_thread)
        thread.start()
        await asyncio.to_thread(thread.join)
        assert [type(e) for e in errors] == [EventLoopError] * 3
        assert "another event loop" in str(errors[0])
        assert (await handle.info()).status == RunStatus.WAITING  # nothing was decided
        await runner.approve(handle.run_id, by="ann")  # from its own loop it works
        assert (await handle.result(timeout=10)).output == {"shipped": True}


# -- run_sync ------------------------------------------------------------------------


def test_run_sync_runs_to_the_end_or_the_gate_without_a_loop(tmp_path: Path) -> None:
    runner = WorkflowRunner(_quick())
    first, second = runner.run_sync({"n": 3}), runner.run_sync({"n": 4})
    assert isinstance(first, RunResult) and first.output == {"n": 6}
    assert isinstance(second, RunResult) and second.output == {"n": 8}
    asyncio.run(runner.close())

    wf = _gated().persistence(store="sqlite", path=str(tmp_path / "g.db"))
    parked = run_sync(wf)  # a runner made for the run, closed after it; the run stays stored
    assert isinstance(parked, RunInfo) and parked.status == RunStatus.WAITING and parked.step == "Review"

    async def decide() -> RunResult:
        async with WorkflowRunner(wf) as later:
            await later.approve(parked.run_id, by="ann")
            return await (await later.attach(parked.run_id)).result(timeout=10)

    assert asyncio.run(decide()).output == {"shipped": True}


async def test_run_sync_works_inside_a_running_loop_and_refuses_to_block_its_own() -> None:
    fresh = WorkflowRunner(_quick())
    done = fresh.run_sync({"n": 5})  # in a thread with a loop of its own
    assert isinstance(done, RunResult) and done.output == {"n": 10}
    await fresh.close()

    async with WorkflowRunner(_quick()) as here:
        await (await here.run({"n": 1})).result()
        with pytest.raises(EventLoopError, match="would block the event loop"):
            here.run_sync({"n": 1})


def test_importing_agentflow_imports_no_ipython() -> None:
    code = "import sys, agentflow; print(sorted(m for m in sys.modules if m.split('.')[0] == 'IPython'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_view_keeps_the_latest_history_and_shows_what_an_agent_streams() -> None:
    view = RunView("r1", "Long")
    for seq in range(1, 251):
        view.apply(RunEvent("step_started", "r1", f"s{seq}", None, float(seq), seq))
    for text in ("Dear ", "<b>"):
        view.apply(RunEvent("agent_delta", "r1", "s250", {"agent": "writer", "text": text}, 251.0, 250))
    rows = view.history()
    assert len(rows) == 201 and rows[0][2] == "50 earlier events" and rows[-1][0] == "250"
    assert ("writing", "writer: Dear <b>") in view.summary()
    assert "writer: Dear &lt;b&gt;" in view.html()
    view.apply(RunEvent("step_completed", "r1", "s250", None, 252.0, 251))
    assert all(k != "writing" for k, _ in view.summary())  # the step ended: its stream is done
