"""The credentials of the memory store: a dict of JSON texts in this process (see ``Credentials``)."""

from __future__ import annotations

from typing import Any

from .codec import credential_key, decode_credential, encode_credential

__all__ = ["MemoryCredentials"]


class MemoryCredentials:
    """The ``Credentials`` methods of :class:`~agentflow.stores.memory.MemoryStore`.

    Values are kept as their JSON, so what comes back is plain JSON data and a caller
    changing a value it was given changes nothing stored.
    """

    _credentials: dict[str, bytes]

    async def put_credential(self, key: str, value: dict[str, Any], only_new: bool = False) -> bool:
        """Write ``value`` under ``key`` (with ``only_new``, only if nothing is there)."""
        raw = encode_credential(key, value)
        if only_new and key in self._credentials:
            return False
        self._credentials[key] = raw
        return True

    async def get_credential(self, key: str) -> dict[str, Any] | None:
        """The value under ``key``, or None."""
        raw = self._credentials.get(credential_key(key))
        return None if raw is None else decode_credential(key, raw)

    async def delete_credential(self, key: str) -> bool:
        """Remove ``key``; False when it held nothing."""
        return self._credentials.pop(credential_key(key), None) is not None

    async def list_credentials(self, prefix: str) -> list[tuple[str, dict[str, Any]]]:
        """Every ``(key, value)`` whose key starts with ``prefix``, by key."""
        found = sorted((k, v) for k, v in self._credentials.items() if k.startswith(prefix))
        return [(k, decode_credential(k, v)) for k, v in found]
