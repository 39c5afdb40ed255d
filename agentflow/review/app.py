"""``create_app``: the review page as an ASGI application (Starlette, Jinja2 templates).

The app is ready on its first request (or at its lifespan's startup, whichever comes
first): it opens the served workflows' runners, starts the auth (TokenAuth reads the
store's session key) and attaches the webhooks. Mounted inside another Starlette or
FastAPI app, whose lifespan does not reach a mounted app, it gets ready on its first
request all the same; close it with ``await app.state.review.close()`` then.

Every response carries a strict Content-Security-Policy (scripts and styles from the
app's own ``/static`` only; no inline script or style anywhere), ``nosniff``,
``Referrer-Policy: same-origin`` and, but for static files, ``Cache-Control: no-store``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from starlette.applications import Starlette
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import WorkflowDefinitionError
from ..steward import Steward
from ..types import Webhook
from ..webhooks import WebhookSender
from . import api, views
from .auth import Auth, Refused, TokenAuth
from .desk import Desk
from .live import Watch

__all__ = ["CSP", "Review", "SignInNeeded", "create_app"]

#: The page's Content-Security-Policy: nothing but the app's own script and stylesheet.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_SESSION_COOKIE = "agentflow_review"
_SESSION_AGE = 12 * 3600
#: Approvals per served workflow the live watcher compares between two looks.
_WINDOW = 200


class SignInNeeded(Exception):
    """The request has no reviewer: a page redirects to sign-in, the API answers 401."""


class Review:
    """What the routes share: the desk (runners), the auth, templates, the live watcher.

    Reachable from a request as ``request.app.state.review``.
    """

    def __init__(
        self,
        steward: Steward,
        auth: Auth,
        webhooks: Sequence[Webhook],
        execute: bool,
        secret_key: str | bytes | None,
        https: bool | None,
    ) -> None:
        self.desk = Desk(steward, execute=execute)
        if not self.desk.runners:
            raise WorkflowDefinitionError(f"steward {steward.name!r} has no workflows to review")
        self.auth = auth
        self.https = https
        self.webhooks = list(webhooks)
        self._secret = secret_key.encode() if isinstance(secret_key, str) else secret_key
        self._ready: asyncio.Future[bytes] | None = None
        self._sender: WebhookSender | None = None
        self.watch = Watch(self._newest, feeds=self.desk.stores)
        env = Environment(
            loader=PackageLoader("agentflow.review", "templates"),
            autoescape=select_autoescape(default=True, default_for_string=True),
            undefined=StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        env.filters["ago"] = ago
        self.templates = Jinja2Templates(env=env)

    async def ready(self) -> bytes:
        """Start once (runners, auth, webhooks); the key that signs sessions."""
        if self._ready is None:
            self._ready = asyncio.get_running_loop().create_future()
            try:
                await self.desk.start()
                key = await self.auth.start(self.desk.store)
                if self._secret is not None:
                    key = self._secret
                if self.webhooks:
                    self._sender = WebhookSender(self.webhooks)
                    for runner in self.desk.runners:
                        self._sender.attach(runner)
                self._ready.set_result(key)
            except BaseException as exc:
                failed, self._ready = self._ready, None
                if isinstance(exc, Exception):
                    failed.set_exception(exc)
                    failed.exception()  # retrieved here; requests waiting on it get it too
                else:
                    failed.cancel()
                raise
        return await asyncio.shield(self._ready)

    async def close(self) -> None:
        """Stop the live watcher, deliver the webhooks still queued (5 s at most), close the runners."""
        await self.watch.close()
        if self._sender is not None:
            await self._sender.close(timeout=5.0)
            self._sender = None
        await self.desk.close()
        self._ready = None

    async def _newest(self) -> set[str]:
        names = self.desk.workflows
        pages = await asyncio.gather(
            *(self.desk.runner(name).approvals(workflow=name, limit=_WINDOW) for name in names)
        )
        return {a.id for page in pages for a in page}

    async def reviewer(self, request: Request) -> str:
        """The request's reviewer.

        Raises:
            SignInNeeded: nobody is signed in.
            Refused: the request is refused (a proxy's secret is missing).
        """
        who = await self.auth.reviewer(request)
        if who is None:
            raise SignInNeeded()
        return who


def ago(when: datetime) -> str:
    """How long ago ``when`` was, roughly: ``"just now"``, ``"5 min"``, ``"3 h"``, ``"2 days"``."""
    seconds = (datetime.now(UTC) - when).total_seconds()
    if seconds < 60:
        return "just now"
    if seconds < 3600:
        return f"{int(seconds // 60)} min"
    if seconds < 2 * 86400:
        return f"{int(seconds // 3600)} h"
    return f"{int(seconds // 86400)} days"


def relative(scope: Scope) -> str:
    """The request's path below the app's mount point."""
    path, root = str(scope.get("path", "")), str(scope.get("root_path", ""))
    return path[len(root) :] if root and path.startswith(root) else path


class _Headers:
    """Adds the security headers to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = relative(scope).startswith("/static/")

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [
                    (b"content-security-policy", CSP.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"same-origin"),
                    (b"x-frame-options", b"DENY"),
                ]
                if not static:
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, sending)


class _Sessions:
    """Starlette's signed-cookie sessions, keyed once the app is ready (the key is in the store)."""

    def __init__(self, app: ASGIApp, review: Review) -> None:
        self.app, self.review = app, review
        self._made: dict[tuple[bytes, bool], SessionMiddleware] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        key = await self.review.ready()
        secure = self.review.https if self.review.https is not None else scope.get("scheme") == "https"
        mw = self._made.get((key, secure))
        if mw is None:
            mw = self._made[(key, secure)] = SessionMiddleware(
                self.app,
                secret_key=key.hex(),
                session_cookie=_SESSION_COOKIE,
                max_age=int(getattr(self.review.auth, "session_seconds", _SESSION_AGE)),
                same_site="lax",
                https_only=secure,
            )
        await mw(scope, receive, send)


def _wants_json(request: Request) -> bool:
    return relative(request.scope).startswith("/api/") or relative(request.scope) == "/api"


async def _refused(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Refused)
    headers = {"Retry-After": str(max(1, round(exc.retry_after)))} if exc.retry_after else None
    if _wants_json(request):
        return JSONResponse({"error": exc.message}, exc.status, headers=headers)
    return views.error_page(request, exc.status, exc.message, headers=headers)


async def _sign_in(request: Request, exc: Exception) -> Response:
    if _wants_json(request):
        return JSONResponse({"error": "sign in: send Authorization: Bearer <token>"}, 401)
    review: Review = request.app.state.review
    if not review.auth.signs_in:
        return views.error_page(request, 403, "the sign-in proxy did not name a user")
    target = views.href(request, "signin")
    if request.method == "GET":
        where = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        target += "?" + views.urlencode({"next": where})
    return RedirectResponse(target, 303)


def create_app(
    steward: Steward,
    auth: Auth | None = None,
    webhooks: Sequence[Webhook] = (),
    execute: bool = True,
    secret_key: str | bytes | None = None,
    https: bool | None = None,
) -> Starlette:
    """The review page of ``steward``'s workflows, as an ASGI application.

    Args:
        steward: the workflows whose approvals are reviewed (and their children's).
        auth: ``TokenAuth()`` (the default) or ``HeaderAuth(header, secret)``.
        webhooks: ``Webhook``\\ s told of approvals pending and decided.
        execute: True runs a decided run on in this process; False hands it to the
            workers serving the store (``agentflow worker``).
        secret_key: signs session cookies; by default the store's own key (TokenAuth:
            made once per store, so replicas agree) or one derived from HeaderAuth's
            secret.
        https: True marks the cookie Secure; None does when the request came over https.
    """
    review = Review(steward, auth or TokenAuth(), webhooks, execute, secret_key, https)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await review.ready()
        try:
            yield
        finally:
            await review.close()

    routes = [
        *views.routes(),
        *api.routes(),
        Mount("/static", StaticFiles(packages=[("agentflow.review", "static")]), name="static"),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={Refused: _refused, SignInNeeded: _sign_in},
    )
    app.state.review = review
    app.add_middleware(_Sessions, review=review)
    app.add_middleware(_Headers)
    return app
