"""Composition under SIGKILL, with real processes on SQLite and Redis.

A process kills itself at the worst moments of a parent's life (see
``composeflows.py``); a new process (or two at once) recovers. Whatever the moment,
exactly one child run exists and the parent goes on past its child exactly once.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_crash import _lines, _store, _target

SCRIPT = str(Path(__file__).with_name("composeflows.py"))


def _spawn(
    cmd: str, kind: str, target: str, log: Path, run_id: str, kill_at: str, flow: str = "one"
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, SCRIPT, cmd, kind, target, str(log), run_id, kill_at],
        env={**os.environ, "COMPOSE_FLOW": flow},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _killed(proc: subprocess.Popen[str]) -> None:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == -9, f"the process was to kill itself:\n{out}\n{err}"


def _finish(proc: subprocess.Popen[str]) -> str:
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, f"recovering process failed:\n{out}\n{err}"
    return out


async def _runs(kind: str, target: str, workflow: str) -> list[str]:
    store = _store(kind, target)
    try:
        return [r.run_id for r in await store.list_runs(workflow)]
    finally:
        await store.close()


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["sqlite", "redis"])
async def test_sigkill_between_starting_the_child_and_parking_the_parent(kind, tmp_path, request):
    target = _target(kind, tmp_path, request)
    log = tmp_path / "compose.log"
    _killed(_spawn("start", kind, target, log, "train-1", "park"))
    assert await _runs(kind, target, "Leg") == ["train-1/__start__.1"]  # created before the kill
    parent = await _runs(kind, target, "Train")
    assert parent == ["train-1"]

    out = _finish(_spawn("recover", kind, target, log, "train-1", "none"))
    assert "result completed {'doubled': 42, 'typed': 'LegOut'}" in out
    assert await _runs(kind, target, "Leg") == ["train-1/__start__.1"]  # found again, not started twice
    counts = collections.Counter(name for what, name, _ in _lines(log) if what == "start")
    assert counts["prep"] == 2  # the step in flight ran again after the crash...
    assert counts["after"] == 1  # ...and the parent went past its child once
    assert 1 <= counts["leg"] <= 2


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["sqlite", "redis"])
async def test_sigkill_between_the_child_ending_and_the_parent_resuming_two_recoverers(
    kind, tmp_path, request
):
    target = _target(kind, tmp_path, request)
    log = tmp_path / "compose.log"
    _killed(_spawn("start", kind, target, log, "train-2", "resume"))
    store = _store(kind, target)
    try:
        parent = await store.get("train-2")
        child = await store.get("train-2/__start__.1")
    finally:
        await store.close()
    assert parent is not None and parent.status == "waiting"
    assert child is not None and child.status == "completed"

    # Two processes recover at once: the parent is resumed by one of them, once.
    a = _spawn("recover", kind, target, log, "train-2", "none")
    b = _spawn("recover", kind, target, log, "train-2", "none")
    outs = [_finish(a), _finish(b)]
    assert all("result completed {'doubled': 42, 'typed': 'LegOut'}" in o for o in outs)
    lines = _lines(log)
    counts = collections.Counter(name for what, name, _ in lines if what == "start")
    assert counts["prep"] == 1 and counts["leg"] == 1
    assert counts["after"] == 1
    assert {pid for what, name, pid in lines if name == "after"} <= {a.pid, b.pid}
    assert await _runs(kind, target, "Leg") == ["train-2/__start__.1"]


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["sqlite", "redis"])
async def test_sigkill_in_a_fan_out_of_children_before_the_parent_parks(kind, tmp_path, request):
    target = _target(kind, tmp_path, request)
    log = tmp_path / "compose.log"
    _killed(_spawn("start", kind, target, log, "fan-1", "park", flow="fan"))
    ids = [f"fan-1/__start__.1.{i}" for i in range(5)]
    assert sorted(await _runs(kind, target, "Leg")) == ids  # every child was created before the kill

    out = _finish(_spawn("recover", kind, target, log, "fan-1", "none", flow="fan"))
    assert "result completed {'doubled': [0, 2, 4, 6, 8], 'typed': 'LegOut'}" in out
    assert sorted(await _runs(kind, target, "Leg")) == ids  # the same five, none started twice
    counts = collections.Counter(name for what, name, _ in _lines(log) if what == "start")
    assert counts["after"] == 1
