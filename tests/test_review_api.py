"""The review page over HTTP: ``create_app`` served by a real uvicorn on a free loopback
port, spoken to with httpx, over the memory, SQLite and Redis stores.

The runs are started in this process on the served store; the reviewers sign in with
tokens from ``Reviewers.add`` and decide on the page (forms, with the session's CSRF
token) or through the JSON API (a bearer token). What was recorded is read back from the
runs themselves: a refused decision must leave nothing behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from conftest import StoreFactory, free_port
from pydantic import BaseModel, Field
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route

from agentflow import (
    END,
    START,
    Agent,
    HumanApproval,
    Next,
    Run,
    RunStatus,
    Steward,
    Wait,
    Workflow,
    step,
    tool,
)
from agentflow.agents import ProviderReply, ProviderRequest, ToolUse
from agentflow.cli import main as cli_main
from agentflow.review import HeaderAuth, TokenAuth, create_app
from agentflow.review.app import CSP
from agentflow.review.reviewers import Reviewers
from agentflow.runner import WorkflowRunner
from agentflow.stores import SqliteStore
from agentflow.stores.contract import Store
from agentflow.testing import ScriptedProvider
from agentflow.types import Approval, RunInfo, Webhook
from agentflow.webhooks import verify
from agentflow.worker import Worker

#: What an agent wrote, as a reviewer must see it: text, never markup that runs.
PAYLOAD = (
    "Draft.\n\n<script>alert(1)</script>\n\n<img src=x onerror=alert(1)>\n\n"
    "A [click](javascript:alert(1)) link."
)


# -- the workflows served -----------------------------------------------------------------


class Edit(BaseModel):
    title: str = Field(min_length=3)
    priority: int = Field(ge=1, le=5)


def _publish(ctx: Any) -> Next:
    return Next(END, output={"title": ctx.decision.data.title, "by": ctx.decision.by})


def _ask(ctx: Any) -> Wait:
    gate = HumanApproval(
        ["alice"],
        prompt="Publish <b>these</b> notes?",
        context={"title": "Release 2.0", "priority": 2, "notes": PAYLOAD, "<img src=x onerror=alert(2)>": 1},
        form=Edit,
    )
    return Wait(gate, "Publish")


def _triage(ctx: Any) -> Wait:
    return Wait(HumanApproval(["alice"], prompt=f"Let {ctx.input} through?", context=ctx.input), "Through")


@tool(approval=HumanApproval(["alice"], prompt="Run this deploy?"))
def deploy(version: str, environment: str = "staging") -> dict[str, str]:
    """Deploy a version."""
    return {"deployed": version, "to": environment}


def _operator(request: ProviderRequest) -> ProviderReply:
    results = [m for m in request.messages if m.role == "tool"]
    if not results:
        return ProviderReply("Deploying 2.0.", tool_calls=(ToolUse("c1", "deploy", {"version": "2.0"}),))
    return ProviderReply(f"deploy said: {results[-1].content}")


async def _ship(ctx: Any) -> Next:
    async with ctx.agents.ops as ops:
        run = await ops.run("Ship 2.0")
    return Next(END, output={"text": run.text, "arguments": [c.arguments for c in run.tool_calls]})


def workflows(store: Store) -> dict[str, Workflow]:
    return {
        "Notes": Workflow("Notes")
        .flow({START: step(_ask, form=Edit), "Publish": _publish})
        .persistence(store=store),
        "Triage": Workflow("Triage")
        .flow({START: _triage, "Through": lambda ctx: Next(END, output=ctx.decision.by)})
        .persistence(store=store),
        "Ship": Workflow("Ship")
        .flow({START: _ship})
        .agents({"ops": Agent(provider=ScriptedProvider([_operator] * 100), model="m", tools=[deploy])})
        .persistence(store=store),
    }


def steward_of(flows: dict[str, Workflow]) -> Steward:
    """A steward serving each of ``flows``."""
    steward = Steward()
    for wf in flows.values():
        steward.register(wf)
    return steward


# -- the served page ----------------------------------------------------------------------


class Served:
    """The app on ``url``, the runners that start runs on its store, and reviewer tokens."""

    def __init__(self, url: str, store: Store, flows: dict[str, Workflow]) -> None:
        self.url, self.store, self.flows = url, store, flows
        self.runners = {name: WorkflowRunner(wf) for name, wf in flows.items()}
        self._tokens: dict[str, str] = {}

    async def token(self, name: str) -> str:
        """``name``'s token (made on first use: argon2 takes its time, by design)."""
        if name not in self._tokens:
            self._tokens[name] = await Reviewers(self.store).add(name)
        return self._tokens[name]

    async def park(self, workflow: str, input: Any = None) -> Approval:
        """Start a run of ``workflow`` and return the approval it waits for."""
        handle = await self.runners[workflow].run(input)
        info = await handle.wait_for(RunStatus.WAITING, timeout=10)
        assert info.status == RunStatus.WAITING and info.pending is not None, info
        return info.pending

    async def info(self, run_id: str, workflow: str = "Notes") -> RunInfo:
        return await (await self.runners[workflow].attach(run_id)).info()

    async def settled(self, run_id: str, workflow: str) -> RunInfo:
        handle = await self.runners[workflow].attach(run_id)
        return await handle.wait_for(RunStatus.COMPLETED, RunStatus.WAITING, timeout=10)

    def client(self, **headers: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=10)

    async def close(self) -> None:
        for runner in self.runners.values():
            await runner.close()


async def serve(app: Any) -> tuple[str, Callable[[], Any]]:
    """``app`` under uvicorn on a free loopback port: its URL, and how to stop it."""
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", timeout_graceful_shutdown=2
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)

    async def stop() -> None:
        server.should_exit = True
        await asyncio.wait_for(task, 10)

    return f"http://127.0.0.1:{port}", stop


@pytest.fixture(params=["sqlite"])
async def served(request: pytest.FixtureRequest, make_store: StoreFactory) -> AsyncIterator[Served]:
    """The page over a fresh store (SQLite; memory and Redis where a test asks), alice and mallory."""
    store = make_store(request.param)
    flows = workflows(store)
    steward = steward_of(flows)
    url, stop = await serve(create_app(steward, auth=TokenAuth(attempts=5)))
    page = Served(url, store, flows)
    try:
        yield page
    finally:
        await stop()
        await page.close()


every_store = pytest.mark.parametrize("served", ["memory", "sqlite", "redis"], indirect=True)

_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def csrf_of(html: str) -> str:
    found = _CSRF.search(html)
    assert found is not None, html[:500]
    return found.group(1)


async def sign_in(client: httpx.AsyncClient, token: str) -> str:
    """Sign ``client`` in with ``token``; the session's CSRF token."""
    page = await client.get("/signin")
    reply = await client.post("/signin", data={"csrf": csrf_of(page.text), "token": token, "next": "/"})
    assert reply.status_code == 303 and reply.headers["location"] == "/", reply.text
    inbox = await client.get("/")
    assert inbox.status_code == 200
    return csrf_of(inbox.text)


def decide_path(a: Approval, action: str) -> str:
    return f"/runs/{a.run_id}/approvals/{a.id}/{action}"


def field_errors(html: str) -> dict[str, str]:
    return dict(re.findall(r'class="field-error" data-field="([^"]*)"[^>]*>([^<]*)<', html))


# -- signing in -----------------------------------------------------------------------------


@every_store
async def test_a_reviewer_signs_in_with_a_token_and_out_again(served: Served) -> None:
    async with served.client() as c:
        reply = await c.get("/?kind=gate")
        assert reply.status_code == 303 and reply.headers["location"] == "/signin?next=%2F%3Fkind%3Dgate"
        assert (await c.get("/api/me")).status_code == 401
        page = await c.get("/signin")
        cookie = page.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=lax" in cookie and "secure" not in cookie
        bad = await c.post(
            "/signin", data={"csrf": csrf_of(page.text), "token": "af_0000000000000000_" + "x" * 43}
        )
        assert bad.status_code == 401 and "not valid" in bad.text
        csrf = await sign_in(c, await served.token("alice"))
        assert (await c.get("/api/me")).json() == {"reviewer": "alice"}
        again = await c.get("/signin", params={"next": "/runs/x"})
        assert again.status_code == 303 and again.headers["location"] == "/runs/x"
        for elsewhere in ("//evil.example/", "https://evil.example/", "/\t/evil.example"):
            page = await c.get("/signin", params={"next": elsewhere})
            assert page.headers["location"] == "/"  # no open redirect
        assert (await c.post("/signout", data={"csrf": csrf})).status_code == 303
        assert (await c.get("/")).status_code == 303


async def test_signing_out_ends_every_copy_of_the_session_cookie(served: Served) -> None:
    async with served.client() as c:
        csrf = await sign_in(c, await served.token("alice"))
        copied = dict(c.cookies)  # taken before signing out, as a stolen cookie would be
        assert (await c.post("/signout", data={"csrf": csrf})).status_code == 303
    async with served.client() as thief:
        thief.cookies.update(copied)
        assert (await thief.get("/api/me")).status_code == 401
        reply = await thief.get("/")
        assert reply.status_code == 303 and reply.headers["location"].startswith("/signin")


async def test_a_revoked_token_ends_its_session_at_the_next_request(served: Served) -> None:
    async with served.client() as c:
        await sign_in(c, await served.token("alice"))
        assert (await Reviewers(served.store).remove("alice")) == 1
        reply = await c.get("/")
        assert reply.status_code == 303 and reply.headers["location"].startswith("/signin")
    async with served.client(authorization=f"Bearer {await served.token('alice')}") as bot:
        assert (await bot.get("/api/me")).status_code == 401


async def test_failed_sign_ins_are_rate_limited_per_client(served: Served) -> None:
    token = await served.token("alice")
    for _ in range(6):  # more sign-ins than the limit of failures: those that succeed do not count
        async with served.client() as c:
            await sign_in(c, token)
    async with served.client() as c:
        csrf = csrf_of((await c.get("/signin")).text)
        codes = [
            (await c.post("/signin", data={"csrf": csrf, "token": f"wrong{i}"})).status_code for i in range(6)
        ]
        assert codes == [401] * 5 + [429]
        late = await c.post("/signin", data={"csrf": csrf, "token": token})
        assert late.status_code == 429 and int(late.headers["retry-after"]) >= 1


async def test_a_post_without_the_sessions_csrf_token_is_refused_and_records_nothing(served: Served) -> None:
    a = await served.park("Triage", "x")
    async with served.client() as c:
        csrf = await sign_in(c, await served.token("alice"))
        for data in ({}, {"csrf": "forged"}):
            reply = await c.post(decide_path(a, "approve"), data=data)
            assert reply.status_code == 403
        # A cookie-holding client of the API needs the header too.
        api = f"/api/runs/{a.run_id}/approvals/{a.id}"
        assert (await c.post(api, json={"action": "approve"})).status_code == 403
        info = await served.info(a.run_id, "Triage")
        assert info.status == RunStatus.WAITING and info.decisions == ()
        ok = await c.post(api, json={"action": "approve"}, headers={"X-CSRF-Token": csrf})
        assert ok.status_code == 200, ok.text


# -- deciding on the page ------------------------------------------------------------------


@every_store
async def test_an_invalid_edit_is_refused_by_field_and_the_fixed_one_continues_the_run(
    served: Served,
) -> None:
    a = await served.park("Notes")
    async with served.client() as c:
        csrf = await sign_in(c, await served.token("alice"))
        page = await c.get(f"/runs/{a.run_id}/approvals/{a.id}")
        assert page.status_code == 200
        assert 'id="approve-form"' in page.text and 'name="data.title" value="Release 2.0"' in page.text
        bad = await c.post(
            decide_path(a, "approve"), data={"csrf": csrf, "data.title": "ok", "data.priority": "many"}
        )
        assert bad.status_code == 422
        errors = field_errors(bad.text)
        assert set(errors) == {"title", "priority"} and "whole number" in errors["priority"]
        assert 'value="many"' in bad.text  # what the reviewer typed is shown again
        assert 'data-kind="waiting"' in bad.text  # and the run's history with it
        assert (await served.info(a.run_id)).decisions == ()
        out_of_range = await c.post(
            decide_path(a, "approve"), data={"csrf": csrf, "data.title": "Release 2.0", "data.priority": "9"}
        )
        assert out_of_range.status_code == 422 and set(field_errors(out_of_range.text)) == {"priority"}
        good = await c.post(
            decide_path(a, "approve"),
            data={"csrf": csrf, "data.title": "Release 2.0.1", "data.priority": "3", "comment": "ship it"},
        )
        assert good.status_code == 303 and good.headers["location"] == f"/runs/{a.run_id}"
        history = await c.get(good.headers["location"])
        assert 'id="flash"' in history.text and "Approved" in history.text
        info = await served.settled(a.run_id, "Notes")
        assert info.status == RunStatus.COMPLETED
        (d,) = info.decisions
        assert (d.by, d.approved, d.comment, d.data) == (
            "alice",
            True,
            "ship it",
            {"title": "Release 2.0.1", "priority": 3},
        )
        again = await c.post(
            decide_path(a, "approve"), data={"csrf": csrf, "data.title": "abc", "data.priority": "1"}
        )
        assert again.status_code == 409


async def test_a_rejection_records_the_reason_and_the_history_page_lists_it(served: Served) -> None:
    a = await served.park("Triage", "t1")
    async with served.client() as c:
        csrf = await sign_in(c, await served.token("alice"))
        reply = await c.post(decide_path(a, "reject"), data={"csrf": csrf, "reason": "not <yet>"})
        assert reply.status_code == 303
        info = await served.info(a.run_id, "Triage")
        assert info.status == RunStatus.REJECTED
        (d,) = info.decisions
        assert (d.by, d.approved, d.reason) == ("alice", False, "not <yet>")
        history = (await c.get(f"/runs/{a.run_id}")).text
        assert 'id="decisions"' in history and "not &lt;yet&gt;" in history and ">rejected<" in history


async def test_a_non_approver_sees_it_read_only_and_a_forged_decision_gets_403_recording_nothing(
    served: Served,
) -> None:
    a = await served.park("Notes")
    async with served.client() as c:
        csrf = await sign_in(c, await served.token("mallory"))
        page = (await c.get(f"/runs/{a.run_id}/approvals/{a.id}")).text
        assert 'id="read-only"' in page and "approve-form" not in page and "reject-form" not in page
        inbox = (await c.get("/")).text
        assert f'data-approval-id="{a.id}"' in inbox and 'name="item"' not in inbox  # listed, no checkbox
        for action, data in (("approve", {"data.title": "mine now", "data.priority": "1"}), ("reject", {})):
            reply = await c.post(decide_path(a, action), data={"csrf": csrf, **data})
            assert reply.status_code == 403
        bulk = await c.post("/bulk", data={"csrf": csrf, "action": "approve", "item": f"{a.run_id}:{a.id}"})
        assert bulk.status_code == 303
    async with served.client(authorization=f"Bearer {await served.token('mallory')}") as bot:
        api = await bot.post(
            f"/api/runs/{a.run_id}/approvals/{a.id}", json={"action": "approve", "by": "alice"}
        )
        assert api.status_code == 403
    info = await served.info(a.run_id)
    assert info.status == RunStatus.WAITING and info.decisions == () and info.pending is not None
    assert info.pending.votes == ()


async def test_a_tool_call_runs_with_the_arguments_the_reviewer_edited(served: Served) -> None:
    a = await served.park("Ship")
    assert a.kind == "tool_call"
    async with served.client() as c:
        csrf = await sign_in(c, await served.token("alice"))
        page = (await c.get(f"/runs/{a.run_id}/approvals/{a.id}")).text
        for part in ('id="tool"', 'id="arguments"', 'id="model-text"', 'id="respond-form"', "Deploying 2.0."):
            assert part in page
        assert 'name="data.version" value="2.0"' in page
        reply = await c.post(
            decide_path(a, "approve"),
            data={"csrf": csrf, "data.version": "2.1", "data.environment": "production"},
        )
        assert reply.status_code == 303, reply.text
    info = await served.settled(a.run_id, "Ship")
    assert info.status == RunStatus.COMPLETED
    assert info.decisions[0].data == {"arguments": {"version": "2.1", "environment": "production"}}
    result = await (await served.runners["Ship"].attach(a.run_id)).result(timeout=10)
    assert result.output["arguments"] == [{"version": "2.1", "environment": "production"}]
    assert "production" in result.output["text"]


async def test_a_tool_call_approved_with_its_arguments_as_shown_is_not_an_edit(served: Served) -> None:
    a = await served.park("Ship")
    assert a.arguments["version"] == "2.0"  # the model left environment to its default
    async with served.client() as c:
        csrf = await sign_in(c, await served.token("alice"))
        page = (await c.get(f"/runs/{a.run_id}/approvals/{a.id}")).text
        shown = dict(re.findall(r'name="(data\.\w+)" value="([^"]*)"', page))
        assert shown == {"data.version": "2.0", "data.environment": "staging"}
        reply = await c.post(decide_path(a, "approve"), data={"csrf": csrf, **shown})
        assert reply.status_code == 303
    info = await served.settled(a.run_id, "Ship")
    assert info.status == RunStatus.COMPLETED and info.decisions[0].data is None


async def test_a_tool_call_answered_with_a_result_does_not_run_the_tool(served: Served) -> None:
    a = await served.park("Ship")
    async with served.client() as c:
        csrf = await sign_in(c, await served.token("alice"))
        bad = await c.post(decide_path(a, "respond"), data={"csrf": csrf, "result": "{not json"})
        assert bad.status_code == 422 and "result" in field_errors(bad.text)
        reply = await c.post(
            decide_path(a, "respond"), data={"csrf": csrf, "result": '{"deployed": "by hand"}'}
        )
        assert reply.status_code == 303
    info = await served.settled(a.run_id, "Ship")
    assert info.status == RunStatus.COMPLETED and info.decisions[0].responded
    result = await (await served.runners["Ship"].attach(a.run_id)).result(timeout=10)
    assert "by hand" in result.output["text"]


async def test_bulk_approval_of_twenty_records_each_as_its_own_decision(served: Served) -> None:
    parked = await asyncio.gather(*(served.park("Triage", f"item {i}") for i in range(20)))
    async with served.client() as c:
        csrf = await sign_in(c, await served.token("alice"))
        inbox = (await c.get("/")).text
        assert inbox.count('name="item"') == 20 and 'id="bulk-approve"' in inbox
        items = [f"{a.run_id}:{a.id}" for a in parked]
        reply = await c.post("/bulk", data={"csrf": csrf, "action": "approve", "item": items})
        assert reply.status_code == 303
        assert "20 approved." in (await c.get("/")).text
        assert 'id="inbox-empty"' in (await c.get("/")).text
    infos = await asyncio.gather(*(served.settled(a.run_id, "Triage") for a in parked))
    for a, info in zip(parked, infos, strict=True):
        assert info.status == RunStatus.COMPLETED
        (d,) = info.decisions
        assert (d.by, d.approval) == ("alice", a.id)


async def test_bulk_rejection_gives_each_the_reason_and_lists_what_could_not_be_decided(
    served: Served,
) -> None:
    parked = await asyncio.gather(*(served.park("Triage", f"r{i}") for i in range(3)))
    mine = [f"{a.run_id}:{a.id}" for a in parked]
    async with served.client() as c:
        csrf = await sign_in(c, await served.token("alice"))
        items = [*mine, f"{parked[0].run_id}:ap_0000", "nope:ap_1"]  # not pending / no such run
        reply = await c.post(
            "/bulk", data={"csrf": csrf, "action": "reject", "reason": "dupes", "item": items}
        )
        assert reply.status_code == 303
        flash = (await c.get("/")).text
        assert "3 rejected. 2 could not be" in flash and "ap_0000" in flash
    for a in parked:
        info = await served.info(a.run_id, "Triage")
        assert info.status == RunStatus.REJECTED
        assert [(d.by, d.reason) for d in info.decisions] == [("alice", "dupes")]


# -- the inbox ----------------------------------------------------------------------------


async def test_the_inbox_pages_newest_first_and_filters(served: Served) -> None:
    triage = [await served.park("Triage", f"p{i}") for i in range(12)]
    notes = await served.park("Notes")
    ship = await served.park("Ship")
    newest_first = [ship, notes, *reversed(triage)]
    async with served.client(authorization=f"Bearer {await served.token('alice')}") as bot:
        seen: list[str] = []
        after = None
        pages = 0
        while True:
            params: dict[str, Any] = {"limit": 5, **({"after": after} if after else {})}
            body = (await bot.get("/api/approvals", params=params)).json()
            seen += [i["id"] for i in body["items"]]
            assert all(i["can_decide"] for i in body["items"])
            pages += 1
            after = body["next"]
            if after is None:
                break
        assert seen == [a.id for a in newest_first] and pages == 3

        async def ids(**params: Any) -> list[str]:
            reply = await bot.get("/api/approvals", params=params)
            assert reply.status_code == 200, reply.text
            return [i["id"] for i in reply.json()["items"]]

        assert await ids(workflow="Notes") == [notes.id]
        assert await ids(kind="tool_call") == [ship.id]
        assert await ids(age="1h") == []
        assert len(await ids(mine=1)) == 14
        assert (await bot.get("/api/approvals", params={"kind": "nope"})).status_code == 400
    async with served.client(authorization=f"Bearer {await served.token('mallory')}") as bot:
        assert (await bot.get("/api/approvals", params={"mine": 1})).json()["items"] == []
        everything = (await bot.get("/api/approvals")).json()["items"]
        assert len(everything) == 14 and not any(i["can_decide"] for i in everything)
    async with served.client() as c:
        await sign_in(c, await served.token("alice"))
        first = (await c.get("/", params={"workflow": "Triage"})).text
        assert first.count("<tr data-approval-id=") == 12 and 'id="next-page"' not in first
        fragment = (await c.get("/", params={"workflow": "Triage", "fragment": "1"})).text
        assert fragment.lstrip().startswith("<table") and "<html" not in fragment


async def test_the_inbox_shows_a_page_of_fifty_and_a_link_to_the_next(served: Served) -> None:
    await asyncio.gather(*(served.park("Triage", f"n{i}") for i in range(53)))
    async with served.client() as c:
        await sign_in(c, await served.token("alice"))
        first = (await c.get("/")).text
        assert first.count("<tr data-approval-id=") == 50
        link = re.search(r'id="next-page" href="([^"]+)"', first)
        assert link is not None
        second = (await c.get(link.group(1).replace("&amp;", "&"))).text
        assert second.count("<tr data-approval-id=") == 3
        ids = set(re.findall(r'<tr data-approval-id="([^"]+)"', first + second))
        assert len(ids) == 53


@pytest.mark.parametrize("served", ["memory", "redis"], indirect=True)
async def test_server_sent_events_tell_an_open_inbox_what_arrived_and_what_left(served: Served) -> None:
    async with served.client() as c:
        csrf = await sign_in(c, await served.token("alice"))
        async with c.stream("GET", "/events") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            lines = stream.aiter_lines()
            assert await anext(lines) == ": listening"

            async def next_change() -> dict[str, list[str]]:
                event = None
                async for line in lines:
                    if line.startswith("event:"):
                        event = line.split(":", 1)[1].strip()
                    elif line.startswith("data:") and event == "approvals":
                        return dict(json.loads(line.split(":", 1)[1]))
                raise AssertionError("the stream ended")

            a = await served.park("Triage", "live")
            change = await asyncio.wait_for(next_change(), 5)
            assert change == {"added": [a.id], "removed": []}
            decided = await c.post(
                f"/api/runs/{a.run_id}/approvals/{a.id}",
                json={"action": "approve"},
                headers={"X-CSRF-Token": csrf},
            )
            assert decided.status_code == 200
            change = await asyncio.wait_for(next_change(), 5)
            assert change == {"added": [], "removed": [a.id]}


# -- the JSON API ---------------------------------------------------------------------------


@every_store
async def test_the_api_decides_with_a_bearer_token_and_maps_errors(served: Served) -> None:
    a = await served.park("Notes")
    url = f"/api/runs/{a.run_id}/approvals/{a.id}"
    async with served.client(authorization=f"Bearer {await served.token('alice')}") as bot:
        got = (await bot.get(url)).json()
        assert got["approval"]["id"] == a.id and got["can_decide"] and got["run"]["status"] == "waiting"
        assert got["run"]["events"][0]["kind"] == "run_started"
        bad = await bot.post(url, json={"action": "approve", "data": {"title": "x", "priority": 1}})
        assert bad.status_code == 422 and set(bad.json()["errors"]) == {"title"}
        assert (await bot.post(url, json={"action": "maybe"})).status_code == 400
        ok = await bot.post(url, json={"action": "approve", "data": {"title": "Fine", "priority": 2}})
        assert ok.status_code == 200 and ok.json()["run_id"] == a.run_id
        assert (await bot.post(url, json={"action": "approve"})).status_code == 409
        info = await served.settled(a.run_id, "Notes")
        run = (await bot.get(f"/api/runs/{a.run_id}")).json()
        assert run["status"] == info.status.value == "completed"
        assert [(d["by"], d["approved"], d["data"]) for d in run["decisions"]] == [
            ("alice", True, {"title": "Fine", "priority": 2})
        ]
        assert (await bot.get("/api/runs/nope")).status_code == 404


# -- HeaderAuth, escaping, headers ----------------------------------------------------------


async def test_header_auth_refuses_requests_without_the_proxys_secret(make_store: StoreFactory) -> None:
    store = make_store("memory")
    steward = steward_of(workflows(store))
    url, stop = await serve(create_app(steward, auth=HeaderAuth("X-Forwarded-User", "s3cret")))
    try:
        a = await Served(url, store, workflows(store)).park("Triage", "h")
        async with httpx.AsyncClient(base_url=url) as c:
            assert (await c.get("/", headers={"X-Forwarded-User": "alice"})).status_code == 403
            wrong = {"X-Forwarded-User": "alice", "X-Agentflow-Secret": "s3cre"}
            assert (await c.get("/api/me", headers=wrong)).status_code == 403
            proxy = {"X-Forwarded-User": "alice", "X-Agentflow-Secret": "s3cret"}
            assert (await c.get("/api/me", headers=proxy)).json() == {"reviewer": "alice"}
            inbox = await c.get("/", headers=proxy)
            assert inbox.status_code == 200 and f'data-approval-id="{a.id}"' in inbox.text
            assert (await c.get("/signin", headers=proxy)).status_code == 303
            reply = await c.post(decide_path(a, "approve"), data={"csrf": csrf_of(inbox.text)}, headers=proxy)
            assert reply.status_code == 303
            assert (await c.post(decide_path(a, "approve"), headers=proxy)).status_code == 403  # no CSRF
    finally:
        await stop()


async def test_behind_https_the_session_cookie_is_secure(make_store: StoreFactory) -> None:
    steward = Steward()
    steward.register(workflows(make_store("memory"))["Triage"])
    url, stop = await serve(create_app(steward, https=True))
    try:
        async with httpx.AsyncClient(base_url=url) as c:
            cookie = (await c.get("/signin")).headers["set-cookie"].lower()
            assert "; secure" in cookie and "httponly" in cookie and "samesite=lax" in cookie
    finally:
        await stop()


async def test_markup_in_run_data_is_escaped_and_every_response_carries_the_csp(served: Served) -> None:
    a = await served.park("Notes")
    async with served.client() as c:
        signin = await c.get("/signin")
        await sign_in(c, await served.token("alice"))
        pages = [
            signin,
            await c.get("/"),
            await c.get(f"/runs/{a.run_id}/approvals/{a.id}"),
            await c.get(f"/runs/{a.run_id}"),
        ]
        for reply in pages:
            assert reply.headers["content-security-policy"] == CSP
            assert reply.headers["x-content-type-options"] == "nosniff"
            assert reply.headers["referrer-policy"] == "same-origin"
            html = reply.text
            assert len(re.findall(r"<script\b", html)) == 1 and '<script src="/static/review.js"' in html
            assert re.search(r"<[a-z][^>]*\son[a-z]+\s*=", html, re.I) is None  # no event handler attribute
            assert "javascript:" not in html.replace("javascript:alert(1))", "")  # only as text, never a link
            assert re.search(r"\bstyle\s*=", html) is None and "<style" not in html
        page = pages[2].text
        assert (
            "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;img src=x onerror=alert(2)&gt;" in page
        )
        assert "Publish &lt;b&gt;these&lt;/b&gt; notes?" in page
        assert 'href="javascript' not in page
        static = await c.get("/static/review.js")
        assert static.status_code == 200 and static.headers["content-security-policy"] == CSP


async def test_with_execute_false_a_decision_hands_the_run_to_a_worker(make_store: StoreFactory) -> None:
    store = make_store("sqlite")
    flows = workflows(store)
    steward = steward_of(flows)
    app = create_app(steward, execute=False)
    url, stop = await serve(app)
    page = Served(url, store, flows)
    worker = Worker(steward, concurrency=4, grace=1)
    serving = asyncio.create_task(worker.serve())
    try:
        assert all(not r.execute for r in app.state.review.desk.runners)
        a = await page.park("Triage", "to the worker")
        async with page.client(authorization=f"Bearer {await page.token('alice')}") as bot:
            reply = await bot.post(f"/api/runs/{a.run_id}/approvals/{a.id}", json={"action": "approve"})
            assert reply.status_code == 200 and reply.json()["status"] == "running"
        info = await page.settled(a.run_id, "Triage")
        assert info.status == RunStatus.COMPLETED and (await worker.statistics()).claimed == 1
    finally:
        await worker.close()
        await serving
        await stop()
        await page.close()


async def test_a_child_runs_approval_is_in_the_inbox_and_decided_on_the_child(
    make_store: StoreFactory,
) -> None:
    store = make_store("memory")
    child = (
        Workflow("Check")
        .flow({START: _triage, "Through": lambda ctx: Next(END, output=f"checked {ctx.input}")})
        .persistence(store=store)
    )
    parent = (
        Workflow("Release")
        .flow(
            {
                START: lambda ctx: Run(child, "the build", "Done"),
                "Done": lambda ctx: Next(END, output="released"),
            }
        )
        .persistence(store=store)
    )
    steward = Steward()
    steward.register(parent)  # the child is served as the parent's
    url, stop = await serve(create_app(steward))
    page = Served(url, store, {"Release": parent})
    try:
        handle = await page.runners["Release"].run()
        await handle.wait_for(RunStatus.WAITING, timeout=10)  # on its child, which parks at its gate
        for _ in range(200):
            info = await handle.info()
            if info.approvals:
                break
            await asyncio.sleep(0.02)
        (a,) = info.approvals
        assert a.workflow == "Check" and a.run_id != handle.run_id
        async with page.client() as c:
            csrf = await sign_in(c, await page.token("alice"))
            inbox = (await c.get("/")).text
            assert f'data-approval-id="{a.id}" data-run-id="{a.run_id}"' in inbox
            link = re.search(r'href="(/runs/[^"]+)"', inbox)
            assert link is not None and "%2F" in link.group(1)  # the child's id, "/" and all
            shown = await c.get(link.group(1))
            assert shown.status_code == 200 and 'id="approve-form"' in shown.text
            history = re.search(r'class="crumbs">.*?href="[^"]+">.*?href="([^"]+)"', shown.text, re.S)
            assert history is not None and (await c.get(history.group(1))).status_code == 200
            assert (await c.get("/", params={"workflow": "Check"})).text.count("<tr data-approval-id=") == 1
            assert (await c.post(decide_path(a, "approve"), data={"csrf": csrf})).status_code == 303
        result = await handle.result(timeout=10)
        assert result.output == "released"
        (d,) = (await page.info(a.run_id, "Release")).decisions
        assert d.by == "alice"
    finally:
        await stop()
        await page.close()


async def test_mounted_in_another_app_the_page_links_below_its_mount_point(make_store: StoreFactory) -> None:
    store = make_store("memory")
    flows = workflows(store)
    steward = steward_of(flows)
    review = create_app(steward)
    outer = Starlette(routes=[Mount("/review", app=review)])  # its lifespan does not reach the page
    url, stop = await serve(outer)
    page = Served(url, store, flows)
    try:
        a = await page.park("Triage", "mounted")
        async with page.client() as c:
            first = await c.get("/review/")
            assert (
                first.status_code == 303 and first.headers["location"] == "/review/signin?next=%2Freview%2F"
            )
            signin = await c.get("/review/signin")
            assert (
                'action="/review/signin"' in signin.text and 'src="/review/static/review.js"' in signin.text
            )
            reply = await c.post(
                "/review/signin", data={"csrf": csrf_of(signin.text), "token": await page.token("alice")}
            )
            assert reply.status_code == 303 and reply.headers["location"] == "/review/"
            inbox = (await c.get("/review/")).text
            assert f'href="/review/runs/{a.run_id}/approvals/{a.id}"' in inbox
            assert (
                'data-events="/review/events"' in inbox
                and (await c.get("/review/static/review.css")).status_code == 200
            )
            decided = await c.post(f"/review{decide_path(a, 'approve')}", data={"csrf": csrf_of(inbox)})
            assert decided.status_code == 303 and decided.headers["location"] == f"/review/runs/{a.run_id}"
            shown = (await c.get(f"/review/runs/{a.run_id}/approvals/{a.id}")).text
            assert 'id="decided"' in shown and "approve-form" not in shown
        assert (await page.settled(a.run_id, "Triage")).status == RunStatus.COMPLETED
    finally:
        await stop()
        await review.state.review.close()
        await page.close()


async def test_a_decision_on_the_page_is_posted_to_the_apps_webhooks_signed(make_store: StoreFactory) -> None:
    got: asyncio.Queue[tuple[bytes, dict[str, str]]] = asyncio.Queue()

    async def receive(request: Request) -> Response:
        await got.put((await request.body(), dict(request.headers)))
        return Response(status_code=204)

    hook_url, stop_hook = await serve(Starlette(routes=[Route("/hook", receive, methods=["POST"])]))
    store = make_store("memory")
    flows = workflows(store)
    steward = steward_of(flows)
    url, stop = await serve(create_app(steward, webhooks=[Webhook(f"{hook_url}/hook", "whsec")]))
    page = Served(url, store, flows)
    try:
        a = await page.park("Triage", "hooked")
        async with page.client() as c:
            csrf = await sign_in(c, await page.token("alice"))
            assert (
                await c.post(decide_path(a, "approve"), data={"csrf": csrf, "comment": "go"})
            ).status_code == 303
        body, headers = await asyncio.wait_for(got.get(), 10)
        assert verify("whsec", body, headers) and not verify("other", body, headers)
        event = json.loads(body)
        assert (event["type"], event["run_id"], event["approval"]["id"]) == (
            "approval_decided",
            a.run_id,
            a.id,
        )
        assert (event["decision"]["by"], event["decision"]["comment"]) == ("alice", "go")
    finally:
        await stop()
        await page.close()
        await stop_hook()


def test_the_review_namespace_exports_the_app_and_the_auths() -> None:
    import agentflow.review

    assert agentflow.review.__all__ == ["HeaderAuth", "TokenAuth", "Webhook", "create_app"]


def test_agentflow_serve_with_header_auth_needs_the_header_and_its_secret(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent))
    monkeypatch.delenv("NO_SUCH_REVIEW_SECRET", raising=False)
    args = ["serve", "examples.review_release_notes", "--auth", "header", "--header", "X-User"]
    assert cli_main([*args, "--header-secret-env", "NO_SUCH_REVIEW_SECRET"]) == 2
    assert "--header-secret-env" in capsys.readouterr().err


async def _add_reviewer(path: Path, name: str) -> str:
    store = SqliteStore(path=str(path))
    try:
        return await Reviewers(store).add(name)
    finally:
        await store.close()


def test_agentflow_serve_shows_the_release_notes_examples_drafts_to_an_editor(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parent.parent
    env = {
        **os.environ,
        "PYTHONPATH": str(root),
        "AGENTFLOW_DB": str(tmp_path / "notes.db"),
        **{k: "" for k in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL")},
    }

    def cli(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    module = "examples.review_release_notes"
    assert "1 drafts wait" in cli(str(root / "examples" / "review_release_notes.py"), "--drafts", "1")
    token = asyncio.run(_add_reviewer(tmp_path / "notes.db", "editor"))  # as `agentflow reviewers add` does
    port = free_port()
    log = (tmp_path / "serve.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "agentflow.cli", "serve", module, "--port", str(port)],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
            for _ in range(300):
                try:
                    page = c.get("/signin")
                    break
                except httpx.TransportError:
                    time.sleep(0.05)
            else:
                raise AssertionError((tmp_path / "serve.log").read_text())
            assert page.status_code == 200
            reply = c.post("/signin", data={"csrf": csrf_of(page.text), "token": token})
            assert reply.status_code == 303
            (item,) = (c.get("/api/approvals")).json()["items"]
            assert item["workflow"] == "ReleaseNotes" and item["form"] is not None
            path = f"/runs/{item['run_id']}/approvals/{item['id']}"
            shown = c.get(path)
            assert "## acme/app 2.4.0" in shown.text and 'name="data.draft"' in shown.text
            edited = item["context"]["draft"] + "\n- Export API docs: https://docs.example.com/export"
            csrf = csrf_of(shown.text)
            assert (c.post(path + "/approve", data={"csrf": csrf, "data.draft": "short"})).status_code == 422
            reply = c.post(path + "/approve", data={"csrf": csrf, "data.draft": edited})
            assert reply.status_code == 303
            for _ in range(200):
                run = (c.get(f"/api/runs/{item['run_id']}")).json()
                if run["status"] != "running":
                    break
                time.sleep(0.05)
            assert run["status"] == "completed"
            assert (
                run["decisions"][0]["by"] == "editor"
                and "Export API docs" in run["decisions"][0]["data"]["draft"]
            )
    finally:
        server.terminate()
        server.wait(timeout=15)
        log.close()
