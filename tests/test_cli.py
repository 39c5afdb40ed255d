"""The ``agentflow`` command against runs parked on SQLite, in real subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_flows import review

from agentflow import RunFailedError, WorkflowRunner

HERE = Path(__file__).parent


def cli(*args: str, db: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CLI_DB": str(db), "PYTHONPATH": str(HERE), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "agentflow.cli", *args], capture_output=True, text=True, env=env, timeout=60
    )


@pytest.fixture
async def parked(tmp_path, monkeypatch):
    db = tmp_path / "cli.db"
    monkeypatch.setenv("CLI_DB", str(db))
    wf = review.persistence(store="sqlite", path=str(db))
    async with WorkflowRunner(wf) as runner:
        handle = await runner.run({"text": "first draft"})
        async for ev in handle.events():
            if ev.kind == "waiting":
                break
    return db, handle.run_id


async def test_list_show_and_approve_with_an_edit(parked):
    db, run_id = parked
    listed = cli("runs", "cli_flows", "--status", "waiting", db=db)
    assert listed.returncode == 0, listed.stderr
    assert run_id in listed.stdout and "waiting" in listed.stdout
    shown = cli("show", "cli_flows", run_id, "--json", db=db)
    info = json.loads(shown.stdout)
    [pending] = info["approvals"]
    assert pending["context"] == {"draft": "first draft"} and pending["prompt"] == "Publish?"
    assert info["pending"] == pending and pending["approvers"] == ["editor"]
    listed = cli("approvals", "cli_flows", "--approver", "editor", "--json", db=db)
    assert listed.returncode == 0, listed.stderr
    assert [json.loads(line) for line in listed.stdout.splitlines()] == [pending]
    assert cli("approvals", "cli_flows", "--approver", "intruder", db=db).stdout == ""
    table = cli("approvals", "cli_flows", db=db).stdout
    assert pending["id"] in table and run_id in table and "0/1" in table and "Publish?" in table
    wrong = cli("approve", "cli_flows", run_id, "--by", "editor", "--approval", "ap_nope", db=db)
    assert wrong.returncode == 2 and "InvalidStateError" in wrong.stderr and "ap_nope" in wrong.stderr
    denied = cli("approve", "cli_flows", run_id, "--by", "intruder", db=db)
    assert denied.returncode == 2 and "NotAuthorizedError" in denied.stderr
    approved = cli("approve", "cli_flows", run_id, "--by", "editor", "--data", '{"text": "edited"}', db=db)
    assert approved.returncode == 0, approved.stderr
    assert "decided" in approved.stdout and f"run {run_id} is completed" in approved.stdout
    async with WorkflowRunner(review.persistence(store="sqlite", path=str(db))) as runner:
        result = await (await runner.attach(run_id)).result(timeout=5)
    assert result.output == "edited"


async def test_reject_and_unknown_run(parked):
    db, run_id = parked
    missing = cli("show", "cli_flows", "no-such-run", db=db)
    assert missing.returncode == 3 and "no run 'no-such-run'" in missing.stderr
    rejected = cli("reject", "cli_flows", run_id, "--by", "editor", "--reason", "too long", db=db)
    assert rejected.returncode == 0, rejected.stderr
    assert f"run {run_id} is rejected" in rejected.stdout
    info = json.loads(cli("show", "cli_flows", run_id, "--json", db=db).stdout)
    assert info["decisions"][0]["comment"] == "too long" and info["decisions"][0]["approved"] is False


def test_reading_runs_never_creates_a_store(tmp_path: Path) -> None:
    db = tmp_path / "elsewhere" / "missing.db"
    for args in (("runs", "cli_flows"), ("show", "cli_flows", "some-run")):
        out = cli(*args, db=db)
        assert out.returncode == 2
        assert str(db) in out.stderr and "does not exist" in out.stderr
    assert not db.exists() and not db.parent.exists()


async def test_approve_without_following_says_the_run_waits_for_a_worker(parked) -> None:
    db, run_id = parked
    out = cli("approve", "cli_flows", run_id, "--by", "editor", "--no-follow", db=db)
    assert out.returncode == 0, out.stderr
    assert f"run {run_id} " in out.stdout
    assert "waits for a worker" in out.stdout or "is completed" in out.stdout


async def test_retry_and_fork_from_the_command_line(tmp_path, monkeypatch) -> None:
    from cli_retry_flows import flaky

    db, fixed = tmp_path / "cli.db", tmp_path / "fixed"
    monkeypatch.setenv("CLI_FIXED", str(fixed))
    async with WorkflowRunner(flaky.persistence(store="sqlite", path=str(db))) as runner:
        handle = await runner.run()
        with pytest.raises(RunFailedError):
            await handle.result(timeout=5)
    still = cli("retry", "cli_retry_flows", handle.run_id, db=db, env={"CLI_FIXED": str(fixed)})
    assert still.returncode == 1, still.stderr
    assert f"run {handle.run_id} is failed" in still.stdout and "the registry is down" in still.stdout
    fixed.write_text("")
    retried = cli("retry", "cli_retry_flows", handle.run_id, db=db, env={"CLI_FIXED": str(fixed)})
    assert retried.returncode == 0, retried.stderr
    assert "resumed" in retried.stdout and f"run {handle.run_id} is completed" in retried.stdout
    forked = cli(
        "fork", "cli_retry_flows", handle.run_id, "--at", "Publish", "--state", '{"note": "again"}',
        "--run-id", "forked-1", db=db, env={"CLI_FIXED": str(fixed)},
    )  # fmt: skip
    assert forked.returncode == 0, forked.stderr
    assert f"forked run {handle.run_id} at step 'Publish' as run forked-1" in forked.stdout
    assert "run forked-1 is completed" in forked.stdout
    async with WorkflowRunner(flaky.persistence(store="sqlite", path=str(db))) as runner:
        assert (await (await runner.attach("forked-1")).result(timeout=5)).output == "published (again)"
    bad = cli("fork", "cli_retry_flows", handle.run_id, "--at", "Nope", db=db, env={"CLI_FIXED": str(fixed)})
    assert bad.returncode == 2 and "UnknownStepError" in bad.stderr and "'Nope'" in bad.stderr


async def test_respond_answers_a_tool_call_from_the_command_line(tmp_path, monkeypatch) -> None:
    from cli_flows import tooling

    db = tmp_path / "cli.db"
    monkeypatch.setenv("CLI_DB", str(db))
    async with WorkflowRunner(tooling.persistence(store="sqlite", path=str(db))) as runner:
        handle = await runner.run()
        await handle.wait_for("waiting", timeout=10)
    listed = cli("approvals", "cli_flows", "--kind", "tool_call", "--json", db=db)
    [approval] = [json.loads(line) for line in listed.stdout.splitlines()]
    assert (approval["tool"], approval["arguments"], approval["run_id"]) == (
        "deploy",
        {"version": "2.0"},
        handle.run_id,
    )
    bad = cli("respond", "cli_flows", handle.run_id, "--by", "ops-lead", "--result", "{nope", db=db)
    assert bad.returncode == 2 and "JSON" in bad.stderr
    answered = cli(
        "respond", "cli_flows", handle.run_id, "--by", "ops-lead", "--result", '{"ok": true}', db=db
    )
    assert answered.returncode == 0, answered.stderr
    assert f"run {handle.run_id} is completed" in answered.stdout
    async with WorkflowRunner(tooling.persistence(store="sqlite", path=str(db))) as runner:
        result = await (await runner.attach(handle.run_id)).result(timeout=5)
    assert result.output == 'deploy said: {"ok": true}'
