"""Crash recovery with real processes: SIGKILL mid-step and mid-fan-out, resume in a new one.

An append-only log tells what ran where. Before resuming, the test reads the store to
learn what the dead process had committed: committed steps and checkpointed branches
must not run again; the one in flight may run at most twice.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agentflow.stores.contract import LoadedRun, Store

SCRIPT = str(Path(__file__).with_name("crashflows.py"))


def _lines(log: Path) -> list[tuple[str, str, int]]:
    if not log.exists():
        return []
    out = []
    for line in log.read_text().splitlines():
        what, name, pid = line.split()
        out.append((what, name, int(pid)))
    return out


def _spawn(
    cmd: str, flow: str, kind: str, target: str, log: Path, run_id: str, block: bool
) -> subprocess.Popen[str]:
    env = {**os.environ, "CRASH_BLOCK": "1" if block else "0"}
    return subprocess.Popen(
        [sys.executable, SCRIPT, cmd, flow, kind, target, str(log), run_id],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(log: Path, pred, proc: subprocess.Popen[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not pred(_lines(log)):
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"process exited early: {out} {err}")
        assert time.monotonic() < deadline, f"timed out; log so far: {_lines(log)}"
        time.sleep(0.02)


def _target(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if kind == "sqlite":
        return str(tmp_path / "crash.db")
    return request.getfixturevalue(f"{kind}_url")


def _store(kind: str, target: str) -> Store:
    if kind == "sqlite":
        from agentflow.stores import SqliteStore

        return SqliteStore(target)
    if kind == "postgres":
        from agentflow.stores.postgres import PostgresStore

        return PostgresStore(target)
    from agentflow.stores.redis import RedisStore

    return RedisStore(target)


def _kill(proc: subprocess.Popen[str]) -> None:
    """SIGKILL a flow process and reap it."""
    proc.send_signal(signal.SIGKILL)
    proc.communicate()


async def _load(kind: str, target: str, run_id: str) -> LoadedRun | None:
    """The run as its store holds it, read through a store of its own."""
    store = _store(kind, target)
    try:
        return await store.load(run_id)
    finally:
        await store.close()


def _finish(proc: subprocess.Popen[str]) -> str:
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, f"recovering process failed:\n{out}\n{err}"
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["sqlite", "redis", "postgres"])
async def test_sigkill_mid_step_resumes_without_rerunning_finished_steps(kind, tmp_path, request):
    target = _target(kind, tmp_path, request)
    log = tmp_path / "steps.log"
    first = _spawn("start", "linear", kind, target, log, "crash-1", block=True)
    _wait_for(log, lambda ls: ("start", "C", first.pid) in ls, first)
    _kill(first)

    loaded = await _load(kind, target, "crash-1")
    assert loaded is not None
    rec = loaded.record
    assert rec.status == "running" and rec.step == "C"
    assert rec.state["done"] == ["A", "B"]

    second = _spawn("recover", "linear", kind, target, log, "crash-1", block=False)
    out = _finish(second)
    assert "result completed" in out

    starts = collections.Counter(name for what, name, _ in _lines(log) if what == "start")
    ends = collections.Counter(name for what, name, _ in _lines(log) if what == "end")
    assert starts["A"] == 1 and ends["A"] == 1
    assert starts["B"] == 1 and ends["B"] == 1
    assert starts["C"] == 2 and ends["C"] == 1  # killed once in flight, finished once
    assert starts["D"] == 1 and ends["D"] == 1
    pids = {pid for what, name, pid in _lines(log) if name == "D"}
    assert pids == {second.pid}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["sqlite", "redis", "postgres"])
async def test_sigkill_mid_fanout_reruns_only_unfinished_branches(kind, tmp_path, request):
    target = _target(kind, tmp_path, request)
    log = tmp_path / "fan.log"
    first = _spawn("start", "fanout", kind, target, log, "crash-2", block=True)
    # Branches 0..7 finish; 8.. block. Kill once four blocked branches are in flight.
    _wait_for(
        log,
        lambda ls: (
            sum(1 for w, n, _ in ls if w == "end" and n.startswith("branch")) >= 8
            and sum(1 for w, n, _ in ls if w == "start" and n.startswith("branch")) >= 12
        ),
        first,
    )
    await asyncio.sleep(0.2)  # let the group commit of the last finished branches land
    _kill(first)

    loaded = await _load(kind, target, "crash-2")
    assert loaded is not None and loaded.record.step == "Fan"
    checkpointed = {int(k.rsplit(":", 1)[1]) for k in loaded.journal if k.startswith("p:")}
    assert set(range(8)) <= checkpointed  # every branch that finished was checkpointed
    assert not checkpointed & set(range(8, 12))

    second = _spawn("recover", "fanout", kind, target, log, "crash-2", block=False)
    out = _finish(second)
    assert "result completed" in out
    assert str([i * 10 for i in range(12)]) in out

    lines = _lines(log)
    starts = collections.Counter(n for w, n, _ in lines if w == "start")
    for i in range(12):
        if i in checkpointed:
            assert starts[f"branch{i}"] == 1, f"checkpointed branch {i} ran again"
        else:
            assert starts[f"branch{i}"] == 2, f"unfinished branch {i} should run once more"
    assert starts["A"] == 1 and starts["Join"] == 1
