"""Data at the edges of a run: what is refused at the door, what comes back after a reload.

A value a run accepts must read back the same from every store (or be refused at once,
naming where it came from); one damaged record fails alone; user events cannot pose
as lifecycle events; secrets never reach a store or an event.
"""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
import sample_workflows
from helpers import all_events, wait_status, wait_until
from pydantic import BaseModel

from agentflow import (
    END,
    START,
    AgentflowError,
    CorruptRecordError,
    HumanApproval,
    InvalidInputError,
    Next,
    Parallel,
    RetryPolicy,
    RunFailedError,
    RunStatus,
    StateValidationError,
    Wait,
    Workflow,
    WorkflowRunner,
    step,
)

BOUND = 5.0
GATE = HumanApproval(approvers=["ops"])


def deep(levels: int) -> Any:
    """A JSON value nested ``levels`` deep (lists in lists)."""
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


def depth(value: Any) -> int:
    n = 0
    while isinstance(value, list):
        value, n = value[0], n + 1
    return n


async def _reload(make_store, kind: str, wf: Workflow, run_id: str) -> Any:
    """Approve the run's gate from a runner on a store of its own, and return its result."""
    async with WorkflowRunner(wf, store=make_store(kind)) as other:
        handle = await other.approve(run_id, by="ops")
        return await asyncio.wait_for(handle.result(), BOUND)


# -- deep nesting -------------------------------------------------------------------------


class Blob(BaseModel):
    data: Any = None


class Tree(BaseModel):
    tree: Any = None


def _deep_input_flow() -> Workflow:
    return (
        Workflow("DeepInput")
        .input(Blob)
        .flow(
            {
                START: lambda ctx: Wait(GATE, "Done"),
                "Done": lambda ctx: Next(END, output=depth(ctx.input.data)),
            }
        )
    )


@pytest.mark.parametrize("levels", [210, 254, 300])
@pytest.mark.parametrize("kind", ["sqlite", "redis", "postgres"])
async def test_deeply_nested_input_is_refused_at_the_door_or_reads_back(make_store, kind, levels) -> None:
    wf = _deep_input_flow()
    async with WorkflowRunner(wf, store=make_store(kind)) as runner:
        try:
            handle = await runner.run({"data": deep(levels - 1)})  # the model adds a level
        except InvalidInputError as exc:
            assert "'data'" in str(exc), exc
            assert await runner.list_runs() == []
            return
        assert levels < 300, "300 levels cannot be stored: it must be refused"
        await wait_status(handle, RunStatus.WAITING)
    result = await _reload(make_store, kind, wf, handle.run_id)
    assert result.output == levels - 1


@pytest.mark.parametrize("levels", [210, 254, 300])
@pytest.mark.parametrize("kind", ["sqlite", "redis", "postgres"])
async def test_deeply_nested_input_without_a_model_is_refused_or_reads_back(make_store, kind, levels) -> None:
    wf = Workflow("DeepRaw").flow(
        {START: lambda ctx: Wait(GATE, "Done"), "Done": lambda ctx: Next(END, output=depth(ctx.input))}
    )
    async with WorkflowRunner(wf, store=make_store(kind)) as runner:
        try:
            handle = await runner.run(deep(levels))
        except InvalidInputError as exc:
            assert "input" in str(exc), exc
            assert await runner.list_runs() == []
            return
        assert levels < 300, "300 levels cannot be stored: it must be refused"
        await wait_status(handle, RunStatus.WAITING)
    result = await _reload(make_store, kind, wf, handle.run_id)
    assert result.output == levels


@pytest.mark.parametrize("levels", [210, 254, 300])
@pytest.mark.parametrize("kind", ["sqlite", "redis", "postgres"])
async def test_deeply_nested_state_is_refused_naming_the_field_or_reads_back(
    make_store, kind, levels
) -> None:
    refused: list[StateValidationError] = []

    def grow(ctx):
        try:
            ctx.set_state(tree=deep(levels - 1))  # the state model adds a level
        except StateValidationError as exc:
            refused.append(exc)
        return Wait(GATE, "Done")

    wf = (
        Workflow("DeepState")
        .state(Tree)
        .flow({START: grow, "Done": lambda ctx: Next(END, output=depth(ctx.state.tree))})
    )
    async with WorkflowRunner(wf, store=make_store(kind)) as runner:
        handle = await runner.run()
        await wait_status(handle, RunStatus.WAITING)
    if levels == 300:
        assert refused, "300 levels cannot be stored: set_state must refuse it"
    if refused:
        assert refused[0].field == "tree" and "'tree'" in str(refused[0])
    result = await _reload(make_store, kind, wf, handle.run_id)
    assert result.output == (0 if refused else levels - 1)


# -- damaged records ------------------------------------------------------------------------


class Count(BaseModel):
    n: int = 0


class Parked:
    """Runs left recoverable in a store (their runner closed mid-step), of workflow ``name``."""

    def __init__(self, name: str = "Data") -> None:
        self.name = name
        self.release = asyncio.Event()
        self.ran: list[str] = []

    def workflow(self, name: str | None = None) -> Workflow:
        async def work(ctx):
            self.ran.append(ctx.run_id)
            await self.release.wait()
            ctx.set_state(n=ctx.state.n + 1)
            return Next(END, output=ctx.state.n)

        return Workflow(name or self.name).state(Count).flow({START: lambda ctx: "Work", "Work": work})

    async def park(self, store: Any, n: int) -> list[str]:
        runner = WorkflowRunner(self.workflow(), store=store)
        target = len(self.ran) + n
        ids = [(await runner.run()).run_id for _ in range(n)]
        await wait_until(lambda: len(self.ran) >= target, what="the runs to start their step")
        await runner.close()  # each run stays running, its lease let go: recoverable at once
        return ids


async def _damage(store: Any, run_id: str, field: str, raw: str) -> None:
    """Write ``raw`` over one field of the stored record, as the store's own suite does."""
    from test_store_conformance import TestPostgresStore, TestRedisStore, TestSqliteStore

    damages = {"SqliteStore": TestSqliteStore.damage, "PostgresStore": TestPostgresStore.damage}
    damage = damages.get(type(store).__name__, TestRedisStore.damage)
    await damage(None, store, run_id, field, raw)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["sqlite", "redis", "postgres"])
async def test_an_unreadable_run_fails_alone(make_store, kind) -> None:
    store = make_store(kind)
    p = Parked()
    good, bad = (await p.park(store, 3))[:2], (await p.park(store, 1))[0]
    await _damage(store, bad, "decisions", "{not json")
    async with WorkflowRunner(p.workflow(), store=make_store(kind)) as runner:
        infos = {i.run_id: i for i in await runner.list_runs()}
        assert set(infos) >= {*good, bad}
        assert infos[bad].error["type"] == "CorruptRecordError"
        assert all(infos[r].error is None for r in good)
        p.release.set()
        recovered = await runner.recover()
        assert {h.run_id for h in recovered} >= set(good) and bad not in {h.run_id for h in recovered}
        for h in recovered:
            assert (await asyncio.wait_for(h.result(), BOUND)).output == 1
        with pytest.raises(CorruptRecordError) as err:
            await runner.attach(bad)
        assert bad in str(err.value)
        assert await runner.recover() == []  # the damaged run does not stop later recoveries


@pytest.mark.parametrize("kind", ["sqlite", "redis", "postgres"])
async def test_a_stored_state_its_model_rejects_fails_that_run_alone(make_store, kind) -> None:
    store = make_store(kind)
    p = Parked()
    good, bad = await p.park(store, 2)
    await _damage(store, bad, "state", '{"n": "many"}')
    async with WorkflowRunner(p.workflow(), store=make_store(kind)) as runner:
        p.release.set()
        recovered = await runner.recover()
        assert [h.run_id for h in recovered] == [good]
        assert (await asyncio.wait_for(recovered[0].result(), BOUND)).output == 1
        with pytest.raises(RunFailedError) as err:
            await (await runner.attach(bad)).result(timeout=BOUND)
    # The definition cannot load it (an IncompatibleRunError, a kind of CorruptRecordError).
    assert err.value.error_type == "IncompatibleRunError"
    assert "state" in err.value.message and "'n'" in err.value.message


@pytest.mark.parametrize("kind", ["sqlite", "redis", "postgres"])
async def test_a_stored_step_that_does_not_exist_is_a_corrupt_record(make_store, kind) -> None:
    store = make_store(kind)
    p = Parked()
    (bad,) = await p.park(store, 1)
    await _damage(store, bad, "step", '"Nope"')
    async with WorkflowRunner(p.workflow(), store=make_store(kind)) as runner:
        assert await runner.recover() == []
        with pytest.raises(RunFailedError) as err:
            await (await runner.attach(bad)).result(timeout=BOUND)
    assert err.value.error_type == "IncompatibleRunError"  # a kind of CorruptRecordError
    assert "'Nope'" in err.value.message and "'Work'" in err.value.message
    assert p.ran == [bad]  # nothing ran again


@pytest.mark.parametrize("kind", ["sqlite", "redis", "postgres"])
async def test_recover_does_not_advance_a_record_of_another_workflow(make_store, kind) -> None:
    store = make_store(kind)
    p = Parked()
    (other,) = await p.park(store, 1)
    await _damage(store, other, "workflow", '"Elsewhere"')
    async with WorkflowRunner(p.workflow(), store=make_store(kind)) as runner:
        p.release.set()
        assert await runner.recover() == []
        await asyncio.sleep(0.05)
    rec = await store.get(other)
    assert (rec.workflow, rec.status, rec.step) == ("Elsewhere", RunStatus.RUNNING, "Work")
    assert p.ran == [other]


# -- values without a declared model ---------------------------------------------------------


def loose() -> dict[str, Any]:
    """Values JSON has no type for: datetime, Decimal, tuple, set, NaN."""
    return {
        "when": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        "amount": Decimal("1.50"),
        "pair": (1, 2),
        "tags": {"x"},
        "nan": math.nan,
    }


#: ``loose()`` as every store hands it back.
LOOSE_JSON = {
    "when": "2026-01-02T03:04:05Z",
    "amount": "1.50",
    "pair": [1, 2],
    "tags": ["x"],
    "nan": None,
}


def loose_branch(ctx):
    return loose()


async def test_values_without_a_model_are_the_same_live_and_after_a_reload_in_a_flow(store) -> None:
    seen: list[str] = []

    def look(ctx):
        seen.append(repr((ctx.step_results["Make"], ctx.step_results["loose_branch"])))
        return Wait(GATE, "Again")

    def again(ctx):
        seen.append(repr((ctx.step_results["Make"], ctx.step_results["loose_branch"])))
        return Next(END, output=loose())

    wf = Workflow("Loose").flow(
        {
            START: lambda ctx: "Make",
            "Make": lambda ctx: Next("Fan", output=loose()),
            "Fan": lambda ctx: Parallel([loose_branch], "Look"),
            "Look": look,
            "Again": again,
        }
    )
    async with WorkflowRunner(wf, store=store) as runner:
        handle = await runner.run()
        await wait_status(handle, RunStatus.WAITING)
    async with WorkflowRunner(wf, store=store) as other:  # a runner that reloads the run
        result = await asyncio.wait_for((await other.approve(handle.run_id, by="ops")).result(), BOUND)
    assert seen == [repr((LOOSE_JSON, LOOSE_JSON))] * 2
    assert result.output == LOOSE_JSON
    assert result.step_results["Make"] == LOOSE_JSON == result.step_results["loose_branch"]


async def test_values_without_a_model_are_the_same_live_and_on_replay_in_imperative_mode(store) -> None:
    seen: list[str] = []

    async def main(ctx):
        made = await ctx.step("make", loose)
        branches = await ctx.parallel([loose_branch])
        seen.append(repr((made, branches)))
        await ctx.wait(GATE)
        seen.append(repr((made, branches)))
        return made

    wf = Workflow("LooseMain").execute(main)
    async with WorkflowRunner(wf, store=store) as runner:
        handle = await runner.run()
        await wait_status(handle, RunStatus.WAITING)
    async with WorkflowRunner(wf, store=store) as other:
        result = await asyncio.wait_for((await other.approve(handle.run_id, by="ops")).result(), BOUND)
    assert seen == [repr((LOOSE_JSON, [LOOSE_JSON]))] * 3  # live, then replayed twice
    assert result.output == LOOSE_JSON


async def test_a_branch_referenced_as_module_fn_comes_back_typed_after_a_reload(store) -> None:
    wf = Workflow("ModuleBranch").flow(
        {
            START: lambda ctx: Parallel([sample_workflows.piece], "Gate"),
            "Gate": lambda ctx: Wait(GATE, "Check"),
            "Check": lambda ctx: Next(END, output=type(ctx.step_results["piece"]).__name__),
        }
    )
    async with WorkflowRunner(wf, store=store) as runner:
        handle = await runner.run()
        await wait_status(handle, RunStatus.WAITING)
    async with WorkflowRunner(wf, store=store) as other:
        result = await asyncio.wait_for((await other.approve(handle.run_id, by="ops")).result(), BOUND)
    assert result.output == "Piece"
    assert result.step_results["piece"] == sample_workflows.Piece(name="bolt", size=3)


# -- events and errors -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["completed", "failed", "stopped", "waiting"])
async def test_emit_of_a_lifecycle_kind_is_refused_and_watchers_go_on(kind) -> None:
    refused: list[str] = []
    release = asyncio.Event()

    def first(ctx):
        try:
            ctx.emit(kind, {"fake": True})
        except AgentflowError as exc:
            refused.append(str(exc))
        ctx.emit("progress", {"done": 1})
        return "Later"

    async def later(ctx):
        await release.wait()
        return Next(END, output="real end")

    async with WorkflowRunner(Workflow("Emit").flow({START: first, "Later": later})) as runner:
        handle = await runner.run()
        watching = asyncio.create_task(all_events(handle))
        await asyncio.sleep(0.05)
        assert not watching.done(), "the watcher stopped before the run ended"
        release.set()
        events = await asyncio.wait_for(watching, BOUND)
        assert (await handle.result()).output == "real end"
    assert refused and repr(kind) in refused[0]
    kinds = [e.kind for e in events]
    assert "progress" in kinds and kinds[-1] == "completed"
    assert all(e.data != {"fake": True} for e in events)


KEY = "sk-proj-" + "Zx8Qw2Lk5Vb7Nm4Tr6Yp1Hs3"
TOKEN = "eyJhbGciOiJIUzI1NiJ9." + "c2VjcmV0LXRva2Vu"


async def test_a_step_error_that_quotes_a_key_is_stored_redacted(store) -> None:
    @step(retry=RetryPolicy(max_attempts=2, initial_delay=0.01))
    def call_provider(ctx):
        raise RuntimeError(
            f"HTTP 401: Incorrect API key provided: {KEY}. Request had Authorization: Bearer {TOKEN}"
        )

    wf = Workflow("Leak").flow({START: call_provider})
    async with WorkflowRunner(wf, store=store) as runner:
        handle = await runner.run()
        with pytest.raises(RunFailedError) as live:
            await asyncio.wait_for(handle.result(), BOUND)
    async with WorkflowRunner(wf, store=store) as other:
        reloaded = await other.attach(handle.run_id)
        with pytest.raises(RunFailedError) as stored:
            await reloaded.result(timeout=BOUND)
        info = await reloaded.info()
        events = await all_events(reloaded)
    texts = [
        str(live.value),
        live.value.message,
        live.value.traceback,
        str(stored.value),
        stored.value.traceback,
        repr(info.error),
        *(repr(e.data) for e in events),
    ]
    for text in texts:
        assert KEY not in text and TOKEN not in text and "Zx8Qw2" not in text, text
    assert "[redacted]" in stored.value.message and "Incorrect API key provided" in stored.value.message
    failures = [e for e in events if e.kind in ("step_failed", "failed")]
    assert len(failures) == 3  # the retried attempt, the last one, the run
    assert all("[redacted]" in e.data["message"] for e in failures)
