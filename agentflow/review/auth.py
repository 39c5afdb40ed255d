"""Who is reviewing: ``TokenAuth`` (a reviewer's token, exchanged for a session) and
``HeaderAuth`` (an SSO proxy in front names the user), plus the session's CSRF token.

Every request's reviewer comes from here and nowhere else: a form never says who
decides. A browser session is a signed cookie (Starlette's ``SessionMiddleware``,
itsdangerous underneath: HttpOnly, SameSite=Lax, Secure behind https) holding the
reviewer's name, the id of the token they signed in with and a CSRF token; each request
asks ``Reviewers.valid`` whether that token is still not revoked. Every POST made with a
session (or a proxy's header) carries the CSRF token, as the form field ``csrf`` or the
header ``X-CSRF-Token``; a JSON client may instead send ``Authorization: Bearer af_...``,
which needs no CSRF token (a browser never sends it on its own).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Mapping
from typing import Protocol

from starlette.requests import Request

from ..stores.contract import Store
from .reviewers import Reviewers

__all__ = ["Auth", "HeaderAuth", "Refused", "TokenAuth", "check_csrf", "csrf_token"]


class Refused(Exception):
    """The request may not go on: ``status`` (401, 403, 429) and a message for the reviewer."""

    def __init__(self, status: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


class Auth(Protocol):
    """How the review app learns who a request comes from (``TokenAuth``, ``HeaderAuth``)."""

    #: True when reviewers sign in on the page (with a token); False when a proxy signs them in.
    signs_in: bool

    async def start(self, store: Store) -> bytes:
        """Get ready to serve reviewers of ``store``; returns the key that signs sessions."""
        ...

    async def reviewer(self, request: Request) -> str | None:
        """The reviewer ``request`` comes from, or None (not signed in).

        Raises:
            Refused: the request is refused outright (a proxy's secret missing).
        """
        ...

    def bearer(self, request: Request) -> bool:
        """True when ``request`` carries its own credential (no CSRF token needed)."""
        ...


def csrf_token(request: Request) -> str:
    """The session's CSRF token (made on first use); every form carries it as ``csrf``."""
    session = request.session
    token = session.get("csrf")
    if not isinstance(token, str) or not token:
        token = session["csrf"] = secrets.token_urlsafe(24)
    return token


def check_csrf(request: Request, form: Mapping[str, list[str]] | None = None) -> None:
    """Refuse (403) a POST whose CSRF token (form field ``csrf`` or ``X-CSRF-Token``) is not the session's.

    Raises:
        Refused: the token is missing or wrong.
    """
    expected = request.session.get("csrf")
    sent = request.headers.get("x-csrf-token")
    if sent is None and form is not None:
        sent = next(iter(form.get("csrf") or ()), None)
    if not isinstance(expected, str) or not expected or sent is None:
        raise Refused(403, "this form has expired or did not come from the review page; reload it")
    if not hmac.compare_digest(sent.encode(), expected.encode()):
        raise Refused(403, "this form has expired or did not come from the review page; reload it")


class _Attempts:
    """At most ``limit`` failed attempts per client in any ``per`` seconds (a sliding window).

    Only failures count, so a team signing in from behind one address is not held up
    by its own sign-ins; a client past the limit is refused before its token is checked.
    """

    def __init__(self, limit: int, per: float, clients: int = 10_000) -> None:
        self.limit, self.per, self.clients = limit, per, clients
        self._failed: OrderedDict[str, deque[float]] = OrderedDict()

    def check(self, client: str) -> None:
        """Refuse ``client`` while it has ``limit`` failures within ``per`` seconds.

        Raises:
            Refused: 429, with the seconds until its oldest failure leaves the window.
        """
        seen = self._failed.get(client)
        if not seen:
            return
        now = time.monotonic()
        while seen and seen[0] <= now - self.per:
            seen.popleft()
        if len(seen) >= self.limit:
            raise Refused(429, "too many sign-in attempts; wait a minute", seen[0] + self.per - now)

    def failed(self, client: str) -> None:
        """Count a failure of ``client`` (the least recent clients are forgotten past ``clients``)."""
        seen = self._failed.pop(client, None) or deque()
        seen.append(time.monotonic())
        self._failed[client] = seen
        if len(self._failed) > self.clients:
            self._failed.popitem(last=False)


def _client(request: Request) -> str:
    return request.client.host if request.client else "?"


class TokenAuth:
    """Reviewers sign in with a token from ``agentflow reviewers add NAME``.

    Only an argon2 hash of each token is stored (in the served store, under its
    ``key_prefix``); signing in exchanges the token for a session cookie, and
    ``agentflow reviewers remove NAME`` revokes it (the next request of that session
    is signed out). A JSON client may send the token itself as
    ``Authorization: Bearer af_...``.

    Args:
        attempts: failed sign-ins (and bearer tokens) allowed per client ...
        per: ... in any this many seconds; past them the client gets 429 until the
            oldest leaves the window.
        session_hours: how long a sign-in lasts (the session is kept in the store, so
            signing out ends every copy of its cookie).
    """

    signs_in = True

    def __init__(self, attempts: int = 10, per: float = 60.0, session_hours: float = 12.0) -> None:
        self._attempts = _Attempts(attempts, per)
        self.session_seconds = session_hours * 3600
        self._reviewers: Reviewers | None = None
        # Bearer tokens already checked (argon2 is slow by design): sha256 -> (name, token id).
        self._checked: OrderedDict[bytes, tuple[str, str]] = OrderedDict()

    @property
    def reviewers(self) -> Reviewers:
        """The store's reviewers, once started."""
        if self._reviewers is None:
            raise RuntimeError("TokenAuth is not started; the review app starts it on its first request")
        return self._reviewers

    async def start(self, store: Store) -> bytes:
        self._reviewers = Reviewers(store)
        return await self._reviewers.secret()

    async def sign_in(self, request: Request, token: str) -> str | None:
        """Check ``token`` and start a session for its reviewer; their name, or None.

        Raises:
            Refused: 429, too many attempts from this client.
        """
        client = _client(request)
        self._attempts.check(client)
        found = await self.reviewers.verify(token.strip())
        if found is None:
            self._attempts.failed(client)
            return None
        sid = await self.reviewers.open_session(found, self.session_seconds)
        request.session.clear()
        request.session.update({"sid": sid, "csrf": secrets.token_urlsafe(24)})
        return found.name

    async def sign_out(self, request: Request) -> None:
        """End the request's session, in the store too (a copy of its cookie signs in no more)."""
        sid = request.session.get("sid")
        if isinstance(sid, str):
            await self.reviewers.close_session(sid)
        request.session.clear()

    def bearer(self, request: Request) -> bool:
        return request.headers.get("authorization", "").lower().startswith("bearer ")

    async def reviewer(self, request: Request) -> str | None:
        if self.bearer(request):
            return await self._bearer(request.headers["authorization"][7:].strip(), request)
        sid = request.session.get("sid")
        if not isinstance(sid, str):
            return None
        who = await self.reviewers.session(sid)
        if who is None:
            request.session.pop("sid", None)
        return who

    async def _bearer(self, token: str, request: Request) -> str | None:
        key = hashlib.sha256(token.encode()).digest()
        known = self._checked.get(key)
        if known is None:
            client = _client(request)
            self._attempts.check(client)
            found = await self.reviewers.verify(token)
            if found is None:
                self._attempts.failed(client)
                return None
            known = self._checked[key] = (found.name, found.token_id)
            if len(self._checked) > 1000:
                self._checked.popitem(last=False)
        if not await self.reviewers.valid(*known):
            self._checked.pop(key, None)
            return None
        return known[0]


class HeaderAuth:
    """An SSO proxy in front (oauth2-proxy and the like) signs reviewers in and names them.

    The proxy sets ``header`` to the user's name and ``secret_header`` to ``secret``;
    a request without that secret is refused with 403 (so nobody who reaches the app
    past the proxy can claim a name). The secret is compared in constant time.

    Args:
        header: the header that names the reviewer, e.g. ``X-Forwarded-User``.
        secret: the shared secret the proxy sends.
        secret_header: the header that carries it.
    """

    signs_in = False

    def __init__(self, header: str, secret: str, secret_header: str = "X-Agentflow-Secret") -> None:
        if not secret:
            raise ValueError("HeaderAuth needs a non-empty shared secret")
        self.header = header.lower()
        self.secret_header = secret_header.lower()
        self._secret = secret.encode()

    async def start(self, store: Store) -> bytes:
        # Replicas behind one proxy share the secret, so they agree on the session key.
        return hmac.new(self._secret, b"agentflow review session", hashlib.sha256).digest()

    def bearer(self, request: Request) -> bool:
        return False

    async def reviewer(self, request: Request) -> str | None:
        sent = request.headers.get(self.secret_header, "").encode()
        if not hmac.compare_digest(sent, self._secret):
            raise Refused(403, "this page is served behind a sign-in proxy; go through it")
        name = request.headers.get(self.header, "").strip()
        if not name:
            raise Refused(403, f"the sign-in proxy did not name a user (header {self.header})")
        return name
