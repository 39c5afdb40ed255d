"""The store conformance suite, part four: the optional ``Credentials`` capability.

A store that keeps credentials adds :class:`CredentialConformance` (or, durable and
shared, :class:`DurableCredentialConformance`) to its test class's bases, beside
``StoreConformance``; the same ``store_factory`` fixture serves both.
"""

from __future__ import annotations

import asyncio

import pytest

from ..errors import StoreError
from ..stores.capabilities import Credentials
from ..stores.contract import Store
from .store_builders import StoreFactory, record, started

__all__ = ["CredentialConformance", "DurableCredentialConformance"]


def credentials(store: Store) -> Credentials:
    """``store`` as a keeper of credentials (the test fails when it is not one)."""
    assert isinstance(store, Credentials), f"{type(store).__name__} does not keep credentials"
    return store


@pytest.mark.asyncio
class CredentialConformance:
    """What a store with the ``Credentials`` capability does. Needs ``store_factory``."""

    async def test_a_credential_is_written_read_replaced_and_deleted(
        self, store_factory: StoreFactory
    ) -> None:
        store = credentials(store_factory())
        assert await store.get_credential("k") is None
        assert await store.put_credential("k", {"hash": "$argon2id$x", "at": 1.5, "tags": ("a", 1)})
        assert await store.get_credential("k") == {"hash": "$argon2id$x", "at": 1.5, "tags": ["a", 1]}
        assert await store.put_credential("k", {"v": 2})  # replaced
        assert await store.get_credential("k") == {"v": 2}
        assert await store.delete_credential("k")
        assert await store.get_credential("k") is None
        assert not await store.delete_credential("k")

    async def test_only_new_never_replaces(self, store_factory: StoreFactory) -> None:
        store = credentials(store_factory())
        assert await store.put_credential("secret", {"v": "first"}, only_new=True)
        assert not await store.put_credential("secret", {"v": "second"}, only_new=True)
        assert await store.get_credential("secret") == {"v": "first"}
        await store.delete_credential("secret")
        assert await store.put_credential("secret", {"v": "third"}, only_new=True)

    async def test_concurrent_puts_if_absent_have_one_winner(self, store_factory: StoreFactory) -> None:
        store = credentials(store_factory())
        won = await asyncio.gather(*(store.put_credential("key", {"n": n}, only_new=True) for n in range(8)))
        assert won.count(True) == 1
        assert await store.get_credential("key") == {"n": won.index(True)}

    async def test_listing_takes_the_prefix_literally_and_sorts_by_key(
        self, store_factory: StoreFactory
    ) -> None:
        store = credentials(store_factory())
        keys = ["tok:b", "tok:a", "tok:%", "tok_x", "tok:*", "tok:[a]", "tok:é", "other:a", "to"]
        for n, key in enumerate(keys):
            await store.put_credential(key, {"n": n})
        listed = await store.list_credentials("tok:")
        assert [k for k, _ in listed] == sorted(k for k in keys if k.startswith("tok:"))
        assert dict(listed)["tok:a"] == {"n": 1}
        assert [k for k, _ in await store.list_credentials("tok_")] == ["tok_x"]
        assert [k for k, _ in await store.list_credentials("tok:%")] == ["tok:%"]
        assert [k for k, _ in await store.list_credentials("")] == sorted(keys)
        assert await store.list_credentials("nothing") == []

    async def test_a_value_that_is_no_json_object_is_refused_before_writing(
        self, store_factory: StoreFactory
    ) -> None:
        store = credentials(store_factory())
        for bad in ([1, 2], "text", {"f": object()}):
            with pytest.raises(StoreError, match="credential 'k'"):
                await store.put_credential("k", bad)  # type: ignore[arg-type]
        assert await store.get_credential("k") is None and await store.list_credentials("") == []
        with pytest.raises(StoreError):
            await store.put_credential("", {"v": 1})

    async def test_credentials_and_runs_do_not_meet(self, store_factory: StoreFactory) -> None:
        store = store_factory()
        keeper = credentials(store)
        await keeper.put_credential("r1", {"v": 1})
        assert await store.get("r1") is None and await store.list_runs() == []
        await started(store)
        assert await store.delete("r1")
        assert await keeper.get_credential("r1") == {"v": 1}


class DurableCredentialConformance(CredentialConformance):
    """Credentials of a store shared by processes: the factory takes ``key_prefix``."""

    async def test_two_store_instances_share_credentials(self, store_factory: StoreFactory) -> None:
        first, second = credentials(store_factory()), credentials(store_factory())
        assert await first.put_credential("key", {"v": 1}, only_new=True)
        assert not await second.put_credential("key", {"v": 2}, only_new=True)
        assert await second.get_credential("key") == {"v": 1}
        assert await second.list_credentials("k") == [("key", {"v": 1})]
        assert await second.delete_credential("key")
        assert await first.get_credential("key") is None

    async def test_concurrent_puts_if_absent_of_two_stores_have_one_winner(
        self, store_factory: StoreFactory
    ) -> None:
        stores = [credentials(store_factory()) for _ in range(3)]
        won = await asyncio.gather(
            *(s.put_credential("key", {"n": n}, only_new=True) for n, s in enumerate(stores * 3))
        )
        assert won.count(True) == 1
        for s in stores:
            assert await s.get_credential("key") == {"n": won.index(True)}

    async def test_key_prefix_separates_credentials(self, store_factory: StoreFactory) -> None:
        store_b = store_factory(key_prefix="b:")
        a, b = credentials(store_factory(key_prefix="a:")), credentials(store_b)
        await a.put_credential("key", {"v": "a"})
        assert await b.get_credential("key") is None and await b.list_credentials("") == []
        assert await b.put_credential("key", {"v": "b"}, only_new=True)
        assert not await a.delete_credential("other")
        assert await a.delete_credential("key")
        assert await b.get_credential("key") == {"v": "b"}
        await store_b.create(record(), [])
        assert await a.list_credentials("") == []
