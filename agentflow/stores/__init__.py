"""Stores: where runs live, behind the one :class:`Store` Protocol.

``MemoryStore`` (the default, nothing survives the process), ``SqliteStore`` (one
file, durable, several processes of one machine), ``RedisStore`` and ``PostgresStore``
(several machines). ``RedisStore`` needs the ``redis`` package (``pip install
agentflow[redis]``), ``PostgresStore`` psycopg 3 (``pip install agentflow[postgres]``);
each is imported only when first asked for, so the core imports without them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import WorkflowDefinitionError
from .contract import Change, Lease, LoadedRun, Store
from .memory import MemoryStore
from .sqlite import Durability, SqliteStore

if TYPE_CHECKING:
    from .postgres import PostgresStore
    from .redis import RedisStore

__all__ = [
    "Change",
    "Lease",
    "LoadedRun",
    "MemoryStore",
    "PostgresStore",
    "RedisStore",
    "SqliteStore",
    "Store",
    "open_store",
]

STORE_KINDS = ("memory", "sqlite", "redis", "postgres")


def __getattr__(name: str) -> Any:
    if name == "RedisStore":
        from .redis import RedisStore

        return RedisStore
    if name == "PostgresStore":
        from .postgres import PostgresStore

        return PostgresStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_store(
    store: str | Store = "memory",
    *,
    key_prefix: str = "",
    url: str | None = None,
    path: str | None = None,
    ttl: float | None = None,
    durability: Durability = "full",
) -> Store:
    """The store a workflow's ``.persistence(...)`` names.

    Args:
        store: ``"memory"``, ``"sqlite"``, ``"redis"``, ``"postgres"``, or a ready ``Store``
            (returned as is).
        key_prefix: namespace for every key (ignored by the memory store).
        url: Redis URL (default ``$REDIS_URL``, then ``redis://localhost:6379/0``), or
            PostgreSQL URL (default ``$DATABASE_URL``, then libpq's defaults).
        path: SQLite file (default ``agentflow.db``).
        ttl: seconds a finished run is kept, or None to keep it.
        durability: SQLite only: ``"full"`` (a commit survives a power loss) or
            ``"normal"`` (it survives a crash of the process).

    Raises:
        WorkflowDefinitionError: an unknown store name or durability, or ``"redis"`` /
            ``"postgres"`` without the ``redis`` / ``psycopg`` package installed.
    """
    if not isinstance(store, str):
        return store
    if store == "memory":
        return MemoryStore(ttl=ttl)
    if store == "sqlite":
        return SqliteStore(path or "agentflow.db", ttl=ttl, key_prefix=key_prefix, durability=durability)
    if store == "redis":
        try:
            from .redis import RedisStore
        except ImportError as exc:
            raise WorkflowDefinitionError(
                f"store='redis' needs the redis package: pip install 'agentflow[redis]' ({exc})"
            ) from exc
        return RedisStore(url, ttl=ttl, key_prefix=key_prefix)
    if store == "postgres":
        try:
            from .postgres import PostgresStore
        except ImportError as exc:
            raise WorkflowDefinitionError(
                f"store='postgres' needs psycopg 3: pip install 'agentflow[postgres]' ({exc})"
            ) from exc
        return PostgresStore(url, ttl=ttl, key_prefix=key_prefix)
    raise WorkflowDefinitionError(
        f"unknown store {store!r}; choose one of {', '.join(STORE_KINDS)} or pass a Store"
    )
