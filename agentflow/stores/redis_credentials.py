"""The Redis store's credentials: one hash per key prefix (see ``Credentials``).

``P#{credentials}`` (built in :mod:`agentflow.stores.keys`) maps each credential's key
to its JSON. Every call is one command on that one key (``HSETNX`` for a put-if-absent),
so it is atomic, and on Redis Cluster it goes to the one slot the hash tag names.
Connection failures are retried as the store's other round trips are; a put sent again
after a lost reply writes the same value again, and a put-if-absent then answers False
(the key holds a value: the first attempt's).
"""

from __future__ import annotations

from typing import Any

from .codec import credential_key, decode_credential, encode_credential
from .keys import Keys
from .redis_wire import Wire, pairs

__all__ = ["RedisCredentials"]


class RedisCredentials:
    """The ``Credentials`` methods of :class:`~agentflow.stores.redis.RedisStore`."""

    keys: Keys
    _wire: Wire

    async def _credential_call(self, what: str, *command: bytes) -> Any:
        wire = self._wire
        [reply] = await wire.retrying(what, None, lambda: wire.call([command]))
        return reply

    async def put_credential(self, key: str, value: dict[str, Any], only_new: bool = False) -> bool:
        """Write ``value`` under ``key`` (with ``only_new``, only if nothing is there: ``HSETNX``)."""
        raw = encode_credential(key, value)
        verb = b"HSETNX" if only_new else b"HSET"
        written = await self._credential_call(
            f"writing credential {key!r}", verb, self.keys.credentials().encode(), key.encode(), raw
        )
        return bool(written) or not only_new  # HSET answers 0 for a field it replaced

    async def get_credential(self, key: str) -> dict[str, Any] | None:
        """The value under ``key``, or None."""
        raw = await self._credential_call(
            f"reading credential {key!r}",
            b"HGET",
            self.keys.credentials().encode(),
            credential_key(key).encode(),
        )
        return None if raw is None else decode_credential(key, raw)

    async def delete_credential(self, key: str) -> bool:
        """Remove ``key``; False when it held nothing."""
        gone = await self._credential_call(
            f"deleting credential {key!r}",
            b"HDEL",
            self.keys.credentials().encode(),
            credential_key(key).encode(),
        )
        return bool(gone)

    async def list_credentials(self, prefix: str) -> list[tuple[str, dict[str, Any]]]:
        """Every ``(key, value)`` whose key starts with ``prefix``, by key (one ``HGETALL``)."""
        found = pairs(
            await self._credential_call(
                f"listing credentials {prefix!r}", b"HGETALL", self.keys.credentials().encode()
            )
        )
        start = prefix.encode()
        keys = sorted(k for k in found if k.startswith(start))  # UTF-8 sorts as the code points do
        return [(k.decode(), decode_credential(k.decode(), found[k])) for k in keys]
