"""Reviewers of the review page: tokens kept as argon2id hashes in real stores, and the CLI."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher
from conftest import StoreFactory

from agentflow.cli import main
from agentflow.errors import InvalidInputError, StoreError, WorkflowDefinitionError
from agentflow.review.reviewers import MAX_NAME, Reviewer, Reviewers
from agentflow.stores import SqliteStore, Store, open_store

KINDS = ("sqlite", "redis", "postgres")


@pytest.fixture(params=KINDS)
def make(request: pytest.FixtureRequest, make_store: StoreFactory) -> StoreFactory:
    """Stores of one kind sharing their data (as the processes of a fleet would)."""
    return partial(make_store, request.param)


async def raw_credentials(store: Store) -> str:
    """Everything the store holds of its credentials, as it holds it."""
    from agentflow.stores.postgres import PostgresStore
    from agentflow.stores.redis import RedisStore

    if isinstance(store, RedisStore):
        found = await store.client.hgetall(store.keys.credentials())
        return repr(found)
    if isinstance(store, PostgresStore):
        import psycopg

        async with await psycopg.AsyncConnection.connect(store.url, autocommit=True) as db:
            rows = await (await db.execute("SELECT ns, key, value FROM agentflow_credentials")).fetchall()
        return repr(rows)
    assert isinstance(store, SqliteStore)
    with sqlite3.connect(store.path) as conn:
        rows = conn.execute("SELECT ns, key, value FROM agentflow_credentials").fetchall()
    conn.close()
    return repr(rows)


async def damage(store: Store, key: str, raw: str) -> None:
    """Overwrite credential ``key`` of ``store`` with the text ``raw``, as it is stored."""
    from agentflow.stores.postgres import PostgresStore
    from agentflow.stores.redis import RedisStore

    if isinstance(store, RedisStore):
        await store.client.hset(store.keys.credentials(), key, raw)
    elif isinstance(store, PostgresStore):
        import psycopg

        async with await psycopg.AsyncConnection.connect(store.url, autocommit=True) as db:
            await db.execute(
                "UPDATE agentflow_credentials SET value = %s WHERE ns = %s AND key = %s",
                (raw, store.key_prefix, key),
            )
    else:
        assert isinstance(store, SqliteStore)
        with sqlite3.connect(store.path) as conn:
            conn.execute(
                "UPDATE agentflow_credentials SET value = ? WHERE ns = ? AND key = ?",
                (raw, store.key_prefix, key),
            )
        conn.close()


# -- the Reviewers API ---------------------------------------------------------------------


async def test_a_token_signs_its_reviewer_in_until_removed(make: StoreFactory) -> None:
    reviewers = Reviewers(make())
    first, second = await reviewers.add("alice"), await reviewers.add("alice")
    bob = await reviewers.add("bob")
    assert first != second and first.startswith("af_")
    me = await reviewers.verify(first)
    assert isinstance(me, Reviewer) and me.name == "alice" and first.startswith(f"af_{me.token_id}_")
    assert await reviewers.valid("alice", me.token_id)
    assert not await reviewers.valid("bob", me.token_id)  # a token is its reviewer's only
    assert await reviewers.names() == ["alice", "bob"]
    assert await reviewers.remove("alice") == 2
    assert await reviewers.verify(first) is None and await reviewers.verify(second) is None
    assert not await reviewers.valid("alice", me.token_id)  # a session made with it ends
    assert await reviewers.names() == ["bob"]
    assert await reviewers.remove("alice") == 0
    found = await reviewers.verify(bob)
    assert found is not None and found.name == "bob"


async def test_only_an_argon2id_hash_of_the_token_is_stored(make: StoreFactory) -> None:
    store = make()
    token = await Reviewers(store).add("alice")
    secret = token.split("_", 2)[2]
    raw = await raw_credentials(store)
    assert "alice" in raw and "$argon2id$" in raw
    assert secret not in raw and token not in raw
    [(key, record)] = await store.list_credentials("review:token:")  # type: ignore[attr-defined]
    assert set(record) == {"name", "token_id", "hash", "created_at"}
    assert key.endswith(record["token_id"]) and abs(record["created_at"] - time.time()) < 60
    assert PasswordHasher().verify(record["hash"], token)


async def test_every_reviewers_of_a_store_signs_with_one_secret(make: StoreFactory) -> None:
    replicas = [Reviewers(make()) for _ in range(3)]
    keys = await asyncio.gather(*(r.secret() for r in replicas * 2))  # replicas starting together
    assert len(set(keys)) == 1 and len(keys[0]) == 32
    assert await Reviewers(make()).secret() == keys[0]  # and after a restart
    elsewhere = await Reviewers(make(key_prefix="other:")).secret()
    assert elsewhere != keys[0] and len(elsewhere) == 32


async def test_a_damaged_session_key_is_an_error_naming_it(make: StoreFactory) -> None:
    store = make()
    reviewers = Reviewers(store)
    await reviewers.secret()
    for raw, why in (
        ("{not json", "unreadable"),
        ('{"key": "c2hvcnQ="}', "not 32 bytes"),
        ("{}", "unreadable"),
    ):
        await damage(store, "review:secret", raw)
        with pytest.raises(StoreError, match=f"review:secret.*{why}"):
            await reviewers.secret()


async def test_tokens_are_known_across_processes_sharing_the_store(make: StoreFactory) -> None:
    token = await Reviewers(make()).add("alice")
    other = Reviewers(make())
    found = await other.verify(token)
    assert found is not None and found.name == "alice"
    assert await other.remove("alice") == 1
    assert await Reviewers(make()).verify(token) is None
    assert await Reviewers(make(key_prefix="other:")).names() == []


async def test_malformed_unknown_and_forged_tokens_are_refused(make: StoreFactory) -> None:
    reviewers = Reviewers(make())
    token = await reviewers.add("alice")
    _, token_id, secret = token.split("_", 2)
    forged = [
        "",
        "af_",
        "alice",
        f"{token} ",
        f" {token}",
        token.upper(),
        f"af_{token_id}_",
        f"af_{token_id}_{secret[:-1]}",
        f"af_{token_id}_{secret}x",
        f"af_{token_id}_{secret[:-1]}{'A' if secret[-1] != 'A' else 'B'}",  # a wrong secret
        f"af_{'0' * 16}_{secret}",  # an unknown id
        f"af_{token_id[:-1]}_{secret}",
        f"xx_{token_id}_{secret}",
        f"af_{token_id}_{secret}\n",
        "af_" + "_" * 60,
    ]
    for bad in forged:
        assert await reviewers.verify(bad) is None, bad
    assert await reviewers.verify(None) is None  # type: ignore[arg-type]
    for token_id_ in ("", "nope", "../../x", token_id.upper()):
        assert not await reviewers.valid("alice", token_id_)
    assert (await reviewers.verify(token)) == Reviewer("alice", token_id)


async def test_an_unknown_token_id_costs_a_hash_check_and_the_loop_goes_on(make: StoreFactory) -> None:
    reviewers = Reviewers(make())
    token = await reviewers.add("alice")
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.001)
            ticks += 1

    # What one argon2 check costs on this machine (tens of milliseconds; less on a fast core).
    from argon2.exceptions import VerificationError

    from agentflow.review.reviewers import _DECOY, _HASHER

    started = time.perf_counter()
    with pytest.raises(VerificationError):
        _HASHER.verify(_DECOY, "not the secret")
    one_check = time.perf_counter() - started
    ticker = asyncio.create_task(tick())
    try:
        started = time.perf_counter()
        assert await reviewers.verify(f"af_{'0' * 16}_{token.split('_', 2)[2]}") is None
        unknown = time.perf_counter() - started
        started = time.perf_counter()
        assert await reviewers.verify(token) is not None
        known = time.perf_counter() - started
    finally:
        ticker.cancel()
    # An unknown id is checked against a decoy hash, so its answer takes about as long as
    # a known one's (each at least about one check); meanwhile the loop kept running.
    timings = (one_check, unknown, known)
    assert unknown > one_check / 2 and known > one_check / 2 and unknown > known / 4, timings
    assert ticks >= 5


async def test_names_are_short_printable_and_unpadded(make_store: StoreFactory) -> None:
    reviewers = Reviewers(make_store("sqlite"))
    for bad in ("", "x" * (MAX_NAME + 1), "a\nb", "tab\there", "\x1b[31mred", " alice", "alice "):
        with pytest.raises(InvalidInputError, match="reviewer name"):
            await reviewers.add(bad)
    for good in ("x" * MAX_NAME, "Zoë Müller", "ops-lead@example.com"):
        found = await reviewers.verify(await reviewers.add(good))
        assert found is not None and found.name == good
    assert await reviewers.names() == sorted(("x" * MAX_NAME, "Zoë Müller", "ops-lead@example.com"))


async def test_memory_keeps_reviewers_and_a_store_without_credentials_is_named() -> None:
    memory = open_store("memory")
    reviewers = Reviewers(memory)
    found = await reviewers.verify(await reviewers.add("alice"))
    assert found is not None and found.name == "alice"

    class RunsOnly:  # a store of someone else's that keeps runs only
        pass

    with pytest.raises(WorkflowDefinitionError, match="RunsOnly keeps no credentials"):
        Reviewers(RunsOnly())  # type: ignore[arg-type]


# -- the command line ----------------------------------------------------------------------


@pytest.fixture
def cli(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> Iterator[Any]:
    """``cli(*args) -> (status, stdout, stderr)``: ``agentflow`` run in this process on a store
    of the test's kind (``tests/reviewer_flows.py``), imported afresh for each command."""
    kind = getattr(request, "param", "sqlite")
    monkeypatch.setenv("REVIEWERS_STORE", kind)
    monkeypatch.setenv("REVIEWERS_DB", str(tmp_path / "reviewers.db"))
    if kind == "redis":
        monkeypatch.setenv("REVIEWERS_URL", request.getfixturevalue("redis_url"))
    elif kind == "postgres":
        monkeypatch.setenv("REVIEWERS_URL", request.getfixturevalue("postgres_url"))

    def run(*args: str) -> tuple[int, str, str]:
        sys.modules.pop("reviewer_flows", None)
        capsys.readouterr()
        status = main(list(args))
        out, err = capsys.readouterr()
        return status, out, err

    yield run
    sys.modules.pop("reviewer_flows", None)


def _store_of(kind: str, tmp_path: Path) -> Store:
    """The store the module's workflows use, opened as the review page would."""
    return open_store(kind, url=os.environ.get("REVIEWERS_URL"), path=str(tmp_path / "reviewers.db"))


async def _verify(store: Store, token: str) -> Reviewer | None:
    try:
        return await Reviewers(store).verify(token)
    finally:
        await store.close()


@pytest.mark.parametrize("cli", KINDS, indirect=True)
def test_reviewers_are_added_listed_and_removed_from_the_command_line(
    cli: Any, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    kind = request.node.callspec.params["cli"]
    status, out, err = cli("reviewers", "add", "reviewer_flows", "editor")
    assert status == 0, err
    notice, token = out.strip().splitlines()
    assert "will not be shown again" in notice and "editor" in notice
    assert token.startswith("af_") and token not in notice
    found = asyncio.run(_verify(_store_of(kind, tmp_path), token))
    assert found is not None and found.name == "editor"
    assert cli("reviewers", "add", "reviewer_flows", "ops")[0] == 0
    assert cli("reviewers", "list", "reviewer_flows")[1].splitlines() == ["editor", "ops"]
    status, out, _ = cli("reviewers", "remove", "reviewer_flows", "editor")
    assert status == 0 and "revoked 1 token" in out
    assert asyncio.run(_verify(_store_of(kind, tmp_path), token)) is None
    status, _, err = cli("reviewers", "remove", "reviewer_flows", "editor")
    assert status == 3 and "no reviewer 'editor'" in err
    assert cli("reviewers", "list", "reviewer_flows")[1].splitlines() == ["ops"]


def test_the_command_line_refuses_what_cannot_hold_reviewers(
    cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    status, _, err = cli("reviewers", "list", "reviewer_flows")  # reading never creates the file
    assert status == 2 and "does not exist" in err and not (tmp_path / "reviewers.db").exists()
    status, _, err = cli("reviewers", "add", "reviewer_flows", "bad\nname")
    assert status == 2 and "InvalidInputError" in err
    monkeypatch.setenv("REVIEWERS_OTHER_DB", str(tmp_path / "other.db"))
    status, _, err = cli("reviewers", "add", "reviewer_flows", "editor")
    assert status == 2 and "different stores" in err and "Publish" in err and "Deploy" in err
    monkeypatch.setenv("REVIEWERS_STORE", "memory")
    status, _, err = cli("reviewers", "add", "reviewer_flows", "editor")
    assert status == 2 and "in memory" in err
    assert not (tmp_path / "other.db").exists() and "Traceback" not in err
