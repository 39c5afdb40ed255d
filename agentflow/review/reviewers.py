"""Reviewers: who may sign in to the review page, with tokens only their hashes stand for.

``agentflow reviewers add MODULE NAME`` (or :meth:`Reviewers.add`) makes a token
``af_<token_id>_<secret>`` and prints it once; the store keeps, under its ``key_prefix``,
only an argon2id hash of it (with the name, the token id and when it was made), so
someone who reads the store cannot sign in. ``token_id`` names the one hash a token is
checked against. A reviewer may hold several tokens; ``remove`` revokes all of them,
and a session made with a revoked token ends at its next request (:meth:`Reviewers.valid`).

The store must have the :class:`~agentflow.stores.capabilities.Credentials` capability
(the memory, SQLite, Redis and PostgreSQL stores do). Its records::

    review:token:<token_id>   {"name", "token_id", "hash", "created_at"}
    review:session:<id>       {"name", "token_id", "expires"}: a signed-in browser
    review:secret             {"key": base64 of 32 random bytes}: signs session cookies

A session lives in the store, not only in its cookie: signing out deletes it, so a
copy of the cookie taken before stops working too, and ``remove`` ends the sessions of
the reviewer it removes.

The session key is made once per store (put-if-absent), so every replica of the page
signs and reads the same cookies.
"""

from __future__ import annotations

import asyncio
import base64
import re
import secrets
import time
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from ..errors import InvalidInputError, StoreError, WorkflowDefinitionError
from ..stores.capabilities import Credentials
from ..stores.contract import Store

__all__ = ["MAX_NAME", "Reviewer", "Reviewers"]

#: The longest reviewer name, in characters.
MAX_NAME = 64

_TOKENS = "review:token:"
_SESSIONS = "review:session:"
_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{32}")
_SECRET = "review:secret"
_TOKEN = re.compile(r"af_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")
_TOKEN_ID = re.compile(r"[0-9a-f]{16}")
# argon2id with OWASP's first profile (19 MiB, 2 passes, 1 lane). A token's secret is 256
# random bits, so a costlier hash helps no one guard it, and one lane keeps a check to one
# core: on a two-core machine at load 8 a check took 110 ms (median), argon2-cffi's default
# profile (64 MiB, 3 passes, 4 lanes) 600 ms.
_HASHER = PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1)
# A hash no token matches (of a string that is no token; _HASHER's parameters), checked
# when a token's id is unknown: how long an answer takes does not tell which ids exist.
_DECOY = "$argon2id$v=19$m=19456,t=2,p=1$9/hjD9DlrSjDDei1hV2bWA$hrb7lHFFAHtuJOaUbnK/h+z+v/+Q6EUbiczLqJ4nVJI"


@dataclass(frozen=True, slots=True)
class Reviewer:
    """A signed-in reviewer: the name decisions are recorded under, and the token used."""

    name: str
    token_id: str


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not name or len(name) > MAX_NAME or not name.isprintable():
        raise InvalidInputError(f"a reviewer name must be 1 to {MAX_NAME} printable characters, not {name!r}")
    if name != name.strip():
        raise InvalidInputError(f"a reviewer name cannot start or end with a space: {name!r}")
    return name


class Reviewers:
    """The reviewers kept in ``store`` (see the module doc).

    Args:
        store: a store with the ``Credentials`` capability.

    Raises:
        WorkflowDefinitionError: the store keeps no credentials (names its type).
    """

    def __init__(self, store: Store) -> None:
        if not isinstance(store, Credentials):
            raise WorkflowDefinitionError(
                f"the store {type(store).__name__} keeps no credentials, so it cannot hold reviewers "
                "of the review page; use the SQLite, Redis or PostgreSQL store"
            )
        self._store: Credentials = store

    async def add(self, name: str) -> str:
        """A new token for reviewer ``name``: shown to them once, never stored.

        Raises:
            InvalidInputError: ``name`` is empty, longer than :data:`MAX_NAME`, has
                characters that are not printable, or starts or ends with a space.
        """
        _check_name(name)
        while True:
            token_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
            token = f"af_{token_id}_{secret}"
            digest = await asyncio.to_thread(_HASHER.hash, token)
            record = {"name": name, "token_id": token_id, "hash": digest, "created_at": time.time()}
            if await self._store.put_credential(_TOKENS + token_id, record, only_new=True):
                return token
            # A token id drawn twice (one chance in 2**64): draw another.

    async def verify(self, token: str) -> Reviewer | None:
        """The reviewer ``token`` belongs to; None when it is malformed, unknown or revoked.

        The check (argon2id, tens of milliseconds) runs off the event loop, and takes as
        long for an unknown token id as for a wrong secret.
        """
        found = _TOKEN.fullmatch(token) if isinstance(token, str) else None
        if found is None:
            return None
        token_id = found.group(1)
        record = await self._store.get_credential(_TOKENS + token_id) or {}
        digest, name = record.get("hash"), record.get("name")
        if not isinstance(digest, str) or not isinstance(name, str):
            await asyncio.to_thread(_matches, _DECOY, token)  # as long as a wrong secret takes
            return None
        if not await asyncio.to_thread(_matches, digest, token):
            return None
        return Reviewer(name, token_id)

    async def valid(self, name: str, token_id: str) -> bool:
        """True while ``token_id`` is a token of ``name`` that was not revoked (one store read)."""
        if not isinstance(token_id, str) or not _TOKEN_ID.fullmatch(token_id):
            return False
        record = await self._store.get_credential(_TOKENS + token_id)
        return record is not None and record.get("name") == name

    async def remove(self, name: str) -> int:
        """Revoke every token of ``name`` and end their sessions; how many tokens there were
        (0: no such reviewer)."""
        revoked = 0
        for key, record in await self._store.list_credentials(_TOKENS):
            if record.get("name") == name and await self._store.delete_credential(key):
                revoked += 1
        for key, record in await self._store.list_credentials(_SESSIONS):
            if record.get("name") == name:
                await self._store.delete_credential(key)
        return revoked

    async def open_session(self, reviewer: Reviewer, seconds: float) -> str:
        """A new session of ``reviewer`` for ``seconds``: its id, for the signed cookie.

        Sessions past their time are dropped here, so the store keeps only live ones.
        """
        now = time.time()
        for key, record in await self._store.list_credentials(_SESSIONS):
            expires = record.get("expires")
            if not isinstance(expires, (int, float)) or expires <= now:
                await self._store.delete_credential(key)
        while True:
            sid = secrets.token_urlsafe(24)
            record = {"name": reviewer.name, "token_id": reviewer.token_id, "expires": now + seconds}
            if await self._store.put_credential(_SESSIONS + sid, record, only_new=True):
                return sid

    async def session(self, sid: str) -> str | None:
        """The reviewer of session ``sid`` while it is open, not expired and its token not
        revoked; else None (two store reads)."""
        if not isinstance(sid, str) or not _SESSION_ID.fullmatch(sid):
            return None
        record = await self._store.get_credential(_SESSIONS + sid)
        if record is None:
            return None
        name, token_id, expires = record.get("name"), record.get("token_id"), record.get("expires")
        if not isinstance(expires, (int, float)) or expires <= time.time():
            await self._store.delete_credential(_SESSIONS + sid)
            return None
        if not isinstance(name, str) or not isinstance(token_id, str) or not await self.valid(name, token_id):
            return None
        return name

    async def close_session(self, sid: str) -> None:
        """End session ``sid`` (signing out): its cookie, and any copy of it, no longer signs in."""
        if isinstance(sid, str) and _SESSION_ID.fullmatch(sid):
            await self._store.delete_credential(_SESSIONS + sid)

    async def names(self) -> list[str]:
        """The reviewers holding at least one token, sorted."""
        found = {r.get("name") for _, r in await self._store.list_credentials(_TOKENS)}
        return sorted(n for n in found if isinstance(n, str))

    async def secret(self) -> bytes:
        """The key that signs the page's session cookies: 32 bytes, made once per store.

        Raises:
            StoreError: the stored key is damaged.
        """
        record = await self._store.get_credential(_SECRET)
        if record is None:
            fresh = base64.b64encode(secrets.token_bytes(32)).decode()
            await self._store.put_credential(_SECRET, {"key": fresh}, only_new=True)
            record = await self._store.get_credential(_SECRET)  # another replica's, if it was first
        try:
            key = base64.b64decode((record or {})["key"], validate=True)
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"credential {_SECRET!r}: the stored session key is unreadable ({exc})") from exc
        if len(key) != 32:
            raise StoreError(f"credential {_SECRET!r}: the stored session key is not 32 bytes")
        return key


def _matches(digest: str, token: str) -> bool:
    try:
        return _HASHER.verify(digest, token)
    except (VerificationError, InvalidHashError):
        return False
