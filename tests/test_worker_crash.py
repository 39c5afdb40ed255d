"""Worker processes (``agentflow worker``) killed and stopped under a client's runs.

SIGKILL in the middle of a step: another worker takes the run over once its lease ran
out, with no ``recover()`` written anywhere; finished steps do not run again and the
step in flight runs once more. SIGTERM: the worker finishes its step, hands the run on,
and exits 0 saying what it did.
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
from typing import Any

import fleetflows
import pytest
from test_crash import _kill

from agentflow import WorkflowRunner
from agentflow.stores import SqliteStore
from agentflow.stores.contract import Store

HERE = Path(__file__).parent

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def _env(kind: str, target: str, log: Path, block: str = "") -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(HERE),
        "FLEET_STORE": "redis" if kind == "redis_cluster" else kind,
        "FLEET_TARGET": target,
        "FLEET_LOG": str(log),
        "FLEET_BLOCK": block,
    }


def _worker(env: dict[str, str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "agentflow.cli", "worker", "fleetflows", "--concurrency", "10"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and "FleetPipeline" in proc.stdout.readline()
    return proc


def _lines(log: Path) -> list[tuple[str, str, str, int]]:
    if not log.exists():
        return []
    return [(w, n, r, int(p)) for w, n, r, p in (line.split() for line in log.read_text().splitlines())]


def _until(check, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _client(kind: str, target: str, workflow: Any = None) -> WorkflowRunner:
    """A client of the workers: the same workflow, on the same store, running nothing itself."""
    if kind == "sqlite":
        store: Store = SqliteStore(target)
    else:
        from agentflow.stores.redis import RedisStore

        store = RedisStore(target)
    return WorkflowRunner(workflow or fleetflows.pipeline, store=store, execute=False)


def _target(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if kind == "sqlite":
        return str(tmp_path / "fleet.db")
    return request.getfixturevalue("redis_cluster_url" if kind == "redis_cluster" else "redis_url")


async def _carry_on(
    env: dict[str, str], handles: list[Any], timeout: float = 60
) -> tuple[list[Any], subprocess.Popen[str], str, str]:
    """Start another worker, wait (``timeout`` s each) for the runs' results, then SIGTERM it.

    Returns the results, the worker, and what it printed (stdout, stderr).
    """
    worker = _worker(env)
    try:
        results = [await h.result(timeout=timeout) for h in handles]
    finally:
        worker.send_signal(signal.SIGTERM)
        out, err = worker.communicate(timeout=30)
    return results, worker, out, err


@pytest.mark.parametrize("kind", ["sqlite", "redis", "redis_cluster"])
async def test_a_worker_killed_mid_step_is_taken_over_by_another(kind, tmp_path, request) -> None:
    log = tmp_path / "steps.log"
    target = _target(kind, tmp_path, request)
    doomed = _worker(_env(kind, target, log, block="B"))
    client = _client(kind, target)
    async with client:
        handles = [await client.run(run_id=f"r{i}") for i in range(3)]
        _until(lambda: sum(1 for w, n, _, _ in _lines(log) if (w, n) == ("start", "B")) == 3)
        _kill(doomed)
        results, survivor, out, err = await _carry_on(_env(kind, target, log), handles)
    await client.store.close()
    assert survivor.returncode == 0, err
    assert {r.status.value for r in results} == {"completed"} and {r.output for r in results} == {
        survivor.pid
    }
    starts = collections.Counter((n, p == doomed.pid) for w, n, _, p in _lines(log) if w == "start")
    assert starts == {("A", True): 3, ("B", True): 3, ("B", False): 3, ("C", False): 3}
    assert "0 runs handed over, 3 recovered" in out


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
async def test_sigterm_lets_the_step_finish_and_hands_the_runs_on(kind, tmp_path, request) -> None:
    log = tmp_path / "steps.log"
    target = _target(kind, tmp_path, request)
    first = _worker(_env(kind, target, log))
    client = _client(kind, target)
    async with client:
        handles = [await client.run(run_id=f"t{i}") for i in range(4)]
        _until(lambda: any(n == "B" for _, n, _, _ in _lines(log)))
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=30)
        assert first.returncode == 0, err
        assert "worker stopped: 4 runs handed over" in out
        results, _, _, _ = await _carry_on(_env(kind, target, log), handles, timeout=30)
    await client.store.close()
    assert {r.status.value for r in results} == {"completed"}
    starts = collections.Counter((n, r) for w, n, r, _ in _lines(log) if w == "start")
    assert set(starts.values()) == {1}  # no step of any run ran twice
    assert len(starts) == 12


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
async def test_a_worker_killed_mid_fanout_leaves_its_finished_branches_done(kind, tmp_path, request) -> None:
    log = tmp_path / "steps.log"
    target = _target(kind, tmp_path, request)
    doomed = _worker(_env(kind, target, log, block="branch"))
    client = _client(kind, target, fleetflows.fanout)
    async with client:
        handle = await client.run(run_id="fan")
        _until(lambda: sum(1 for w, n, _, _ in _lines(log) if w == "end" and n.startswith("branch")) == 3)
        _until(lambda: sum(1 for w, n, _, _ in _lines(log) if w == "start" and n.startswith("branch")) == 6)
        for _ in range(500):  # until the finished branches' results are journaled
            loaded = await client.store.load("fan")
            if loaded is not None and sum(1 for k in loaded.journal if k.startswith("p:")) >= 3:
                break
            await asyncio.sleep(0.01)
        _kill(doomed)
        (result,), _, _, _ = await _carry_on(_env(kind, target, log), [handle])
    await client.store.close()
    assert result.output == "joined"
    starts = collections.Counter(n for w, n, _, _ in _lines(log) if w == "start")
    # branches 0-2 finished before the kill and never ran again; 3-5 were in flight: once more
    assert starts == {**{f"branch{i}": 1 for i in range(3)}, **{f"branch{i}": 2 for i in range(3, 6)}}


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
async def test_a_worker_killed_mid_tool_call_runs_the_idempotent_tool_once_more(
    kind, tmp_path, request
) -> None:
    log = tmp_path / "steps.log"
    target = _target(kind, tmp_path, request)
    doomed = _worker(_env(kind, target, log, block="probe"))
    client = _client(kind, target, fleetflows.agentic)
    async with client:
        handle = await client.run(run_id="agent")
        _until(lambda: any((w, n) == ("start", "probe") for w, n, _, _ in _lines(log)))
        _kill(doomed)
        (result,), _, _, _ = await _carry_on(_env(kind, target, log), [handle])
    await client.store.close()
    assert result.output == "All up."
    starts = collections.Counter(n for w, n, _, _ in _lines(log) if w == "start")
    assert starts == {"Ask": 2, "probe": 2}  # the step and the tool in flight, once more each
