"""The review page's JSON API: what the page does, for bots and other front ends.

Same auth as the page: ``Authorization: Bearer af_...`` (TokenAuth; no CSRF token
needed), or the page's session cookie with the header ``X-CSRF-Token`` on a POST (or
the proxy's headers, with HeaderAuth). ::

    GET  /api/me                                  {"reviewer": name}
    GET  /api/approvals?workflow=&kind=&mine=&age=&after=&limit=
                                                  {"items": [Approval + "can_decide"], "next": cursor|null}
    GET  /api/runs/{run_id}                       the run: status, approvals, decisions, usage, events
    GET  /api/runs/{run_id}/approvals/{id}        {"approval": ..., "can_decide", "decided", "run": ...}
    POST /api/runs/{run_id}/approvals/{id}        {"action": "approve"|"reject"|"respond",
                                                   "comment", "reason", "data", "result"}
         200 {"run_id", "status"}; 403 not an approver (nothing recorded); 409 decided
         already or not pending; 422 {"errors": {path: message}} the data does not fit.

``data`` is what ``runner.approve`` takes: a gate form's fields, or
``{"arguments": {...}}`` for a tool call.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from ..errors import InvalidInputError, InvalidStateError, NotAuthorizedError, RunNotFoundError
from ..types import Approval, Decision, RunEvent, RunInfo
from .auth import check_csrf
from .desk import can_decide
from .forms import errors_from_pydantic
from .inbox import page
from .views import filters_of

if TYPE_CHECKING:
    from .app import Review

__all__ = ["routes"]


def _review(request: Request) -> Review:
    review: Review = request.app.state.review
    return review


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status)


def approval_json(approval: Approval, reviewer: str) -> dict[str, Any]:
    """``approval`` as JSON, with whether ``reviewer`` may decide it."""
    return {**approval.to_json(), "can_decide": can_decide(approval, reviewer)}


def _decision(d: Decision) -> dict[str, Any]:
    return {**d.to_json(), "at": d.at.isoformat()}


def _event(e: RunEvent) -> dict[str, Any]:
    return {"seq": e.seq, "kind": e.kind, "step": e.step, "data": e.data, "at": e.at}


def run_json(info: RunInfo, events: list[RunEvent] | None = None) -> dict[str, Any]:
    """What the API says of a run."""
    out: dict[str, Any] = {
        "run_id": info.run_id,
        "workflow": info.workflow,
        "status": info.status.value,
        "step": info.step,
        "approvals": [a.to_json() for a in info.approvals],
        "decisions": [_decision(d) for d in info.decisions],
        "error": {k: v for k, v in info.error.items() if k != "traceback"} if info.error else None,
        "usage": info.usage.to_json(),
        "created_at": info.created_at.isoformat(),
        "updated_at": info.updated_at.isoformat(),
        "parent": info.parent._asdict() if info.parent else None,
        "children": list(info.children),
    }
    if events is not None:
        out["events"] = [_event(e) for e in events]
    return out


async def me(request: Request) -> Response:
    """GET /api/me: who the request comes from."""
    who = await _review(request).reviewer(request)
    return JSONResponse({"reviewer": who})


async def approvals(request: Request) -> Response:
    """GET /api/approvals: a page of the inbox."""
    review = _review(request)
    who = await review.reviewer(request)
    params = request.query_params
    try:
        limit = min(max(int(params.get("limit") or 50), 1), 500)
        found = await page(review.desk, who, filters_of(review, params), limit, params.get("after") or None)
    except ValueError as exc:
        return _error(400, str(exc))
    return JSONResponse({"items": [approval_json(a, who) for a, _ in found.items], "next": found.next})


async def run(request: Request) -> Response:
    """GET /api/runs/{run_id}: the run, its decisions and events."""
    review = _review(request)
    await review.reviewer(request)
    run_id = request.path_params["run_id"]
    try:
        info = await review.desk.info(run_id)
    except RunNotFoundError as exc:
        return _error(404, str(exc))
    events = await review.desk.runner(info.workflow).store.events(run_id)
    return JSONResponse(run_json(info, events))


async def approval(request: Request) -> Response:
    """GET /api/runs/{run_id}/approvals/{approval_id}: the approval and its run."""
    review = _review(request)
    who = await review.reviewer(request)
    run_id, approval_id = request.path_params["run_id"], request.path_params["approval_id"]
    try:
        opened = await review.desk.open(run_id, approval_id)
    except RunNotFoundError as exc:
        return _error(404, str(exc))
    a = opened.approval
    return JSONResponse(
        {
            "approval": a.to_json() if a is not None else None,
            "can_decide": a is not None and can_decide(a, who),
            "decided": opened.decided,
            "run": run_json(opened.info, opened.events),
        }
    )


async def decide(request: Request) -> Response:
    """POST /api/runs/{run_id}/approvals/{approval_id}: decide it as the reviewer."""
    review = _review(request)
    who = await review.reviewer(request)
    if not review.auth.bearer(request):
        check_csrf(request)
    run_id, approval_id = request.path_params["run_id"], request.path_params["approval_id"]
    try:
        body = json.loads(await request.body())
    except ValueError as exc:
        return _error(400, f"the body is not JSON: {exc}")
    if not isinstance(body, dict) or body.get("action") not in ("approve", "reject", "respond"):
        return _error(400, 'send {"action": "approve" | "reject" | "respond", ...}')
    action = body["action"]
    comment = body.get("reason") if action == "reject" else body.get("comment")
    if comment is not None and not isinstance(comment, str):
        return _error(422, "comment and reason are strings", errors={"comment": "not a string"})
    try:
        info = await review.desk.decide(
            run_id,
            approval_id,
            action,
            who,
            comment=comment,
            data=body.get("data"),
            result=body.get("result"),
        )
    except NotAuthorizedError as exc:
        return _error(403, str(exc))
    except InvalidStateError as exc:
        return _error(409, str(exc))
    except InvalidInputError as exc:
        return _error(422, str(exc), errors=errors_from_pydantic(exc))
    except RunNotFoundError as exc:
        return _error(404, str(exc))
    return JSONResponse({"run_id": info.run_id, "status": info.status.value})


def routes() -> list[BaseRoute]:
    """The JSON API's routes, under ``/api``."""
    return [
        Route("/api/me", me, methods=["GET"], name="api_me"),
        Route("/api/approvals", approvals, methods=["GET"], name="api_approvals"),
        # A run id may hold "/" (a child run's; percent-encoded or not): the longer route first.
        Route(
            "/api/runs/{run_id:path}/approvals/{approval_id}", approval, methods=["GET"], name="api_approval"
        ),
        Route("/api/runs/{run_id:path}/approvals/{approval_id}", decide, methods=["POST"], name="api_decide"),
        Route("/api/runs/{run_id:path}", run, methods=["GET"], name="api_run"),
    ]
