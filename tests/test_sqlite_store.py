"""SqliteStore beyond the conformance suite: several processes on one file, WAL, purging."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import textwrap
from pathlib import Path

from store_helpers import event, record, started

from agentflow.records import Commit, RunStatus
from agentflow.stores import SqliteStore

ROOT = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent(
    """
    import asyncio, dataclasses, sys
    from agentflow.records import RunEvent
    from agentflow.stores import Change, SqliteStore

    def bump(rec):
        event = RunEvent(kind="bump", run_id=rec.run_id, at=0.0, seq=rec.event_count + 1)
        return Change(dataclasses.replace(rec, visit=rec.visit + 1), [event])

    async def main(path, n):
        store = SqliteStore(path)
        for _ in range(n):
            await store.update("r1", bump)
        await store.close()

    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
    """
)


async def test_processes_updating_one_file_lose_no_writes(tmp_path: Path) -> None:
    path = str(tmp_path / "shared.db")
    store = SqliteStore(path)
    try:
        await store.create(record(), [])
        workers = [
            await asyncio.create_subprocess_exec(
                sys.executable, "-c", WORKER, path, "150", cwd=ROOT, stderr=asyncio.subprocess.PIPE
            )
            for _ in range(3)
        ]
        for worker in workers:
            _, err = await asyncio.wait_for(worker.communicate(), 50)
            assert worker.returncode == 0, err.decode()
        rec = await store.get("r1")
        assert rec is not None and rec.visit == 450 and rec.event_count == 450
        assert [e.seq for e in await store.events("r1")] == list(range(1, 451))
    finally:
        await store.close()


async def test_database_is_in_wal_mode_and_opened_lazily(tmp_path: Path) -> None:
    path = tmp_path / "lazy.db"
    store = SqliteStore(str(path))
    assert not path.exists()  # nothing opened until first use
    await store.get("r1")
    await store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


async def test_expired_runs_are_purged_from_the_file(tmp_path: Path) -> None:
    path = str(tmp_path / "ttl.db")
    store = SqliteStore(path, ttl=0.2)
    try:
        lease = await started(store, "old")
        await store.commit(
            "old", lease, Commit(fields={"status": RunStatus.COMPLETED}, events=[event("x", 2)])
        )
        await asyncio.sleep(0.3)
        assert await store.get("old") is None
        await store.create(record("new"), [])  # a write purges what expired
        with sqlite3.connect(path) as db:
            for table in ("agentflow_runs", "agentflow_events", "agentflow_journal", "agentflow_outputs"):
                count = db.execute(f"SELECT count(*) FROM {table} WHERE run_id = 'old'").fetchone()[0]
                assert count == 0, table
        db.close()
    finally:
        await store.close()
