"""The review page's HTML routes: sign-in, the inbox, an approval's page, a run's history,
the decisions (one, or many from the inbox) and the live event stream.

Every POST checks the session's CSRF token first; the decider is always the signed-in
reviewer. A decision that fails says why on the page it came from: 403 (not an
approver, nothing recorded), 409 (decided already) or 422 (the edit does not fit: each
error next to its field). A decision that succeeds redirects (303) to the run's
history page with a flash message.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, quote
from urllib.parse import urlencode as _urlencode

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from ..errors import InvalidInputError, InvalidStateError, NotAuthorizedError, RunNotFoundError
from ..types import Approval
from . import render
from .auth import TokenAuth, check_csrf, csrf_token
from .desk import Opened, can_decide
from .edits import edit_errors, edit_fields, edit_of
from .inbox import KINDS, Filters, page, parse_age

if TYPE_CHECKING:
    from .app import Review

__all__ = ["error_page", "href", "routes", "urlencode"]

Form = dict[str, list[str]]

#: Failures of a bulk decision the flash message names (the rest are counted).
_SAID = 5


def urlencode(params: Mapping[str, Any]) -> str:
    """``params`` (the ones set) as a query string."""
    return _urlencode({k: v for k, v in params.items() if v not in (None, "", False)})


def href(request: Request, name: str, **params: Any) -> str:
    """The path of route ``name`` (below the app's mount point).

    A run id is percent-encoded whole: a child run's id holds a ``/`` (and its step's
    name, any character).
    """
    if "run_id" in params:
        params["run_id"] = quote(str(params["run_id"]), safe="")
    root = str(request.scope.get("root_path", ""))
    return root + str(request.app.router.url_path_for(name, **params))


def _review(request: Request) -> Review:
    review: Review = request.app.state.review
    return review


async def _form(request: Request) -> tuple[list[tuple[str, str]], Form]:
    """The urlencoded body as pairs (in order) and as lists by name."""
    body = (await request.body()).decode("utf-8", errors="replace")
    pairs = parse_qsl(body, keep_blank_values=True, max_num_fields=10_000)
    form: Form = {}
    for k, v in pairs:
        form.setdefault(k, []).append(v)
    return pairs, form


def _one(form: Form, name: str) -> str | None:
    values = form.get(name)
    return (values[0].strip() or None) if values else None


def page_response(
    request: Request,
    template: str,
    context: dict[str, Any],
    status: int = 200,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """Render ``template`` with what every page needs (reviewer, CSRF token, links, flash)."""
    review = _review(request)
    base = {
        "request": request,
        "who": context.pop("who", None),
        "csrf": csrf_token(request),
        "href": lambda name, **p: href(request, name, **p),
        "signs_in": review.auth.signs_in,
        "flash": request.session.pop("flash", None) if template != "_inbox_items.html" else None,
        "render": render,
    }
    return review.templates.TemplateResponse(request, template, {**base, **context}, status, headers)


def error_page(
    request: Request,
    status: int,
    message: str,
    headers: Mapping[str, str] | None = None,
    who: str | None = None,
) -> Response:
    """A page that says what went wrong (and nothing of the run it was about)."""
    return page_response(
        request, "error.html", {"status": status, "message": message, "who": who}, status, headers
    )


# -- signing in -----------------------------------------------------------------------------


def _next(target: str | None) -> str | None:
    """A same-site path to go on to after sign-in, or None (no open redirects)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return None
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in target):  # a browser drops tabs: "/\t/x" is "//x"
        return None
    return target


async def signin_page(request: Request) -> Response:
    """GET /signin: the token form (a reviewer signed in already goes on)."""
    review = _review(request)
    if not review.auth.signs_in:
        return RedirectResponse(href(request, "inbox"), 303)
    target = _next(request.query_params.get("next"))
    if await review.auth.reviewer(request) is not None:  # signed in already: go on
        return RedirectResponse(target or href(request, "inbox"), 303)
    return page_response(request, "signin.html", {"next": target, "error": None})


async def signin(request: Request) -> Response:
    """POST /signin: exchange a token for a session, then go on to ``next``."""
    review = _review(request)
    _, form = await _form(request)
    check_csrf(request, form)
    auth = review.auth
    if not isinstance(auth, TokenAuth):
        return RedirectResponse(href(request, "inbox"), 303)
    target = _next(_one(form, "next"))
    who = await auth.sign_in(request, _one(form, "token") or "")
    if who is None:
        context = {"next": target, "error": "That token is not valid (or was revoked)."}
        return page_response(request, "signin.html", context, 401)
    return RedirectResponse(target or href(request, "inbox"), 303)


async def signout(request: Request) -> Response:
    """POST /signout: end the session."""
    review = _review(request)
    _, form = await _form(request)
    check_csrf(request, form)
    if isinstance(review.auth, TokenAuth):
        await review.auth.sign_out(request)
        return RedirectResponse(href(request, "signin"), 303)
    return RedirectResponse(href(request, "inbox"), 303)


# -- the inbox --------------------------------------------------------------------------------


def filters_of(review: Review, params: Mapping[str, str]) -> Filters:
    """The inbox filters of a query string (``workflow``, ``kind``, ``mine``, ``age``).

    Raises:
        ValueError: an unknown workflow or kind, or an age without a unit.
    """
    workflow = params.get("workflow") or None
    if workflow is not None and workflow not in review.desk.workflows:
        raise ValueError(f"workflow {workflow!r} is not served here")
    kind = params.get("kind") or None
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind {kind!r}: choose one of {', '.join(KINDS)}")
    mine = params.get("mine") in ("1", "true", "on", "yes")
    return Filters(workflow, kind, mine, parse_age(params.get("age")))


async def inbox(request: Request) -> Response:
    """GET /: the inbox (``fragment=1``: only its items, for the live swap)."""
    review = _review(request)
    who = await review.reviewer(request)
    params = request.query_params
    try:
        filters = filters_of(review, params)
        found = await page(review.desk, who, filters, 50, params.get("after") or None)
    except ValueError as exc:
        return error_page(request, 400, str(exc), who=who)
    query = {k: params.get(k) for k in ("workflow", "kind", "mine", "age")}
    context = {
        "who": who,
        "items": found.items,
        "next": found.next,
        "query": query,
        "next_href": href(request, "inbox") + "?" + urlencode({**query, "after": found.next}),
        "fragment_href": href(request, "inbox")
        + "?"
        + urlencode({**query, "after": params.get("after"), "fragment": "1"}),
        "workflows": review.desk.workflows,
        "kinds": KINDS,
    }
    template = "_inbox_items.html" if params.get("fragment") == "1" else "inbox.html"
    return page_response(request, template, context)


async def bulk(request: Request) -> Response:
    """Each checked item decided on its own, as the reviewer; what failed is listed."""
    review = _review(request)
    who = await review.reviewer(request)
    _, form = await _form(request)
    check_csrf(request, form)
    action = _one(form, "action")
    if action not in ("approve", "reject"):
        return error_page(request, 400, "choose approve or reject", who=who)
    comment = _one(form, "reason") if action == "reject" else _one(form, "comment")
    done, failed = 0, []
    for item in form.get("item") or []:
        run_id, _, approval_id = item.rpartition(":")
        try:
            await review.desk.decide(run_id, approval_id, action, who, comment=comment)
            done += 1
        except (NotAuthorizedError, InvalidStateError, InvalidInputError, RunNotFoundError) as exc:
            failed.append(f"{approval_id}: {exc}")
    verb = "approved" if action == "approve" else "rejected"
    flash = f"{done} {verb}."
    if failed:  # the flash rides in the session cookie (4 kB at most): the first few say why
        more = f"; and {len(failed) - _SAID} more" if len(failed) > _SAID else ""
        flash += f" {len(failed)} could not be: " + "; ".join(f[:200] for f in failed[:_SAID]) + more
    request.session["flash"] = flash
    return RedirectResponse(href(request, "inbox"), 303)


# -- an approval and its run --------------------------------------------------------------------


def _approval_context(
    request: Request,
    who: str,
    opened: Opened,
    errors: Mapping[str, str] | None = None,
    submitted: Mapping[str, str] | None = None,
    posted: Any = None,
) -> dict[str, Any]:
    approval = opened.approval
    fields = edit_fields(approval, posted) if approval is not None else []
    errors = dict(errors or {})
    paths = _paths(fields) | {"result"}
    return {
        "who": who,
        "info": opened.info,
        "approval": approval,
        "decided": opened.decided,
        "events": opened.events,
        "can_decide": approval is not None and can_decide(approval, who),
        "fields": fields,
        "errors": errors,
        "loose_errors": [(p, m) for p, m in errors.items() if p not in paths],
        "submitted": dict(submitted or {}),
        "run_href": href(request, "run", run_id=opened.info.run_id),
    }


def _paths(fields: list[Any]) -> set[str]:
    out: set[str] = set()
    for f in fields:
        out.add(f.path)
        out |= _paths(f.children)
    return out


async def approval_page(request: Request) -> Response:
    """GET /runs/{run_id}/approvals/{approval_id}: the approval, its run, the forms."""
    review = _review(request)
    who = await review.reviewer(request)
    run_id, approval_id = request.path_params["run_id"], request.path_params["approval_id"]
    try:
        opened = await review.desk.open(run_id, approval_id)
    except RunNotFoundError as exc:
        return error_page(request, 404, str(exc), who=who)
    return page_response(request, "approval.html", _approval_context(request, who, opened))


async def decide(request: Request) -> Response:
    """POST /runs/{run_id}/approvals/{approval_id}/{approve|reject|respond}, as the reviewer."""
    review = _review(request)
    who = await review.reviewer(request)
    pairs, form = await _form(request)
    check_csrf(request, form)
    run_id, approval_id = request.path_params["run_id"], request.path_params["approval_id"]
    action = request.path_params["action"]
    if action not in ("approve", "reject", "respond"):
        return error_page(request, 404, f"no action {action!r}: approve, reject or respond", who=who)
    try:
        opened = await review.desk.open(run_id, approval_id, events=False)
    except RunNotFoundError as exc:
        return error_page(request, 404, str(exc), who=who)
    approval = opened.approval
    if approval is None:
        return error_page(
            request, 409, f"approval {approval_id} of run {run_id} was decided already", who=who
        )
    submitted = {k: v for k, v in pairs if k in ("result", "comment", "reason")}
    errors: dict[str, str] = {}
    data = posted = result = None
    if action == "approve":
        edit = edit_of(approval, pairs)
        data, posted, errors = edit.data, edit.posted, edit.errors
    elif action == "respond":
        try:
            result = json.loads(_one(form, "result") or "")
        except ValueError as exc:
            errors = {"result": f"not JSON: {exc}"}
    if errors:
        opened = await review.desk.open(run_id, approval_id)  # shown again, with its history
        ctx = _approval_context(request, who, opened, errors, submitted, posted)
        return page_response(request, "approval.html", ctx, 422)
    comment = _one(form, "reason") if action == "reject" else _one(form, "comment")
    try:
        await review.desk.decide(run_id, approval_id, action, who, comment=comment, data=data, result=result)
    except NotAuthorizedError:
        return error_page(
            request, 403, f"you ({who}) may not decide this approval; nothing was recorded", who=who
        )
    except InvalidStateError as exc:
        return error_page(request, 409, str(exc), who=who)
    except InvalidInputError as exc:
        opened = await review.desk.open(run_id, approval_id)
        ctx = _approval_context(request, who, opened, edit_errors(approval, exc), submitted, posted)
        return page_response(request, "approval.html", ctx, 422)
    verbs = {"approve": "Approved", "reject": "Rejected", "respond": "Responded to"}
    request.session["flash"] = f"{verbs[action]} {_title(approval)}."
    return RedirectResponse(href(request, "run", run_id=run_id), 303)


def _title(approval: Approval) -> str:
    if approval.tool:
        return f"the call of {approval.tool} ({approval.workflow})"
    return f"{approval.workflow} at {approval.step}"


async def run_page(request: Request) -> Response:
    """GET /runs/{run_id}: the run's history, every decision in it."""
    review = _review(request)
    who = await review.reviewer(request)
    run_id = request.path_params["run_id"]
    try:
        info = await review.desk.info(run_id)
    except RunNotFoundError as exc:
        return error_page(request, 404, str(exc), who=who)
    events = await review.desk.runner(info.workflow).store.events(run_id)
    return page_response(request, "run.html", {"who": who, "info": info, "events": events})


async def events(request: Request) -> Response:
    """GET /events: the live inbox stream (server-sent events ``approvals``)."""
    review = _review(request)
    await review.reviewer(request)
    return review.watch.response()


def routes() -> list[BaseRoute]:
    """The HTML routes (and ``/events``)."""
    return [
        Route("/signin", signin_page, methods=["GET"], name="signin"),
        Route("/signin", signin, methods=["POST"], name="signin_post"),
        Route("/signout", signout, methods=["POST"], name="signout"),
        Route("/", inbox, methods=["GET"], name="inbox"),
        Route("/bulk", bulk, methods=["POST"], name="bulk"),
        Route("/events", events, methods=["GET"], name="events"),
        # A run id may hold "/" (a child run's): the most specific route first.
        Route(
            "/runs/{run_id:path}/approvals/{approval_id}/{action}", decide, methods=["POST"], name="decide"
        ),
        Route("/runs/{run_id:path}/approvals/{approval_id}", approval_page, methods=["GET"], name="approval"),
        Route("/runs/{run_id:path}", run_page, methods=["GET"], name="run"),
    ]
