"""The README's quick start and every example run as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=120,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_readme_quick_start_runs_as_written(tmp_path):
    readme = (ROOT / "README.md").read_text()
    code = re.findall(r"```python\n(.*?)```", readme, re.S)[0]
    (tmp_path / "quickstart.py").write_text(code)
    out = _run(["quickstart.py"], tmp_path)
    assert "completed {'by': 'ops-lead', 'size': 42}" in out
    assert (tmp_path / "quickstart.db").exists()  # it ran on SQLite


def test_build_and_deploy_example(tmp_path):
    out = _run(
        [str(ROOT / "examples" / "build_and_deploy.py")], tmp_path, {"AGENTFLOW_DB": str(tmp_path / "d.db")}
    )
    kinds = re.findall(r"^\s*\[\s*\d+\]\s+(\S+)", out, re.M)
    assert kinds[0] == "run_started" and kinds[-1] == "completed"
    assert "waiting" in kinds and "decided" in kinds
    assert "approving as ops-lead" in out
    assert "approved_by='ops-lead'" in out


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "examples").glob("*.py")))
def test_every_example_is_listed_here(name):
    assert name in {
        "build_and_deploy.py",
        "change_review.py",
        "fleet.py",
        "follow_up.py",
        "ops_agent.py",
        "release_train.py",
        "resume_after_crash.py",
        "review_release_notes.py",
    }, f"examples/{name} has no test"


def test_change_review_example(tmp_path):
    out = _run(
        [str(ROOT / "examples" / "change_review.py")], tmp_path, {"AGENTFLOW_DB": str(tmp_path / "c.db")}
    )
    assert "alice has 3 approvals waiting, in 2 pages:" in out and out.count("  ap_") == 3
    assert "the form asks for: ['risk', 'window']" in out
    assert "step 'Review': data for approval ap_" in out and "field 'risk'" in out
    assert "billing: votes ['alice'] of 2" in out
    assert "billing: applied tonight (risk 2, last by bob)" in out
    assert "search: shelved (wait for the freeze to end)" in out
    assert "auth: applied Sunday 06:00 (risk 4, last by carol)" in out
    assert "pending approvals left: 0" in out


def test_resume_after_crash_example(tmp_path):
    out = _run([str(ROOT / "examples" / "resume_after_crash.py")], tmp_path)
    assert "killed with SIGKILL" in out
    assert "is running at step 'Summarize'" in out
    pids = {line.split("]")[0].strip(" [") for line in out.splitlines() if "] fetch:" in line}
    assert len(pids) == 1  # fetch ran once, in the first worker only
    assert out.count("] summarize:") == 2  # the step in flight ran again after the crash
    assert out.count("] publish:") == 1
    assert "completed: {'summary': '12 pages, 3 findings'}" in out


def test_review_release_notes_with_the_scripted_provider(tmp_path):
    env = {k: "" for k in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL")}
    out = _run([str(ROOT / "examples" / "review_release_notes.py")], tmp_path, env)
    assert "writer: scripted provider" in out and "critic: scripted provider" in out
    assert "critic scored 7" in out
    assert "published (edited by editor)" in out and "Export API docs" in out


def test_review_release_notes_with_real_providers_against_the_local_server(tmp_path, llm_server):
    llm_server.script("## v2.4.0\n- faster builds", {"score": 9, "issues": []})
    env = {
        "OPENAI_API_KEY": "sk-local",
        "OPENAI_BASE_URL": llm_server.openai_base_url,
        "ANTHROPIC_API_KEY": "ak-local",
        "ANTHROPIC_BASE_URL": llm_server.anthropic_base_url,
    }
    out = _run([str(ROOT / "examples" / "review_release_notes.py")], tmp_path, env)
    assert "writer: OpenAI provider" in out and "critic: Anthropic provider" in out
    assert "critic scored 9" in out and "- faster builds" in out
    assert [r.protocol for r in llm_server.requests] == ["openai", "anthropic"]


def test_follow_up_example(tmp_path):
    out = _run([str(ROOT / "examples" / "follow_up.py")], tmp_path)
    assert "is waiting: sleeping until" in out
    assert "the timer fired in the second runner; the run failed at step 'FollowUp': ConnectionError" in out
    assert out.count("welcome: mailing") == 1  # neither the retry nor the fork welcomed again
    assert "follow-up (attempt 2, formal)" in out  # the retry counted the failed attempt
    assert "retried: completed" in out and "sent=['welcome', 'follow-up']" in out
    assert "at 'FollowUp': completed \"Hey! How's it going?\"" in out
    assert "original untouched: 'Dear user, how is it going?'" in out


def test_release_train_example(tmp_path):
    out = _run(
        [str(ROOT / "examples" / "release_train.py")], tmp_path, {"AGENTFLOW_DB": str(tmp_path / "t.db")}
    )
    assert "waits on 3 child runs" in out
    assert out.count("approved ") == 3
    assert "completed: {'released': ['api (ana)', 'web (bo)', 'worker (ana)']}" in out
    assert out.count("ServiceRelease completed, parent step '__start__'") == 3


def _ops_agent_checks(out: str) -> None:
    assert "ops-lead sees a tool_call: Deploy this version to production?" in out
    assert "tool deploy, arguments {'service': 'api', 'version': '2.4.1'}" in out
    assert "killed with SIGKILL (exit -9) during the deploy" in out
    assert "waiting: tool_outcome of deploy" in out
    assert "the deploy ledger has 1 deploy(s) under that key" in out  # deployed once, never again
    assert out.count("] deploy: api 2.4.1") == 1
    assert "run completed:" in out and "'tools': ['search_incidents', 'deploy']" in out


def test_ops_agent_example_with_the_scripted_provider(tmp_path):
    env = {k: "" for k in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    out = _run([str(ROOT / "examples" / "ops_agent.py")], tmp_path, env)
    assert "model: scripted" in out
    _ops_agent_checks(out)


def test_ops_agent_example_with_the_openai_sdk_against_the_local_server(tmp_path, llm_server):
    from llm_server import Reply, ToolCall

    llm_server.script(
        Reply("Checking first.", tool_calls=[ToolCall("search_incidents", {"service": "api"}, id="s1")]),
        Reply("Deploying.", tool_calls=[ToolCall("deploy", {"service": "api", "version": "2.4.1"}, id="d1")]),
        "api 2.4.1 is rolled out.",
    )
    env = {"OPENAI_API_KEY": "sk-local", "OPENAI_BASE_URL": llm_server.openai_base_url}
    out = _run([str(ROOT / "examples" / "ops_agent.py")], tmp_path, env)
    assert "model: gpt-4o-mini" in out
    _ops_agent_checks(out)
    # three model calls in all, across four processes: none was made twice
    assert len(llm_server.requests) == 3


def test_fleet_example_moves_runs_between_worker_processes(tmp_path):
    out = _run([str(ROOT / "examples" / "fleet.py")], tmp_path)
    runs = re.findall(r"^run-\d: (\w+), (moved|stayed): (.*)$", out, re.M)
    assert len(runs) == 6 and {status for status, _, _ in runs} == {"completed"}
    for _, _, trail in runs:  # every step ran once, in order, wherever it ran
        assert [s.split("@")[0] for s in trail.split()] == ["Fetch", "Parse", "Score", "Store"]
    assert any(how == "moved" for _, how, _ in runs)  # the stopped worker's runs went on elsewhere
    assert "it runs none of them" in out and out.count("stopped after taking") == 2
