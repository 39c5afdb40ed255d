"""Durable runs across runners, processes and a Redis restart, on SQLite and Redis."""

from __future__ import annotations

import asyncio
import collections
import sys
import textwrap
import time
from pathlib import Path

import pytest
from pydantic import BaseModel
from test_crash import _finish, _kill, _lines, _spawn, _store, _target, _wait_for

from agentflow import (
    END,
    START,
    HumanApproval,
    Next,
    RunStatus,
    Wait,
    Workflow,
    WorkflowRunner,
    step,
)
from agentflow.stores.contract import Store

KINDS = ["sqlite", "redis"]


class Ticket(BaseModel):
    title: str


class Draft(BaseModel):
    text: str
    words: int


class Notes(BaseModel):
    drafts: int = 0


@step(output=Draft)
def write(ctx):
    ctx.set_state(drafts=ctx.state.drafts + 1)
    return Next("Review", output=Draft(text=f"notes for {ctx.input.title}", words=3))


def review_flow(persist: dict) -> Workflow:
    return (
        Workflow("Review")
        .input(Ticket)
        .state(Notes)
        .flow(
            {
                START: lambda ctx: "Write",
                "Review": lambda ctx: Wait(
                    HumanApproval(["editor"], context={"draft": ctx.step_results["Write"].text}),
                    "Publish",
                    on_reject="Write",
                ),
                "Write": write,
                # After a reload, the declared output comes back as a Draft, not a dict.
                "Publish": lambda ctx: Next(
                    END,
                    output={
                        "typed": type(ctx.step_results["Write"]).__name__,
                        "edited": ctx.decision.data,
                        "drafts": ctx.state.drafts,
                    },
                ),
            }
        )
        .persistence(**persist)
    )


def _persist(kind: str, target: str, **extra) -> dict:
    return {"store": kind, ("path" if kind == "sqlite" else "url"): target, **extra}


async def _until(handle, status, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while (info := await handle.info()).status != status:
        assert not info.status.is_final, f"run ended {info.status}: {info.error}"
        assert time.monotonic() < deadline, f"run stuck at {info.status}"
        await asyncio.sleep(0.01)
    return info


@pytest.mark.parametrize("kind", KINDS)
async def test_gate_decided_by_another_runner_after_the_first_closed(kind, tmp_path, request):
    target = _target(kind, tmp_path, request)
    async with WorkflowRunner(review_flow(_persist(kind, target))) as first:
        handle = await first.run({"title": "v2"})
        info = await _until(handle, RunStatus.WAITING)
        assert info.pending is not None and info.pending.context == {"draft": "notes for v2"}
    # Every process that touched the run is gone; a new one decides and carries it on.
    async with WorkflowRunner(review_flow(_persist(kind, target))) as second:
        waiting = await second.list_runs(status="waiting")
        assert [i.run_id for i in waiting] == [handle.run_id]
        resumed = await second.approve(handle.run_id, by="editor", data={"text": "edited"})
        result = await resumed.result(timeout=10)
    assert result.status == RunStatus.COMPLETED
    assert result.output == {"typed": "Draft", "edited": {"text": "edited"}, "drafts": 1}
    assert isinstance(result.step_results["Write"], Draft)
    assert isinstance(result.state, Notes)


@pytest.mark.parametrize("kind", KINDS)
async def test_gate_approved_from_a_separate_process(kind, tmp_path, request):
    target = _target(kind, tmp_path, request)
    async with WorkflowRunner(review_flow(_persist(kind, target))) as runner:
        handle = await runner.run({"title": "cli"})
        await _until(handle, RunStatus.WAITING)
        code = textwrap.dedent(
            f"""
            import asyncio, sys
            sys.path.insert(0, {str(Path(__file__).parent)!r})
            from test_durable import review_flow, _persist
            from agentflow import WorkflowRunner
            async def main():
                async with WorkflowRunner(review_flow(_persist({kind!r}, {target!r}))) as r:
                    h = await r.approve({handle.run_id!r}, by="editor", comment="ok")
                    res = await h.result(timeout=10)
                    print(res.status.value, res.output["drafts"])
            asyncio.run(main())
            """
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        assert out.decode().split() == ["completed", "1"]
        # The first process sees the outcome through the shared store.
        result = await handle.result(timeout=10)
        assert result.status == RunStatus.COMPLETED
        decided = [e async for e in handle.events() if e.kind == "decided"]
        assert decided[0].data["by"] == "editor" and decided[0].data["comment"] == "ok"


@pytest.mark.timeout(90)
async def test_runs_waiting_at_gates_survive_a_redis_restart(redis_server, redis_url):
    wf = review_flow(_persist("redis", redis_url))
    async with WorkflowRunner(wf) as runner:
        handles = [await runner.run({"title": f"t{i}"}) for i in range(5)]
        for h in handles:
            await _until(h, RunStatus.WAITING)
    redis_server.restart(kill=True)  # a crash: only the AOF (appendfsync always) remains
    async with WorkflowRunner(review_flow(_persist("redis", redis_url))) as runner:
        assert len(await runner.list_runs(status="waiting")) == 5
        for i, h in enumerate(handles):
            resumed = await runner.approve(h.run_id, by="editor")
            result = await resumed.result(timeout=10)
            assert result.output["drafts"] == 1, i


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", KINDS)
async def test_two_processes_recovering_at_once_advance_the_run_once(kind, tmp_path, request):
    target = _target(kind, tmp_path, request)
    log = tmp_path / "race.log"
    first = _spawn("start", "linear", kind, target, log, "race-1", block=True)
    _wait_for(log, lambda ls: ("start", "C", first.pid) in ls, first)
    _kill(first)
    racers = [_spawn("recover", "linear", kind, target, log, "race-1", block=False) for _ in range(2)]
    outs = [_finish(p) for p in racers]
    assert all("result completed" in o for o in outs)
    starts = collections.Counter(n for w, n, _ in _lines(log) if w == "start")
    assert starts == {"A": 1, "B": 1, "C": 2, "D": 1}
    owners = {pid for w, n, pid in _lines(log) if n == "D"}
    assert len(owners) == 1 and owners <= {p.pid for p in racers}


@pytest.mark.parametrize("kind", KINDS)
async def test_a_process_that_lost_its_lease_cannot_commit(kind, tmp_path, request, caplog):
    target = _target(kind, tmp_path, request)
    release = asyncio.Event()

    async def slow(ctx):
        await release.wait()
        ctx.set_state(drafts=99)
        return END

    wf = (
        Workflow("Lease").state(Notes).flow({START: slow}).persistence(**_persist(kind, target, lease_ttl=30))
    )
    async with WorkflowRunner(wf) as runner:
        handle = await runner.run()
        await asyncio.sleep(0.05)
        # Another owner takes the run over (as recover() would after an expiry).
        thief: Store = _store(kind, target)
        try:
            import dataclasses

            from agentflow.stores.contract import Change

            taken = await thief.update(
                handle.run_id,
                lambda r, now: Change(
                    dataclasses.replace(r, lease_owner="thief", lease_token=r.lease_token + 1)
                ),
            )
            assert taken is not None and taken.lease_owner == "thief"
            release.set()
            deadline = time.monotonic() + 10
            while "lease lost" not in caplog.text:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            # The run now belongs to the other owner: this process only follows it.
            with pytest.raises(TimeoutError):
                await handle.result(timeout=0.3)
            rec = await thief.get(handle.run_id)
        finally:
            await thief.close()
    assert rec is not None
    assert rec.status == RunStatus.RUNNING and rec.lease_owner == "thief"
    assert rec.state == {"drafts": 0}  # the old owner's step was not committed


@pytest.mark.timeout(60)
async def test_redis_down_at_a_commit_does_not_fail_the_run(tmp_path):
    """A store outage never fails a run: it waits at its last commit and goes on once Redis is back."""
    from conftest import RedisServer

    from agentflow.stores.redis import RedisStore

    server = RedisServer(tmp_path)
    server.start()
    try:
        gate = asyncio.Event()
        calls: list[str] = []

        async def first(ctx):
            ctx.set_state(drafts=1)
            return "Second"

        async def second(ctx):
            calls.append("second")
            await gate.wait()
            ctx.set_state(drafts=2)
            return END

        store = RedisStore(server.url, retry_for=1.0)  # the store gives up after 1 s; the run does not
        wf = Workflow("Down").state(Notes).flow({START: first, "Second": second})
        async with WorkflowRunner(wf, store=store) as runner:
            handle = await runner.run()
            await asyncio.sleep(0.1)
            server.stop()
            gate.set()
            await asyncio.sleep(3.0)  # three times the store's own retry budget
            info_task = asyncio.ensure_future(handle.result(timeout=30))
            await asyncio.sleep(0.2)
            assert not info_task.done(), "the run must wait for the store, not fail"
            server.start()
            result = await info_task
        await store.close()
    finally:
        server.stop(kill=True)
    assert result.status == RunStatus.COMPLETED and result.state.drafts == 2
    assert calls == ["second"], "the step in flight ran once"


@pytest.mark.parametrize("kind", KINDS)
async def test_pause_resume_and_stop_from_another_runner(kind, tmp_path, request):
    target = _target(kind, tmp_path, request)
    ran: list[str] = []

    async def tick(ctx):
        ran.append(ctx.step_name)
        await asyncio.sleep(0.05)
        ctx.set_state(drafts=ctx.state.drafts + 1)
        return "Tick"

    def flow() -> Workflow:
        wf = Workflow("Ticker").state(Notes).flow({START: tick, "Tick": tick})
        return wf.persistence(**_persist(kind, target, lease_ttl=3))

    async with WorkflowRunner(flow()) as owner, WorkflowRunner(flow()) as other:
        handle = await owner.run()
        await asyncio.sleep(0.15)
        remote = await other.attach(handle.run_id)
        await remote.pause()  # delivered through the store, acted on at the owner's next commit
        info = await remote.info()
        assert info.status == RunStatus.PAUSED
        count = len(ran)
        await asyncio.sleep(0.2)
        assert len(ran) == count  # nothing runs while paused
        await remote.resume()  # continues in the process that resumed it
        await asyncio.sleep(0.15)
        assert len(ran) > count
        assert (await remote.info()).status == RunStatus.RUNNING
        await handle.stop()  # the original process stops a run another process now owns
        assert (await remote.info()).status == RunStatus.STOPPED
        stopped_at = len(ran)
        await asyncio.sleep(0.2)
        assert len(ran) == stopped_at
        kinds = [e.kind async for e in remote.events()]
    assert kinds.count("paused") == 1 and kinds.count("resumed") == 1 and kinds[-1] == "stopped"


async def test_redis_url_from_the_environment_ttl_and_delete(redis_url, monkeypatch):
    monkeypatch.setenv("REDIS_URL", redis_url)
    wf = Workflow("Env").flow({START: lambda ctx: Next(END, output=1)}).persistence(store="redis", ttl=0.5)
    gated = (
        Workflow("EnvGate")
        .flow({START: lambda ctx: Wait(HumanApproval(["ops"]), END)})
        .persistence(store="redis", key_prefix="gated:")
    )
    async with WorkflowRunner(wf) as runner, WorkflowRunner(gated) as gate_runner:
        handle = await runner.run()
        assert (await handle.result(timeout=10)).output == 1
        assert [i.run_id for i in await runner.list_runs()] == [handle.run_id]
        await asyncio.sleep(0.8)
        assert await runner.list_runs() == []  # finished runs expire after ttl
        parked = await gate_runner.run()
        await _until(parked, RunStatus.WAITING)
        assert await gate_runner.delete(parked.run_id) is True
        assert await gate_runner.list_runs() == []
        assert await gate_runner.delete(parked.run_id) is False
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url)
    try:
        keys = [k.decode() async for k in client.scan_iter()]
    finally:
        await client.aclose()
    assert all(k.startswith("gated:") for k in keys if "EnvGate" in k or "gated" in k)
    assert not any(parked.run_id in k for k in keys)  # delete removed every key of the run


async def test_delete_refuses_a_running_run(tmp_path):
    release = asyncio.Event()

    async def slow(ctx):
        await release.wait()
        return END

    wf = Workflow("Del").flow({START: slow}).persistence(store="sqlite", path=str(tmp_path / "d.db"))
    async with WorkflowRunner(wf) as runner:
        handle = await runner.run()
        await asyncio.sleep(0.02)
        from agentflow import InvalidStateError

        with pytest.raises(InvalidStateError):
            await runner.delete(handle.run_id)
        release.set()
        await handle.result(timeout=5)
        assert await runner.delete(handle.run_id) is True


class Summary(BaseModel):
    title: str
    drafts: int


@pytest.mark.parametrize("kind", KINDS)
async def test_run_output_comes_back_as_its_model_in_another_runner(kind, tmp_path, request):
    target = _target(kind, tmp_path, request)

    def flow() -> Workflow:
        return (
            Workflow("Typed")
            .input(Ticket)
            .state(Notes)
            .output(Summary)
            .flow(
                {
                    START: lambda ctx: Wait(HumanApproval(["ed"]), "Done"),
                    "Done": lambda ctx: Next(END, output={"title": ctx.input.title, "drafts": 2}),
                }
            )
            .persistence(**_persist(kind, target))
        )

    async with WorkflowRunner(flow()) as first:
        handle = await first.run({"title": "typed"})
        await _until(handle, RunStatus.WAITING)
        await first.approve(handle.run_id, by="ed")
        await handle.result(timeout=10)
    async with WorkflowRunner(flow()) as second:
        result = await (await second.attach(handle.run_id)).result(timeout=10)
    assert result.output == Summary(title="typed", drafts=2)
    assert isinstance(result.state, Notes)


async def test_a_stored_state_that_no_longer_fits_raises_corrupt_record(tmp_path):
    import sqlite3

    from agentflow import CorruptRecordError

    path = str(tmp_path / "c.db")
    async with WorkflowRunner(review_flow(_persist("sqlite", path))) as runner:
        handle = await runner.run({"title": "x"})
        await _until(handle, RunStatus.WAITING)
    with sqlite3.connect(path) as db:
        # A short state lives in the run's own row (long ones in agentflow_values).
        db.execute(
            "UPDATE agentflow_runs SET state = ? WHERE run_id = ?", ('{"drafts": "many"}', handle.run_id)
        )
    async with WorkflowRunner(review_flow(_persist("sqlite", path))) as runner:
        with pytest.raises(CorruptRecordError) as info:  # an IncompatibleRunError
            await runner.approve(handle.run_id, by="editor")
        parked = await handle_info(runner, handle.run_id)
    assert handle.run_id in str(info.value) and "state" in str(info.value)
    # Not half-resumed: no decision is recorded, the run stays waiting with the reason on it.
    assert parked.status == RunStatus.WAITING and parked.decisions == ()
    assert parked.error["type"] == "IncompatibleRunError" and parked.error["field"] == "drafts"


async def handle_info(runner, run_id):
    return await (await runner.attach(run_id)).info()


async def test_run_id_of_another_workflow_is_refused(tmp_path):
    from agentflow import AgentflowError

    persist = _persist("sqlite", str(tmp_path / "ids.db"))
    one = Workflow("One").flow({START: lambda ctx: END}).persistence(**persist)
    two = Workflow("Two").flow({START: lambda ctx: END}).persistence(**persist)
    async with WorkflowRunner(one) as first, WorkflowRunner(two) as second:
        await (await first.run(run_id="shared")).result(timeout=5)
        again = await first.run(run_id="shared")  # idempotent: the same run, nothing new
        assert (await again.info()).status == RunStatus.COMPLETED
        with pytest.raises(AgentflowError, match="belongs to workflow 'One'"):
            await second.run(run_id="shared")
