"""The ``agentflow`` command against runs parked on SQLite, in real subprocesses."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cli_flows import review

from agentflow import RunFailedError, Worker, Workflow, WorkflowRunner

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


# -- the live view, JSON, prefixes, exit codes --------------------------------------------

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
SPINNER = set("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏")  # rich's "dots" spinner


def in_terminal(
    *args: str, db: Path, env: dict[str, str] | None = None, seen: Callable[[str], None] | None = None
) -> tuple[int, str]:
    """Run ``agentflow *args`` with a pseudo-terminal as its stdout; its exit status and raw output.

    ``seen`` is called with the output so far each time more arrives.
    """
    env = {
        **os.environ, "CLI_DB": str(db), "PYTHONPATH": str(HERE), "TERM": "xterm-256color",
        "COLUMNS": "120", **(env or {}),
    }  # fmt: skip
    env.pop("NO_COLOR", None) if "NO_COLOR" not in (env or {}) else None
    main, child = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "agentflow", *args], stdin=child, stdout=child, stderr=child, env=env
    )
    os.close(child)
    out = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([main], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # the child closed the terminal (Linux says EIO)
                break
            if not chunk:
                break
            out += chunk
            if seen is not None:
                seen(out.decode(errors="replace"))
        elif proc.poll() is not None:
            break
    os.close(main)
    return proc.wait(timeout=10), out.decode()


def live_workflow(db: Path) -> Workflow:
    from cli_live_flows import live

    return live.persistence(store="sqlite", path=str(db))


async def test_events_follow_shows_a_run_advancing_in_another_process_live(tmp_path, monkeypatch) -> None:
    db, gates = tmp_path / "live.db", tmp_path / "gates"
    gates.mkdir()
    (gates / "Triage").write_text("")
    monkeypatch.setenv("CLI_GATES", str(gates))  # step Draft goes on once the view showed it running

    def seen(raw: str) -> None:
        if any(ln[:1] in SPINNER and "Draft" in ln for ln in ANSI.sub("", raw).split("\r")):
            (gates / "Draft").touch()

    async with WorkflowRunner(live_workflow(db)) as runner:
        handle = await runner.run({"title": "login is slow"})
        code, raw = await asyncio.to_thread(
            in_terminal, "events", "cli_live_flows", handle.run_id[:8], "--follow", db=db, seen=seen
        )
        assert (await handle.result(timeout=10)).output == "patched"
    text = ANSI.sub("", raw)
    assert code == 0, text
    assert "\x1b[" in raw  # colours: it is a terminal
    spun = [ln for ln in text.replace("\r", "\n").splitlines() if ln[:1] in SPINNER]
    assert any(re.search(r"Draft  running \d+\.\d s", ln) for ln in spun), text  # the step in flight
    assert re.search(r"✓ Triage in \d+\.\d\d s", text)
    assert re.search(r"✓ Draft in \d+\.\d\d s \(1,204 \+ 311 tokens\)", text)
    last = text.rstrip().splitlines()[-1]
    assert last.startswith(f"run {handle.run_id} is completed") and "1,204 + 311 tokens" in last


async def test_run_follow_with_no_color_prints_plain_lines_and_exits_1_when_the_run_fails(tmp_path) -> None:
    db = tmp_path / "live.db"
    code, raw = in_terminal(
        "run", "cli_live_flows", "CliLive", "--input", '{"title": "x", "fail": true}', "--follow",
        db=db, env={"NO_COLOR": "1", "CLI_STEP_SECONDS": "0.2"},
    )  # fmt: skip
    assert code == 1, raw
    assert "\x1b" not in raw  # no escape code at all: no colour, no spinner, no cursor moves
    lines = raw.replace("\r\n", "\n").splitlines()
    assert "step Triage started" in lines
    assert any(re.fullmatch(r"step Triage completed in 0\.\d\d s", ln) for ln in lines)
    assert "step Draft failed in" in raw and "RuntimeError: the build is red" in raw
    failed = next(ln for ln in lines if ln.startswith("run ") and " is failed" in ln)
    assert "at step 'Draft': RuntimeError: the build is red" in failed
    assert any(ln.strip().startswith("agentflow retry cli_live_flows ") for ln in lines)


async def test_json_listings_records_and_run_id_prefixes(tmp_path, monkeypatch) -> None:
    db = tmp_path / "live.db"
    monkeypatch.setenv("CLI_STEP_SECONDS", "0")
    async with WorkflowRunner(live_workflow(db)) as runner:
        for run_id in ("ab-1", "ab-2", "cd-1"):  # one after the other: newest first is cd-1
            await (await runner.run({"title": run_id}, run_id=run_id)).result(timeout=20)
    listed = cli("runs", "cli_live_flows", "--json", "--status", "completed", "--limit", "2", db=db)
    assert listed.returncode == 0, listed.stderr
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [r["run_id"] for r in rows] == ["cd-1", "ab-2"]  # newest first, at most --limit
    assert rows[0]["status"] == "completed" and rows[0]["usage"] == {
        "input_tokens": 1204,
        "output_tokens": 311,
    }
    table = cli("runs", "cli_live_flows", "--workflow", "CliLive", db=db).stdout.splitlines()
    assert table[0].split() == ["RUN", "WORKFLOW", "STATUS", "STEP", "APPROVERS", "USAGE", "UPDATED"]
    assert [ln.split()[0] for ln in table[1:]] == ["cd-1", "ab-2", "ab-1"]
    shown = cli("show", "cli_live_flows", "cd", "--json", db=db)  # a prefix only one run has
    record = json.loads(shown.stdout)
    assert (record["run_id"], record["input"], record["output"]) == (
        "cd-1",
        {"title": "cd-1", "fail": False},
        "patched",
    )
    ambiguous = cli("show", "cli_live_flows", "ab", db=db)
    assert ambiguous.returncode == 2 and "ab-1" in ambiguous.stderr and "ab-2" in ambiguous.stderr
    assert len(ambiguous.stderr.strip().splitlines()) == 1  # one line
    events = cli("events", "cli_live_flows", "ab-2", "--json", db=db)
    kinds = [json.loads(line)["kind"] for line in events.stdout.splitlines()]
    assert kinds[0] == "run_started" and kinds[-1] == "completed" and "step_completed" in kinds
    described = json.loads(cli("describe", "cli_live_flows", "--json", db=db).stdout)
    assert {d["name"] for d in described} == {"CliLive", "CliVersioned"}


async def test_bad_input_unknown_names_and_the_version(tmp_path) -> None:
    db = tmp_path / "live.db"
    not_json = cli("run", "cli_live_flows", "CliLive", "--input", "{nope", db=db)
    assert not_json.returncode == 2 and "--input is not JSON" in not_json.stderr
    invalid = cli("run", "cli_live_flows", "CliLive", "--input", '{"fail": "maybe"}', db=db)
    assert invalid.returncode == 2 and "InvalidInputError" in invalid.stderr
    assert (
        "title: Field required" in invalid.stderr
        and "fail: Input should be a valid boolean" in invalid.stderr
    )
    async with WorkflowRunner(live_workflow(db)) as runner:
        assert await runner.list_runs() == []  # nothing was stored
    unknown = cli("run", "cli_live_flows", "Nope", db=db)
    assert unknown.returncode == 2 and "'CliLive'" in unknown.stderr
    usage = cli("runs", db=db)  # the module is missing
    assert usage.returncode == 2 and usage.stderr.count("\n") == 1 and "agentflow runs --help" in usage.stderr
    version = cli("--version", db=db)
    assert version.returncode == 0 and re.fullmatch(r"agentflow \S+\n", version.stdout)


async def test_fork_at_a_step_the_run_never_reached_names_the_steps_it_did(parked) -> None:
    db, run_id = parked
    out = cli("fork", "cli_flows", run_id[:10], "--at", "Publish", db=db)
    assert out.returncode == 2
    assert "never reached step 'Publish'" in out.stderr and "['__start__']" in out.stderr


async def test_pause_and_resume_a_run_another_process_advances(tmp_path, monkeypatch) -> None:
    db, gates = tmp_path / "live.db", tmp_path / "gates"
    gates.mkdir()
    monkeypatch.setenv("CLI_GATES", str(gates))  # each step goes on once its file is there
    async with WorkflowRunner(live_workflow(db)) as runner:
        handle = await runner.run({"title": "pause me"})
        pausing = asyncio.create_task(
            asyncio.to_thread(cli, "pause", "cli_live_flows", handle.run_id, "--json", db=db)
        )
        # The command asks in the store (another process): look there until it has.
        while (await runner.store.get(handle.run_id)).control != "pause":  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        (gates / "Triage").touch()  # the step in flight finishes, and the run parks after it
        paused = await pausing
        assert paused.returncode == 0, paused.stderr
        assert json.loads(paused.stdout)["status"] == "paused"
    (gates / "Draft").touch()
    resumed = cli("resume", "cli_live_flows", handle.run_id, db=db)  # it goes on in the command's process
    assert resumed.returncode == 0, resumed.stderr
    assert "step Draft completed" in resumed.stdout and f"run {handle.run_id} is completed" in resumed.stdout


async def test_run_without_follow_hands_the_run_to_a_worker_then_stop_and_delete(tmp_path) -> None:
    from cli_live_flows import versioned

    db = tmp_path / "live.db"
    started = cli("run", "cli_live_flows", "CliVersioned", "--json", "--run-id", "v-1", db=db)
    assert started.returncode == 0, started.stderr
    assert json.loads(started.stdout)["run_id"] == "v-1"
    wf = versioned.persistence(store="sqlite", path=str(db))
    worker = Worker(wf)  # a worker of the store takes the run up: it parks at its gate
    serving = asyncio.create_task(worker.serve())
    async with WorkflowRunner(wf) as runner:
        await (await runner.attach("v-1")).wait_for("waiting", timeout=10)
    await worker.close()
    await serving
    stopped = cli("stop", "cli_live_flows", "v-1", db=db)
    assert stopped.returncode == 0 and "run v-1 is stopped" in stopped.stdout
    deleted = cli("delete", "cli_live_flows", "v-1", db=db)
    assert deleted.returncode == 0 and "deleted run v-1" in deleted.stdout
    gone = cli("show", "cli_live_flows", "v-1", db=db)
    assert gone.returncode == 3 and "RunNotFoundError" in gone.stderr


async def test_check_lists_the_runs_a_new_version_could_not_load(tmp_path) -> None:
    db = tmp_path / "live.db"
    parked = cli("run", "cli_live_flows", "CliVersioned", "--run-id", "parked-1", "--follow", db=db)
    assert parked.returncode == 0, parked.stderr  # parked at its gate: nothing more happens here
    assert "run parked-1 is waiting at __start__ for editor: Ship it?" in parked.stdout
    assert "agentflow approve cli_live_flows parked-1 --by editor" in parked.stdout
    fine = cli("check", "cli_live_flows", db=db)
    assert fine.returncode == 0 and "every run that is not final loads" in fine.stdout
    deploy = cli("check", "cli_live_flows", "--json", db=db, env={"CLI_VERSION": "2"})
    assert deploy.returncode == 1
    [bad] = [json.loads(line) for line in deploy.stdout.splitlines()]
    assert (bad["run_id"], bad["version"], bad["status"]) == ("parked-1", "1", "waiting")
    assert "no migration leads from version '1' to '2'" in bad["message"]
