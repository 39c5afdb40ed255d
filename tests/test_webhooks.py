"""Webhooks (SPEC §15): approval_pending / approval_decided reach a real receiver (Starlette
under uvicorn on a free loopback port), signed, retried with backoff on 5xx, not on 4xx,
and never slowing a run down when the receiver is down."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn
from conftest import free_port
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from agentflow import (
    END,
    START,
    Agent,
    HumanApproval,
    Next,
    Run,
    RunStatus,
    Wait,
    Webhook,
    Worker,
    Workflow,
    WorkflowDefinitionError,
    WorkflowRunner,
    tool,
)
from agentflow.stores.contract import Store
from agentflow.testing import ScriptedProvider, call
from agentflow.types import Approval
from agentflow.webhooks import WebhookSender, delivery_id, sign, verify

SECRET = "s3cret-for-tests"


# -- the receiver ---------------------------------------------------------------


@dataclass
class Received:
    at: float  # time.monotonic() when it arrived
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> dict[str, Any]:
        return dict(json.loads(self.body))


@dataclass
class Receiver:
    """An HTTP server recording every POST; ``answers`` are the status codes of the next replies."""

    port: int = field(default_factory=free_port)
    requests: list[Received] = field(default_factory=list)
    answers: list[int] = field(default_factory=list)
    retry_after: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def _hook(self, request: Request) -> Response:
        body = await request.body()
        with self._lock:
            self.requests.append(Received(time.monotonic(), dict(request.headers), body))
            status = self.answers.pop(0) if self.answers else 200
        headers = {"Retry-After": self.retry_after} if self.retry_after and status != 200 else None
        return Response(status_code=status, headers=headers)

    def events(self) -> list[tuple[str, str]]:
        """(type, approval id) of each request, in arrival order."""
        with self._lock:
            return [(r.json["type"], r.json["approval"]["id"]) for r in self.requests]

    async def until(self, n: int, timeout: float = 10.0) -> list[Received]:
        """The requests once ``n`` have arrived."""
        deadline = time.monotonic() + timeout
        while len(self.requests) < n:
            assert time.monotonic() < deadline, (
                f"{len(self.requests)} of {n} requests arrived: {self.events()}"
            )
            await asyncio.sleep(0.01)
        with self._lock:
            return list(self.requests)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver()
    app = Starlette(routes=[Route("/hook", rec._hook, methods=["POST"])])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=rec.port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="webhook-receiver", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the receiver did not start"
        time.sleep(0.01)
    try:
        yield rec
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def silent() -> Iterator[str]:
    """The URL of a server that accepts connections and never answers (a receiver that hangs)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/hook"
    finally:
        sock.close()


# -- workflows --------------------------------------------------------------------


def gate_flow(
    webhooks: list[Webhook] | None = None, timeout: float | None = None, name: str = "Review"
) -> Workflow:
    def draft(ctx: Any) -> Wait:
        gate = HumanApproval(
            approvers=["alice"], prompt="Publish this?", context={"draft": "v1"}, timeout=timeout
        )
        return Wait(gate, "Publish")

    wf = Workflow(name).flow({START: draft, "Publish": lambda ctx: Next(END, output="published")})
    return wf.persistence(store="memory", webhooks=webhooks or ()) if webhooks is not None else wf


@tool(approval=HumanApproval(approvers=["ops-lead"], prompt="Deploy this version?"))
async def deploy(version: str) -> dict[str, Any]:
    """Deploy a version to production."""
    return {"deployed": version}


def tool_flow(model: ScriptedProvider, *tools: Any, name: str = "Ship") -> Workflow:
    async def ship(ctx: Any) -> Next:
        async with ctx.agents.ops as ops:
            run = await ops.run("Ship 1.2")
        return Next(END, output=run.text)

    return (
        Workflow(name)
        .flow({START: lambda ctx: "Ship", "Ship": ship})
        .agents({"ops": Agent(provider=model, model="m", tools=list(tools or [deploy]))})
    )


async def parked(runner: WorkflowRunner) -> tuple[str, Approval]:
    handle = await runner.run()
    info = await handle.wait_for(RunStatus.WAITING, timeout=10)
    assert info.status == RunStatus.WAITING and info.pending is not None, info
    return handle.run_id, info.pending


@pytest.fixture
async def sender(receiver: Receiver) -> AsyncIterator[WebhookSender]:
    """A sender to ``receiver`` with short backoff (0.2 s, doubling), closed after the test."""
    out = WebhookSender([Webhook(receiver.url, SECRET, attempts=4)], backoff=0.2)
    yield out
    await out.close(timeout=5)


# -- what a receiver gets -----------------------------------------------------------


async def test_a_gate_approved_through_the_runner_is_announced_pending_then_decided(
    receiver: Receiver, store: Store
) -> None:
    # The runner attaches a sender itself for the persistence's webhooks; close() drains it.
    wf = gate_flow([Webhook(receiver.url, SECRET)])
    async with WorkflowRunner(wf, store=store) as runner:
        run_id, approval = await parked(runner)
        (first,) = await receiver.until(1)
        await runner.approve(run_id, by="alice", comment="ship it")
        assert (await (await runner.attach(run_id)).result(timeout=10)).output == "published"
        pending, decided = await receiver.until(2)
    assert receiver.events() == [("approval_pending", approval.id), ("approval_decided", approval.id)]
    assert first is pending

    body = pending.json
    assert body["type"] == "approval_pending" and body["decision"] is None and body["outcome"] is None
    assert (body["workflow"], body["run_id"]) == ("Review", run_id)
    assert body["approval"] == {**approval.to_json(), "votes": []}
    assert body["approval"]["prompt"] == "Publish this?" and body["approval"]["context"] == {"draft": "v1"}
    assert (
        body["id"] == pending.headers["x-agentflow-delivery"] == delivery_id("approval_pending", approval.id)
    )
    assert pending.headers["x-agentflow-event"] == "approval_pending"
    assert pending.headers["content-type"] == "application/json"

    body = decided.json
    assert body["type"] == "approval_decided" and body["outcome"] == "approved"
    assert body["decision"]["by"] == "alice" and body["decision"]["comment"] == "ship it"
    assert body["decision"]["approval"] == approval.id and body["approval"]["id"] == approval.id
    assert body["id"] == decided.headers["x-agentflow-delivery"] != pending.headers["x-agentflow-delivery"]
    assert body["at"] >= pending.json["at"]


async def test_the_signature_verifies_and_a_tampered_or_stale_delivery_does_not(receiver: Receiver) -> None:
    async with WorkflowRunner(gate_flow([Webhook(receiver.url, SECRET)])) as runner:
        await parked(runner)
        (got,) = await receiver.until(1)
    stamp = got.headers["x-agentflow-timestamp"]
    assert abs(int(stamp) - time.time()) < 60
    assert got.headers["x-agentflow-signature"] == sign(SECRET, stamp, got.body)
    assert got.headers["x-agentflow-signature"].startswith("sha256=")
    assert verify(SECRET, got.body, got.headers)
    assert verify(SECRET, got.body.decode(), {k.upper(): v for k, v in got.headers.items()})  # any case
    assert not verify(SECRET, got.body.replace(b"Publish", b"Publisx"), got.headers)  # tampered body
    assert not verify("another secret", got.body, got.headers)
    forged = {**got.headers, "x-agentflow-timestamp": str(int(stamp) + 1)}  # a replay with a new stamp
    assert not verify(SECRET, got.body, forged)
    assert not verify(SECRET, got.body, got.headers, now=int(stamp) + 301)  # stale
    assert verify(SECRET, got.body, got.headers, tolerance=600, now=int(stamp) + 301)
    assert not verify(SECRET, got.body, {"x-agentflow-timestamp": stamp})  # no signature


async def test_a_tool_call_approval_is_announced_with_its_tool_and_arguments(
    receiver: Receiver, sender: WebhookSender
) -> None:
    model = ScriptedProvider([call("deploy", version="1.2"), "Shipped 1.2."])
    async with WorkflowRunner(tool_flow(model)) as runner:
        sender.attach(runner)
        run_id, approval = await parked(runner)
        await runner.approve(run_id, by="ops-lead", data={"arguments": {"version": "1.3"}})
        assert (await (await runner.attach(run_id)).result(timeout=10)).output == "Shipped 1.2."
        pending, decided = await receiver.until(2)
    assert receiver.events() == [("approval_pending", approval.id), ("approval_decided", approval.id)]
    shown = pending.json["approval"]
    assert (shown["kind"], shown["tool"], shown["agent"], shown["arguments"]) == (
        "tool_call",
        "deploy",
        "ops",
        {"version": "1.2"},
    )
    assert shown["approvers"] == ["ops-lead"] and shown["run_id"] == run_id
    assert decided.json["outcome"] == "approved"
    assert decided.json["decision"]["data"] == {"arguments": {"version": "1.3"}}
    assert all(verify(SECRET, r.body, r.headers) for r in (pending, decided))


async def test_a_child_runs_approval_is_announced_by_the_parents_runner(
    receiver: Receiver, sender: WebhookSender
) -> None:
    child = gate_flow(name="Proofread")
    parent = Workflow("Issue").flow({START: lambda ctx: Run(child, None, "Done"), "Done": lambda ctx: END})
    async with WorkflowRunner(parent) as runner:
        sender.attach(runner)
        handle = await runner.run()
        (pending,) = await receiver.until(1)  # the child parked
        (approval,) = (await handle.info()).approvals
        assert approval.run_id != handle.run_id  # the child's
        await runner.approve(handle.run_id, by="alice", approval=approval.id)
        await handle.result(timeout=10)
        _, decided = await receiver.until(2)
    assert receiver.events() == [("approval_pending", approval.id), ("approval_decided", approval.id)]
    assert (pending.json["workflow"], pending.json["run_id"]) == ("Proofread", approval.run_id)
    assert decided.json["run_id"] == approval.run_id and decided.json["outcome"] == "approved"


async def test_a_rejection_and_a_timeout_are_decided_with_their_outcome(
    receiver: Receiver, sender: WebhookSender
) -> None:
    async with WorkflowRunner(gate_flow(timeout=0.3)) as runner:
        sender.attach(runner)
        rejected, a = await parked(runner)
        await runner.reject(rejected, by="alice", reason="not yet")
        expired, b = await parked(runner)
        assert (
            await (await runner.attach(expired)).wait_for(RunStatus.EXPIRED, timeout=10)
        ).status == "expired"
        await receiver.until(4)
    bodies = {(r.json["type"], r.json["approval"]["id"]): r.json for r in receiver.requests}
    assert set(bodies) == {(e, x.id) for e in ("approval_pending", "approval_decided") for x in (a, b)}
    no = bodies["approval_decided", a.id]
    assert no["outcome"] == "rejected" and no["decision"]["comment"] == "not yet" and no["run_id"] == rejected
    late = bodies["approval_decided", b.id]
    assert late["outcome"] == "expired" and late["run_id"] == expired
    assert late["decision"]["timed_out"] is True and late["decision"]["by"] is None


@tool(approval=HumanApproval(approvers=["on-call"], timeout=0.3))
async def page(team: str) -> str:
    """Page a team."""
    return "paged"


async def test_a_tool_call_nobody_decides_in_time_is_decided_expired(
    receiver: Receiver, sender: WebhookSender
) -> None:
    model = ScriptedProvider([call("page", team="db"), "Nobody answered."])
    async with WorkflowRunner(tool_flow(model, page, name="Pager")) as runner:
        sender.attach(runner)
        run_id, approval = await parked(runner)
        assert (await (await runner.attach(run_id)).result(timeout=10)).output == "Nobody answered."
        _, decided = await receiver.until(2)
    assert receiver.events() == [("approval_pending", approval.id), ("approval_decided", approval.id)]
    assert decided.json["outcome"] == "expired" and decided.json["approval"]["tool"] == "page"
    assert decided.json["decision"]["timed_out"] is True


async def test_a_vote_short_of_the_quorum_decides_nothing_yet(
    receiver: Receiver, sender: WebhookSender
) -> None:
    def draft(ctx: Any) -> Wait:
        return Wait(HumanApproval(approvers=["alice", "bob"], quorum=2), "Publish")

    wf = Workflow("Quorum").flow({START: draft, "Publish": lambda ctx: END})
    async with WorkflowRunner(wf) as runner:
        sender.attach(runner)
        run_id, approval = await parked(runner)
        await runner.approve(run_id, by="alice")
        await receiver.until(1)
        await asyncio.sleep(0.3)
        assert receiver.events() == [("approval_pending", approval.id)]
        await runner.approve(run_id, by="bob")
        (_, decided) = await receiver.until(2)
    assert decided.json["decision"]["by"] == "bob" and decided.json["approval"]["votes"] == ["alice"]


async def test_with_workers_the_worker_announces_the_park_and_the_client_the_decision(
    receiver: Receiver, make_store: Any
) -> None:
    # Each process announces what it stores: the park in the worker that ran the step, the
    # decision in the client (the review page) that made it. Both have the workflow's webhooks.
    wf = gate_flow([Webhook(receiver.url, SECRET)])
    store = make_store("sqlite")
    worker = Worker(wf, store=store)
    serving = asyncio.create_task(worker.serve())
    try:
        async with WorkflowRunner(wf, store=store, execute=False) as client:
            handle = await client.run()
            info = await handle.wait_for(RunStatus.WAITING, timeout=10)
            assert info.pending is not None
            await receiver.until(1)  # from the worker
            await client.approve(handle.run_id, by="alice")
            assert (await handle.result(timeout=10)).output == "published"
            _, decided = await receiver.until(2)
    finally:
        await worker.close()
        await serving
    assert receiver.events() == [("approval_pending", info.pending.id), ("approval_decided", info.pending.id)]
    assert decided.json["outcome"] == "approved" and decided.json["run_id"] == handle.run_id


# -- delivery ----------------------------------------------------------------------


async def test_a_5xx_is_retried_with_growing_delays_until_delivered_once(receiver: Receiver) -> None:
    receiver.answers = [500, 503]
    sender = WebhookSender([Webhook(receiver.url, SECRET, events=("approval_pending",))], backoff=0.2)
    async with WorkflowRunner(gate_flow()) as runner:
        sender.attach(runner)
        _, approval = await parked(runner)
        first, second, third = await receiver.until(3)
        await sender.close()
    assert sender.statistics() == {"delivered": 1, "failed": 0, "dropped": 0, "queued": 0, "in_flight": 0}
    assert len(receiver.requests) == 3  # delivered once: no attempt after the 200
    ids = {r.headers["x-agentflow-delivery"] for r in (first, second, third)}
    assert ids == {delivery_id("approval_pending", approval.id)}  # one delivery, so receivers dedupe
    assert first.body == second.body == third.body
    assert all(verify(SECRET, r.body, r.headers) for r in (first, second, third))  # each signed anew
    waited = [second.at - first.at, third.at - second.at]
    assert 0.2 <= waited[0] < 3.0 and 0.4 <= waited[1] < 3.0, waited  # 0.2 s, then 0.4 s (+ jitter)


async def test_retry_after_is_honoured(receiver: Receiver) -> None:
    receiver.answers, receiver.retry_after = [429], "1"
    sender = WebhookSender([Webhook(receiver.url, SECRET, events=("approval_pending",))], backoff=0.05)
    async with WorkflowRunner(gate_flow()) as runner:
        sender.attach(runner)
        await parked(runner)
        first, second = await receiver.until(2)
        await sender.close()
    assert second.at - first.at >= 0.95 and sender.delivered == 1


async def test_a_4xx_is_not_retried(receiver: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    receiver.answers = [400, 400]
    sender = WebhookSender([Webhook(receiver.url, SECRET, events=("approval_pending",))], backoff=0.05)
    async with WorkflowRunner(gate_flow()) as runner:
        sender.attach(runner)
        with caplog.at_level(logging.WARNING, logger="agentflow"):
            _, approval = await parked(runner)
            await receiver.until(1)
            await asyncio.sleep(0.5)  # a retry would have come after 0.05-0.1 s
            await sender.close()
    assert len(receiver.requests) == 1 and (sender.delivered, sender.failed) == (0, 1)
    assert any(
        "not retried: answered 400" in r.getMessage() and approval.id in r.getMessage()
        for r in caplog.records
    )


async def _twenty_runs(runner: WorkflowRunner) -> float:
    """Seconds for 20 runs to park at the gate, be approved and finish."""
    started = time.monotonic()
    for _ in range(20):
        run_id, _ = await parked(runner)
        await runner.approve(run_id, by="alice")
        assert (await (await runner.attach(run_id)).result(timeout=5)).output == "published"
    return time.monotonic() - started


async def test_runs_go_on_at_full_speed_while_the_receiver_hangs(silent: str) -> None:
    async with WorkflowRunner(gate_flow([])) as runner:
        alone = await _twenty_runs(runner)
    async with WorkflowRunner(gate_flow([Webhook(silent, SECRET, timeout=30.0)])) as runner:
        sender = runner._sender
        assert sender is not None
        hanging = await _twenty_runs(runner)
        stats = sender.statistics()
        assert stats["delivered"] == 0 and stats["in_flight"] + stats["queued"] == 40, stats
        started = time.monotonic()
        await sender.close(timeout=0.3)  # what runner.close() does, with 10 s
        assert time.monotonic() - started < 1.0 and sender.dropped == 40
    # Nothing waited for the receiver: as fast as without webhooks (the machine is noisy).
    assert hanging < max(2 * alone, alone + 0.5), (hanging, alone)


async def test_runs_finish_while_the_receiver_is_unreachable_and_close_gives_up_in_time() -> None:
    down = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens there: connections are refused
    sender = WebhookSender([Webhook(down, SECRET, attempts=100)], backoff=0.05, max_backoff=0.1)
    async with WorkflowRunner(gate_flow()) as runner:
        sender.attach(runner)
        run_id, _ = await parked(runner)
        await runner.approve(run_id, by="alice")
        assert (await (await runner.attach(run_id)).result(timeout=5)).status == RunStatus.COMPLETED
        await asyncio.sleep(0.3)  # a few attempts were refused meanwhile
        started = time.monotonic()
        await sender.close(timeout=0.5)
        assert 0.4 <= time.monotonic() - started < 1.5
    assert sender.statistics()["dropped"] == 2 and sender.delivered == 0


async def test_a_full_queue_drops_the_oldest_with_a_warning_and_never_blocks(
    silent: str, caplog: pytest.LogCaptureFixture
) -> None:
    sender = WebhookSender([Webhook(silent, SECRET)], queue_size=3, concurrency=1)
    approvals = [Approval(f"ap_{i}", "gate", f"run{i}", "Draft", ("alice",)) for i in range(6)]
    with caplog.at_level(logging.WARNING, logger="agentflow"):
        started = time.monotonic()
        for a in approvals:
            sender.pending("Review", a.run_id, [a])
        assert time.monotonic() - started < 0.5
        await asyncio.sleep(0.2)  # the first is taken into flight (and hangs there)
        for a in approvals[:2]:
            sender.pending("Review", a.run_id, [a])
        assert sender.statistics()["queued"] == 3 and sender.dropped >= 2
    dropped = [r.getMessage() for r in caplog.records if "dropped the oldest" in r.getMessage()]
    assert len(dropped) == 1 and "ap_0" in dropped[0] and sender.dropped == 4  # one line for a flood
    await sender.close(timeout=0.2)


async def test_a_listener_that_raises_fails_no_run(caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        def pending(self, *args: Any) -> None:
            raise RuntimeError("listener bug")

        def decided(self, *args: Any) -> None:
            raise RuntimeError("listener bug")

    async with WorkflowRunner(gate_flow()) as runner:
        runner.supervisor.listeners.append(Broken())
        with caplog.at_level(logging.ERROR, logger="agentflow"):
            run_id, _ = await parked(runner)
            await runner.approve(run_id, by="alice")
            assert (await (await runner.attach(run_id)).result(timeout=5)).output == "published"
    failed = [r.getMessage() for r in caplog.records if "approval listener failed" in r.getMessage()]
    assert len(failed) == 2 and all(run_id in m for m in failed)


# -- definition ----------------------------------------------------------------------


def test_a_wrong_webhook_is_refused_when_the_workflow_is_defined() -> None:
    wf = Workflow("W").flow({START: lambda ctx: END})
    for bad, what in [
        (Webhook("ftp://example.com/hook", SECRET), "http:// or https://"),
        (Webhook("not a url", SECRET), "http:// or https://"),
        (Webhook("https://example.com/hook", ""), "needs a secret"),
        (Webhook("https://example.com/hook", SECRET, events=("approval_maybe",)), "events must be"),
        (Webhook("https://example.com/hook", SECRET, attempts=0), "attempts"),
    ]:
        with pytest.raises(WorkflowDefinitionError, match=what):
            wf.persistence(store="memory", webhooks=[bad])
        with pytest.raises(WorkflowDefinitionError, match=what):
            WebhookSender([bad])
    hook = Webhook("https://example.com/hook", SECRET, events=["approval_decided"])  # type: ignore[arg-type]
    assert hook.events == ("approval_decided",) and SECRET not in repr(hook)
    assert wf.persistence(store="memory", webhooks=[hook]).compile().persistence.webhooks == (hook,)  # type: ignore[union-attr]
    assert wf.persistence(store="memory").compile().persistence.webhooks == ()  # type: ignore[union-attr]
