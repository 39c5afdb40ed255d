"""The review page in a real browser: Debian's Chromium driven by Playwright against
``agentflow serve reviewflows`` in a subprocess (``review_server.py``), on SQLite and on Redis.

The tests start runs in this process (on the server's store) and decide them in the
browser as the reviewers of ``reviewflows`` would; what was recorded is read back through
the JSON API or the store. Every page is watched for dialogs, uncaught errors and console
errors (a CSP violation is one): none may happen. A run writes ``docs/screenshots/inbox.png``
and ``docs/screenshots/approval.png``.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import reviewflows
from playwright.async_api import (
    APIRequestContext,
    Browser,
    BrowserContext,
    ConsoleMessage,
    Dialog,
    Locator,
    Page,
    Playwright,
    Response,
    async_playwright,
    expect,
)
from review_server import ReviewServer, review_server_fixture  # noqa: F401  (the served page)

from agentflow import Approval, RunInfo, RunStatus, Workflow, WorkflowRunner

# The first test of each store also waits for the server, its reviewers and the browser.
pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(120)]

CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags Chromium reaches for the internet, which the
# closed network here refuses, and slows every start.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = Path(__file__).parent.parent / "docs" / "screenshots"
#: The kinds of request a page makes for its own parts (not the documents a test opens).
_PARTS = frozenset({"script", "stylesheet", "image", "font", "fetch", "xhr", "eventsource"})
WIDTH = 1280


# -- the browser, sessions and what the page may not do ----------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pw() -> AsyncIterator[Playwright]:
    async with async_playwright() as started:
        yield started


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def chromium(pw: Playwright) -> AsyncIterator[Browser]:
    browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    yield browser
    await browser.close()


class Sessions:
    """Browser sessions of the server's reviewers: each signs in once, through the page.

    ``open(name)`` is a new browser context (a new cookie jar) carrying that session;
    ``api(name)`` is an API client with the reviewer's bearer token.
    """

    def __init__(self, playwright: Playwright, browser: Browser, server: ReviewServer) -> None:
        self.playwright = playwright
        self.browser = browser
        self.server = server
        self._states: dict[str, Any] = {}
        self._opened: list[BrowserContext | APIRequestContext] = []
        self.problems: list[str] = []

    async def fresh(self, storage_state: Any = None) -> BrowserContext:
        """A new context (cookie jar): with no session, or the one ``storage_state`` holds."""
        context = await self.browser.new_context(
            base_url=self.server.url, viewport={"width": WIDTH, "height": 800}, storage_state=storage_state
        )
        context.set_default_timeout(5_000)
        context.on("page", self._watch)
        self._opened.append(context)
        return context

    async def open(self, name: str) -> BrowserContext:
        """A context signed in as ``name`` (signing in once: the page allows few attempts)."""
        if name in self._states:
            return await self.fresh(self._states[name])
        context = await self.fresh()
        await sign_in(await context.new_page(), self.server.tokens[name])
        await self.remember(name, context)
        return context

    async def remember(self, name: str, context: BrowserContext) -> None:
        """Keep ``context``'s session as ``name``'s, for the contexts opened after it."""
        self._states[name] = await context.storage_state()

    async def page(self, name: str, path: str = "/") -> Page:
        """A new page signed in as ``name``, at ``path``."""
        page = await (await self.open(name)).new_page()
        await page.goto(path)
        return page

    async def api(self, name: str) -> APIRequestContext:
        """The JSON API as ``name`` (a bearer token: no cookie, no CSRF token)."""
        api = await self.playwright.request.new_context(
            base_url=self.server.url,
            extra_http_headers={"Authorization": f"Bearer {self.server.tokens[name]}"},
        )
        self._opened.append(api)
        return api

    def _watch(self, page: Page) -> None:
        """Record every dialog, uncaught error and console error of ``page``."""

        async def dismiss(dialog: Dialog) -> None:
            self.problems.append(f"dialog {dialog.type}: {dialog.message}")
            await dialog.dismiss()

        def console(msg: ConsoleMessage) -> None:
            # A load's status is the test's to check (a refused sign-in is a 401 page);
            # every other console error (a CSP violation, a script error) is a problem.
            if msg.type == "error" and not msg.text.startswith("Failed to load resource"):
                self.problems.append(f"console {msg.type}: {msg.text}")

        def response(reply: Response) -> None:
            # The page's own parts (script, stylesheet, fragments, events) must load.
            kind = reply.request.resource_type
            if reply.status >= 400 and kind in _PARTS and not reply.url.endswith("/favicon.ico"):
                self.problems.append(f"{kind} {reply.url}: {reply.status}")

        page.on("dialog", dismiss)
        page.on("pageerror", lambda error: self.problems.append(f"pageerror: {error}"))
        page.on("console", console)
        page.on("response", response)

    async def close(self) -> None:
        """Close every context and API client opened since the last close."""
        for opened in reversed(self._opened):
            await opened.close() if isinstance(opened, BrowserContext) else await opened.dispose()
        self._opened.clear()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def _sessions(pw: Playwright, chromium: Browser, review_server: ReviewServer) -> Sessions:
    return Sessions(pw, chromium, review_server)


@pytest_asyncio.fixture(loop_scope="module")
async def reviewers(_sessions: Sessions) -> AsyncIterator[Sessions]:
    """The server's reviewers; after the test, no page showed a dialog or an error and the
    server logged no exception."""
    _sessions.problems.clear()
    logged = _sessions.server.output_size()
    yield _sessions
    problems = list(_sessions.problems)
    await _sessions.close()
    log = _sessions.server.output(since=logged)
    assert "Traceback" not in log, log[-6000:]
    assert problems == [], problems


async def sign_in(page: Page, token: str) -> None:
    """Sign in on the page's form and land on the inbox."""
    await page.goto("/signin")
    await page.fill("input[name=token]", token)
    await page.click("button#signin")
    await page.wait_for_url(re.compile(r"/(\?.*)?$"))


async def sign_in_here(page: Page, token: str) -> None:
    """Sign in on the sign-in form the page shows now (keeping its ``next``)."""
    await page.fill("input[name=token]", token)
    await page.click("button#signin")


# -- runs, started here on the server's store --------------------------------------------


async def park(server: ReviewServer, workflow: Workflow, inputs: Iterable[Any]) -> list[Approval]:
    """Start a run of ``workflow`` per input and return each one's pending approval."""
    store = server.store()
    try:
        async with WorkflowRunner(workflow, store=store) as runner:
            handles = [await runner.run(data) for data in inputs]
            infos = await asyncio.gather(*(h.wait_for(RunStatus.WAITING, timeout=10) for h in handles))
    finally:
        await store.close()
    for info in infos:
        assert info.status == RunStatus.WAITING, info
    return [info.approvals[0] for info in infos]


async def run_info(server: ReviewServer, workflow: Workflow, run_id: str) -> tuple[RunInfo, Any]:
    """The run as the store has it, and its output once final (else None)."""
    store = server.store()
    try:
        async with WorkflowRunner(workflow, store=store, execute=False) as runner:
            handle = await runner.attach(run_id)
            info = await handle.info()
            output = (await handle.result(timeout=5)).output if info.status == RunStatus.COMPLETED else None
    finally:
        await store.close()
    return info, output


async def settled(api: APIRequestContext, run_id: str, timeout: float = 10) -> dict[str, Any]:
    """``GET /api/runs/{run_id}`` once the run has left ``waiting`` and ``running``."""
    deadline = time.monotonic() + timeout
    while True:
        reply = await api.get(f"/api/runs/{run_id}")
        assert reply.ok, await reply.text()
        run: dict[str, Any] = await reply.json()
        if run["status"] not in ("waiting", "running", "pending") or time.monotonic() > deadline:
            return run
        await asyncio.sleep(0.05)


async def submit(page: Page, button: str) -> None:
    """Click a form's ``button`` and wait for the page the form leads to."""
    async with page.expect_navigation():
        await page.click(button)


def row(page: Page, approval: Approval) -> Locator:
    """The inbox row of ``approval``."""
    return page.locator(f'tr[data-approval-id="{approval.id}"]')


def approval_path(approval: Approval) -> str:
    return f"/runs/{approval.run_id}/approvals/{approval.id}"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


# -- the scenarios -----------------------------------------------------------------------


async def test_sign_in_sets_an_http_only_session_and_a_bad_token_is_refused(
    reviewers: Sessions, review_server: ReviewServer
) -> None:
    context = await reviewers.fresh()
    page = await context.new_page()
    await page.goto("/signin")
    await page.fill("input[name=token]", "af_nope_wrong")
    await submit(page, "button#signin")
    assert "/signin" in page.url
    await expect(page.locator("#signin-error")).to_be_visible()
    assert (await page.request.get("/api/me")).status == 401
    await sign_in(page, review_server.tokens["editor"])
    await expect(page.locator("#inbox-items, #inbox-empty").first).to_be_visible()
    (session,) = [c for c in await context.cookies() if c["httpOnly"]]
    assert session["sameSite"] == "Lax"
    me = await page.request.get("/api/me")
    assert await me.json() == {"reviewer": "editor"}
    await reviewers.remember("editor", context)


async def test_the_inbox_and_an_approval_page_as_a_reviewer_sees_them(
    reviewers: Sessions, review_server: ReviewServer
) -> None:
    """Writes the README's screenshots (first in the module: the inbox holds these items only)."""
    await park(review_server, reviewflows.triage, [{"text": "the refund of order 1042"}])
    await park(review_server, reviewflows.summary, [{"text": "the week of 1 December"}])
    await park(review_server, reviewflows.ship, [None])
    (release,) = await park(review_server, reviewflows.sign_off, [{"text": "the 2.0 release"}])
    (notes,) = await park(
        review_server,
        reviewflows.release_notes,
        [
            {
                "title": "agentflow 2.0",
                "previous": "## 1.9\n\n- SQLite store\n- Redis store\n",
                "draft": "## 2.0\n\n- SQLite store\n- Redis and Redis Cluster stores\n- The review page\n",
            }
        ],
    )
    page = await reviewers.page("ops-lead", approval_path(release))
    await page.click("button#approve")
    await page.wait_for_url(f"**/runs/{release.run_id}")

    page = await reviewers.page("editor", "/")
    await expect(row(page, notes)).to_be_visible()
    await expect(row(page, release)).to_contain_text("1/2")
    await expect(page.locator("tr[data-approval-id]")).to_have_count(5)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SCREENSHOTS / "inbox.png"), full_page=True)

    await page.goto(approval_path(notes))
    for part in ("#prompt", "#context", "#history", "#usage", "form#approve-form", "form#reject-form"):
        await expect(page.locator(part)).to_be_visible()
    await expect(page.locator("#context")).to_contain_text("The review page")
    await page.screenshot(path=str(SCREENSHOTS / "approval.png"), full_page=True)


async def test_an_editor_fixes_an_invalid_edit_approves_and_the_item_leaves_another_tab_live(
    reviewers: Sessions, review_server: ReviewServer
) -> None:
    title = unique("Agentflow 2.0")
    (approval,) = await park(
        review_server,
        reviewflows.release_notes,
        [
            {
                "title": title,
                "previous": "Faster steps.\nSQLite store.",
                "draft": "Faster steps.\nRedis store.",
            }
        ],
    )
    context = await reviewers.fresh()
    page = await context.new_page()
    await sign_in(page, review_server.tokens["editor"])
    await expect(row(page, approval)).to_be_visible()
    other_tab = await context.new_page()
    await other_tab.goto("/")
    await expect(row(other_tab, approval)).to_be_visible()

    await row(page, approval).locator(f'a[href$="{approval_path(approval)}"]').click()
    await page.wait_for_url(f"**{approval_path(approval)}")
    await expect(page.locator("#prompt")).to_contain_text(title)
    await expect(page.locator("#context")).to_contain_text("Redis store.")
    form = page.locator("form#approve-form")
    await form.locator("[name='data.title']").fill("ab")
    await form.locator("[name='data.priority']").fill("9")
    await form.locator("textarea[name=comment]").fill("looks good")
    await submit(page, "button#approve")
    await expect(page.locator(".field-error[data-field=title]")).to_be_visible()
    await expect(page.locator(".field-error[data-field=priority]")).to_be_visible()
    api = await reviewers.api("editor")
    reply = await api.get(f"/api/runs/{approval.run_id}")
    assert (await reply.json())["status"] == "waiting"

    form = page.locator("form#approve-form")
    await form.locator("[name='data.title']").fill("Agentflow 2.0 is out")
    await form.locator("[name='data.priority']").fill("4")
    await page.click("button#approve")
    await page.wait_for_url(f"**/runs/{approval.run_id}")
    await expect(page.locator("#flash")).to_be_visible()
    await expect(page.locator("#decisions")).to_contain_text("editor")
    await expect(page.locator("#decisions")).to_contain_text("looks good")

    run = await settled(api, approval.run_id)
    assert run["status"] == "completed", run
    info, output = await run_info(review_server, reviewflows.release_notes, approval.run_id)
    assert output == {"title": "Agentflow 2.0 is out", "priority": 4, "by": "editor"}
    (decision,) = info.decisions
    assert decision.by == "editor" and decision.comment == "looks good"
    # The other tab was never reloaded: the server's events took the item out.
    await expect(row(other_tab, approval)).to_have_count(0)


async def test_an_open_inbox_shows_approvals_arriving_and_decided_elsewhere(
    reviewers: Sessions, review_server: ReviewServer
) -> None:
    page = await reviewers.page("editor", "/?workflow=Triage")
    await expect(page.locator("#inbox-items")).to_be_attached()
    (approval,) = await park(review_server, reviewflows.triage, [{"text": unique("arrival")}])
    await expect(row(page, approval)).to_be_visible()  # never reloaded: the server's event brought it
    # Decided in another process, as `agentflow approve` would.
    store = review_server.store()
    try:
        async with WorkflowRunner(reviewflows.triage, store=store) as runner:
            handle = await runner.approve(approval.run_id, by="editor", approval=approval.id)
            assert (await handle.result(timeout=10)).output.endswith("by editor")
    finally:
        await store.close()
    await expect(row(page, approval)).to_have_count(0)


async def test_a_rejection_records_the_reason(reviewers: Sessions, review_server: ReviewServer) -> None:
    (approval,) = await park(review_server, reviewflows.triage, [{"text": unique("ticket")}])
    page = await reviewers.page("editor", approval_path(approval))
    await page.locator("form#reject-form textarea[name=reason]").fill("a duplicate of #41")
    await page.click("button#reject")
    await page.wait_for_url(f"**/runs/{approval.run_id}")
    await expect(page.locator("#decisions")).to_contain_text("a duplicate of #41")
    info, _ = await run_info(review_server, reviewflows.triage, approval.run_id)
    (decision,) = info.decisions
    assert info.status == RunStatus.REJECTED
    assert (decision.approved, decision.by, decision.reason) == (False, "editor", "a duplicate of #41")


async def test_a_quorum_shows_who_voted_and_the_run_waits_for_the_second(
    reviewers: Sessions, review_server: ReviewServer
) -> None:
    (approval,) = await park(review_server, reviewflows.sign_off, [{"text": unique("release")}])
    page = await reviewers.page("editor", approval_path(approval))
    await expect(page.locator("#quorum")).to_contain_text("0")
    await page.click("button#approve")
    await page.wait_for_url(f"**/runs/{approval.run_id}")
    info, _ = await run_info(review_server, reviewflows.sign_off, approval.run_id)
    assert info.status == RunStatus.WAITING and info.approvals[0].votes == ("editor",)

    page = await reviewers.page("ops-lead", approval_path(approval))
    await expect(page.locator("#quorum")).to_contain_text("editor")
    await page.click("button#approve")
    await page.wait_for_url(f"**/runs/{approval.run_id}")
    info, output = await run_info(review_server, reviewflows.sign_off, approval.run_id)
    assert output == "signed" and [d.by for d in info.decisions] == ["editor", "ops-lead"]


async def test_a_tool_call_runs_with_the_arguments_the_operator_edited(
    reviewers: Sessions, review_server: ReviewServer
) -> None:
    (approval,) = await park(review_server, reviewflows.ship, [None])
    page = await reviewers.page("ops-lead", "/?mine=1")
    # Only what the operator may decide: tool calls and sign-offs, none of the editor's own gates.
    await expect(row(page, approval)).to_be_visible()
    assert set(await page.locator("tr[data-approval-id] td:nth-child(2)").all_inner_texts()) <= {
        "Ship",
        "SignOff",
    }
    await row(page, approval).locator("a.open").click()
    await page.wait_for_url(f"**{approval_path(approval)}")
    await expect(page.locator("#tool")).to_contain_text("deploy")
    await expect(page.locator("#arguments")).to_contain_text("staging")
    await expect(page.locator("#model-text")).to_contain_text("Deploying 2.0 to staging.")
    form = page.locator("form#approve-form")
    await form.locator("[name='data.version']").fill("2.0.1")
    await form.locator("[name='data.environment']").select_option("production")
    await page.click("button#approve")
    await page.wait_for_url(f"**/runs/{approval.run_id}")
    run = await settled(page.request, approval.run_id)
    assert run["status"] == "completed", run
    _, output = await run_info(review_server, reviewflows.ship, approval.run_id)
    assert output["arguments"] == [{"version": "2.0.1", "environment": "production"}]
    assert '"deployed": "2.0.1", "to": "production"' in output["text"]


async def test_a_tool_call_answered_with_a_result_never_runs_the_tool(
    reviewers: Sessions, review_server: ReviewServer
) -> None:
    (approval,) = await park(review_server, reviewflows.ship, [None])
    page = await reviewers.page("ops-lead", approval_path(approval))
    respond = page.locator("form#respond-form")
    await respond.locator("textarea[name=result]").fill("{not json")
    await submit(page, "button#respond")
    await expect(page.locator(".field-error[data-field=result]")).to_be_visible()
    await page.locator("form#respond-form textarea[name=result]").fill('{"deployed": "by hand"}')
    await submit(page, "button#respond")
    await expect(page.locator("#decisions .outcome")).to_have_text("responded")
    run = await settled(page.request, approval.run_id)
    assert run["status"] == "completed", run
    _, output = await run_info(review_server, reviewflows.ship, approval.run_id)
    assert output["text"] == 'deploy said: {"deployed": "by hand"}'


async def test_bulk_approval_decides_twenty_items_each_on_its_own(
    reviewers: Sessions, review_server: ReviewServer
) -> None:
    batch = unique("bulk")
    approvals = await park(review_server, reviewflows.triage, [{"text": f"{batch} {i}"} for i in range(20)])
    page = await reviewers.page("editor", "/?workflow=Triage")
    for approval in approvals:
        await (
            row(page, approval).locator(f'input[name=item][value="{approval.run_id}:{approval.id}"]').check()
        )
    await page.click("button#bulk-approve")
    await expect(page.locator("#flash")).to_be_visible()
    runs = await asyncio.gather(*(settled(page.request, a.run_id) for a in approvals))
    assert [r["status"] for r in runs] == ["completed"] * 20
    # Each item its own decision, by the signed-in reviewer, of its own approval.
    assert [[(d["by"], d["approval"], d["approved"]) for d in r["decisions"]] for r in runs] == [
        [("editor", a.id, True)] for a in approvals
    ]
    _, output = await run_info(review_server, reviewflows.triage, approvals[0].run_id)
    assert output == f"{batch} 0 by editor"
    await page.goto("/?workflow=Triage")
    for approval in approvals:
        await expect(row(page, approval)).to_have_count(0)


async def test_a_non_approver_sees_it_read_only_and_a_forged_decision_records_nothing(
    reviewers: Sessions, review_server: ReviewServer
) -> None:
    (approval,) = await park(review_server, reviewflows.triage, [{"text": unique("forged")}])
    # Where the editor's form posts to: what a forger would copy.
    editor = await reviewers.page("editor", approval_path(approval))
    action = await editor.locator("form#approve-form").get_attribute("action") or approval_path(approval)
    await editor.context.close()

    page = await reviewers.page("intruder", "/")
    await expect(row(page, approval)).to_be_visible()
    await expect(row(page, approval).locator("input[name=item]")).to_have_count(0)
    await page.goto(approval_path(approval))
    await expect(page.locator("#read-only")).to_be_visible()
    await expect(page.locator("#prompt")).to_contain_text("forged")
    assert await page.locator("form#approve-form, form#reject-form, button#approve").count() == 0
    csrf = await page.locator("input[name=csrf]").first.get_attribute("value")
    assert csrf
    forged = await page.request.post(action, form={"csrf": csrf, "comment": "mine now"})
    assert forged.status == 403, await forged.text()
    by_api = await page.request.post(
        f"/api{approval_path(approval)}", data={"action": "approve"}, headers={"X-CSRF-Token": csrf}
    )
    assert by_api.status == 403, await by_api.text()
    info, _ = await run_info(review_server, reviewflows.triage, approval.run_id)
    assert info.status == RunStatus.WAITING and info.decisions == () and info.approvals == (approval,)


async def test_no_session_redirects_to_sign_in_and_a_post_without_csrf_is_refused(
    reviewers: Sessions, review_server: ReviewServer
) -> None:
    (approval,) = await park(review_server, reviewflows.triage, [{"text": unique("csrf")}])
    anonymous = await (await reviewers.fresh()).new_page()
    reply = await anonymous.request.get(approval_path(approval), max_redirects=0)
    assert reply.status == 303 and reply.headers["location"].startswith("/signin?next=")
    await anonymous.goto(approval_path(approval))
    assert "/signin" in anonymous.url
    await expect(anonymous.locator("input[name=token]")).to_be_visible()
    await sign_in_here(anonymous, review_server.tokens["editor"])
    await anonymous.wait_for_url(f"**{approval_path(approval)}")  # back where the reviewer was going

    page = await reviewers.page("editor", approval_path(approval))
    action = await page.locator("form#approve-form").get_attribute("action") or approval_path(approval)
    forms: list[dict[str, str | float | bool]] = [
        {"comment": "no token"},
        {"comment": "a wrong token", "csrf": "not-the-token"},
    ]
    for form in forms:
        refused = await page.request.post(action, form=form)
        assert refused.status == 403, await refused.text()
    by_api = await page.request.post(f"/api{approval_path(approval)}", data={"action": "approve"})
    assert by_api.status == 403, await by_api.text()
    info, _ = await run_info(review_server, reviewflows.triage, approval.run_id)
    assert info.status == RunStatus.WAITING and info.decisions == ()


async def test_agent_output_with_markup_is_shown_as_text_and_runs_nothing(
    reviewers: Sessions, review_server: ReviewServer
) -> None:
    (summary,) = await park(review_server, reviewflows.summary, [{"text": unique("week")}])
    (notes,) = await park(
        review_server,
        reviewflows.release_notes,
        [{"title": "<script>alert(2)</script>", "previous": "plain", "draft": reviewflows.PAYLOAD}],
    )
    page = await reviewers.page("editor", "/")
    for approval in (summary, notes):
        reply = await page.goto(approval_path(approval))
        assert reply is not None and reply.ok
        headers = reply.headers
        assert "script-src 'self'" in headers["content-security-policy"]
        assert headers["x-content-type-options"] == "nosniff"
        context = page.locator("#context")
        await expect(context).to_contain_text("<script>alert(1)</script>")
        await expect(context).to_contain_text("<img src=x onerror=alert(1)>")
        assert await page.locator("script:not([src])").count() == 0
        assert await page.locator("[onerror], [onload], [onclick]").count() == 0
        assert await page.locator("a[href^='javascript:' i]").count() == 0
        assert await page.locator("img[src=x]").count() == 0
    await expect(page.locator("#prompt")).to_contain_text("<script>alert(2)</script>")
    # An attribute too: the form's title field is filled from the context, as text.
    await expect(page.locator("[name='data.title']")).to_have_value("<script>alert(2)</script>")
    await page.goto(approval_path(summary))
    await expect(page.locator("#context a[href='https://example.org/notes']")).to_have_attribute(
        "rel", re.compile("noopener")
    )
    await page.goto("/")
    assert await page.locator("script:not([src])").count() == 0
    await page.wait_for_timeout(300)  # anything that would run has run by now
    assert reviewers.problems == []
