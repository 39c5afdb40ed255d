"""The conformance suite (``agentflow.testing.store_conformance``) run for each of our stores."""

from __future__ import annotations

import json
import sqlite3
from functools import partial
from typing import Any

import pytest
from conftest import StoreFactory

from agentflow.stores import MemoryStore, SqliteStore, Store
from agentflow.stores.sqlite_schema import BIG, RUNS, VALUES
from agentflow.testing.store_conformance import (
    CredentialConformance,
    DurableCredentialConformance,
    DurableStoreConformance,
    StoreConformance,
    started,
)


class TestMemoryStore(StoreConformance, CredentialConformance):
    @pytest.fixture
    def store_factory(self, make_store: StoreFactory) -> StoreFactory:
        return partial(make_store, "memory")

    async def test_sibling_is_none(self, store: Store) -> None:
        assert isinstance(store, MemoryStore) and store.sibling() is None

    async def test_close_forgets_every_run(self, store: Store) -> None:
        await started(store)
        await store.close()
        assert await store.get("r1") is None and await store.list_runs() == []


class TestSqliteStore(DurableStoreConformance, DurableCredentialConformance):
    @pytest.fixture
    def store_factory(self, make_store: StoreFactory) -> StoreFactory:
        return partial(make_store, "sqlite")

    async def damage(self, store: Store, run_id: str, field: str, raw: str) -> None:
        assert isinstance(store, SqliteStore)
        with sqlite3.connect(store.path) as db:
            if field in BIG:  # input, state and output live in a table of their own
                db.execute(
                    f"INSERT OR REPLACE INTO {VALUES} (ns, run_id, field, value) VALUES (?, ?, ?, ?)",
                    (store.key_prefix, run_id, field, raw),
                )
            else:  # JSON columns hold JSON text, the others plain values
                value: Any = (
                    raw
                    if field in ("pending", "decisions", "error", "usage", "parent", "children")
                    else json.loads(raw)
                )
                db.execute(
                    f"UPDATE {RUNS} SET {field} = ? WHERE ns = ? AND run_id = ?",
                    (value, store.key_prefix, run_id),
                )
        db.close()


class TestRedisStore(DurableStoreConformance, DurableCredentialConformance):
    @pytest.fixture
    def store_factory(self, make_store: StoreFactory) -> StoreFactory:
        return partial(make_store, "redis")

    async def damage(self, store: Store, run_id: str, field: str, raw: str) -> None:
        from agentflow.stores.redis import RedisStore

        assert isinstance(store, RedisStore)
        await store.client.hset(store.keys.run(run_id).rec, field, raw)


class TestRedisClusterCredentials(DurableCredentialConformance):
    """The cluster's run store is pinned in test_redis_cluster.py; its credentials here."""

    @pytest.fixture
    def store_factory(self, make_store: StoreFactory) -> StoreFactory:
        return partial(make_store, "redis_cluster")

    async def test_the_credentials_hash_has_a_hash_tag_of_its_own(self, store_factory: StoreFactory) -> None:
        from agentflow.stores.keys import slot
        from agentflow.stores.redis import RedisStore

        for prefix in ("", "app:", "{app}:"):
            store = store_factory(key_prefix=prefix)
            assert isinstance(store, RedisStore)
            key = store.keys.credentials()
            assert key.startswith(prefix) and slot(key.encode()) == slot(
                b"{app}" if "{" in prefix else b"{credentials}"
            )
            assert await store.put_credential("k", {"v": prefix})
            assert await store.client.hget(key, "k") == f'{{"v":"{prefix}"}}'.encode()


class TestPostgresStore(DurableStoreConformance, DurableCredentialConformance):
    @pytest.fixture
    def store_factory(self, make_store: StoreFactory) -> StoreFactory:
        return partial(make_store, "postgres")

    async def damage(self, store: Store, run_id: str, field: str, raw: str) -> None:
        import psycopg

        from agentflow.stores.codec import JSON_FIELDS
        from agentflow.stores.postgres import PostgresStore
        from agentflow.stores.postgres_schema import RUNS

        assert isinstance(store, PostgresStore)
        async with await psycopg.AsyncConnection.connect(store.url, autocommit=True) as db:
            value: Any = raw
            if field not in JSON_FIELDS:  # a typed column holds the decoded value
                value = json.loads(raw)
                if field not in ("status", "workflow", "step", "lease_owner", "control"):
                    # A number column cannot hold a string: damage it with a NULL instead.
                    await db.execute(f"ALTER TABLE {RUNS} ALTER COLUMN {field} DROP NOT NULL")
                    value = None
            await db.execute(
                f"UPDATE {RUNS} SET {field} = %s WHERE ns = %s AND run_id = %s",
                (value, store.key_prefix, run_id),
            )
