"""SIGKILL a process whose agent is calling tools, and recover the run in another one.

The model is the local LLM server (it counts requests), the tools count their runs in
a file (tests/toolcrashflows.py): (a) killed right after a tool's result was journaled,
neither the tool nor the model is called again for it (an idempotent tool's result rides
in the next reply's write, so one cut off before that reply runs again); (b) killed while a tool that is
not idempotent runs, the run parks on a ``tool_outcome`` approval; (c) killed while an
idempotent tool runs, it runs once more; (d) killed while the run waits for a tool's
approval, the approval in a new process runs the tool once and the run goes on.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from llm_server import LLMServer, Reply, ToolCall
from test_crash import _kill, _target

SCRIPT = str(Path(__file__).with_name("toolcrashflows.py"))

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def _spawn(
    cmd: str, kind: str, target: str, log: Path, run_id: str, block: str = ""
) -> subprocess.Popen[str]:
    env = {**os.environ, "CRASH_BLOCK": block, "CRASH_LOG": str(log)}
    return subprocess.Popen(
        [sys.executable, SCRIPT, cmd, kind, target, str(log), run_id],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _ran(log: Path) -> collections.Counter[tuple[str, str]]:
    lines = log.read_text().splitlines() if log.exists() else []
    return collections.Counter((what, name) for what, name, _ in (line.split() for line in lines))


def _until(check: Any, proc: subprocess.Popen[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"process exited early:\n{out}\n{err}")
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _done(proc: subprocess.Popen[str]) -> str:
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, f"process failed:\n{out}\n{err}"
    return out


def _calls(*calls: tuple[str, dict[str, Any]]) -> Reply:
    return Reply(tool_calls=[ToolCall(name, args, id=f"c{i}") for i, (name, args) in enumerate(calls, 1)])


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_a_killed_right_after_a_result_is_journaled(kind, tmp_path, request, llm_env: LLMServer) -> None:
    target, log = _target(kind, tmp_path, request), tmp_path / "tools.log"
    # The second model request hangs: the process is killed with deploy's result journaled.
    llm_env.script(
        _calls(("lookup", {"service": "api"}), ("deploy", {"version": "1.2"})), Reply("x", latency=60)
    )
    first = _spawn("start", kind, target, log, "a-1")
    _until(lambda: len(llm_env.requests) == 2, first)
    _kill(first)
    llm_env.script("Shipped 1.2.")
    out = _done(_spawn("recover", kind, target, log, "a-1"))
    assert "status completed" in out and "Shipped 1.2." in out
    # deploy is not idempotent: its result was journaled the moment it finished, and it
    # never runs again. lookup is idempotent: its result rides in the write of the next
    # reply, which never came, so it runs once more (what idempotent allows; it saves a
    # write per turn).
    assert _ran(log) == {
        ("start", "lookup"): 2,
        ("end", "lookup"): 2,
        ("start", "deploy"): 1,
        ("end", "deploy"): 1,
    }
    # The recovered run asked the model only the question it had no answer to, with both results.
    assert len(llm_env.requests) == 3
    tools = [m for m in llm_env.requests[2].body["messages"] if m["role"] == "tool"]
    assert [m["tool_call_id"] for m in tools] == ["c1", "c2"] and "deployed 1.2" in tools[1]["content"]


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_b_killed_while_a_non_idempotent_tool_runs(kind, tmp_path, request, llm_env: LLMServer) -> None:
    target, log = _target(kind, tmp_path, request), tmp_path / "tools.log"
    llm_env.script(_calls(("deploy", {"version": "1.2"})))
    first = _spawn("start", kind, target, log, "b-1", block="deploy")
    _until(lambda: _ran(log)[("start", "deploy")] == 1, first)
    _kill(first)
    out = _done(_spawn("recover", kind, target, log, "b-1"))
    assert "status waiting" in out and "approval tool_outcome deploy" in out
    assert _ran(log) == {("start", "deploy"): 1} and len(llm_env.requests) == 1


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_c_killed_while_an_idempotent_tool_runs(kind, tmp_path, request, llm_env: LLMServer) -> None:
    target, log = _target(kind, tmp_path, request), tmp_path / "tools.log"
    llm_env.script(_calls(("check", {"service": "api"})), "All healthy.")
    first = _spawn("start", kind, target, log, "c-1", block="check")
    _until(lambda: _ran(log)[("start", "check")] == 1, first)
    _kill(first)
    out = _done(_spawn("recover", kind, target, log, "c-1"))
    assert "status completed" in out and "All healthy." in out
    assert _ran(log) == {("start", "check"): 2, ("end", "check"): 1} and len(llm_env.requests) == 2


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_d_killed_while_waiting_for_a_tool_approval(kind, tmp_path, request, llm_env: LLMServer) -> None:
    target, log = _target(kind, tmp_path, request), tmp_path / "tools.log"
    llm_env.script(_calls(("lookup", {"service": "api"}), ("release", {"version": "1.2"})), "Released.")
    first = _spawn("start", kind, target, log, "d-1")
    _until(
        lambda: first.stdout is not None and _ran(log)[("end", "lookup")] == 1 and len(llm_env.requests) == 1,
        first,
    )
    line = first.stdout.readline() if first.stdout else ""
    assert line.strip() == "status waiting"
    _kill(first)
    out = _done(_spawn("approve", kind, target, log, "d-1"))
    assert "status completed" in out and "Released." in out
    assert _ran(log) == {
        ("start", "lookup"): 1,
        ("end", "lookup"): 1,
        ("start", "release"): 1,
        ("end", "release"): 1,
    }
    assert len(llm_env.requests) == 2
