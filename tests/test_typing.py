"""``StepContext[InputT, StateT]`` types a step for users' type checkers (SPEC section 2)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

TYPED = """
from pydantic import BaseModel

from agentflow import END, START, Next, StepContext, Workflow


class DeployInput(BaseModel):
    repo: str


class DeployState(BaseModel):
    artifact: str | None = None


async def build(ctx: StepContext[DeployInput, DeployState]) -> Next:
    repo: str = ctx.input.repo
    artifact: str | None = ctx.state.artifact
    ctx.set_state(artifact=f"{repo}.tar")
    return Next(END, output={"artifact": artifact, "step": ctx.step_name, "run": ctx.run_id})


wf = Workflow("Typed").input(DeployInput).state(DeployState).flow({START: build})
"""


def mypy(tmp_path: Path, source: str) -> subprocess.CompletedProcess[str]:
    """mypy --strict on ``source`` as a user's module (errors inside agentflow are not the user's)."""
    module = tmp_path / "typed_flow.py"
    module.write_text(textwrap.dedent(source))
    config = tmp_path / "mypy.ini"
    config.write_text("[mypy]\n")
    cache = Path(__file__).parent / ".mypy_cache_typing"  # shared across runs: the second is fast
    command = [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent", f"--cache-dir={cache}"]
    return subprocess.run([*command, f"--config-file={config}", str(module)], capture_output=True, text=True)


def test_a_typed_step_checks_clean(tmp_path: Path) -> None:
    out = mypy(tmp_path, TYPED)
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_wrong_field_on_the_typed_input_is_caught(tmp_path: Path) -> None:
    out = mypy(tmp_path, TYPED.replace("ctx.input.repo", "ctx.input.repository"))
    assert out.returncode == 1
    assert '"DeployInput" has no attribute "repository"' in out.stdout
    out = mypy(
        tmp_path,
        TYPED.replace("artifact: str | None = ctx.state.artifact", "artifact: int = ctx.state.artifact"),
    )
    assert out.returncode == 1 and "Incompatible types in assignment" in out.stdout


def test_gates_and_timers_type_check_as_wait_arguments(tmp_path: Path) -> None:
    out = mypy(
        tmp_path,
        """
        from datetime import timedelta

        from agentflow import HumanApproval, Sleep, Wait

        gate = Wait(HumanApproval(approvers=["ops"]), "Deploy")
        nap = Wait(Sleep(timedelta(hours=1)), "Remind")
        """,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_tools_type_check_as_an_agents_tools(tmp_path: Path) -> None:
    out = mypy(
        tmp_path,
        """
        from agentflow import Agent, HumanApproval, tool

        @tool
        def deploy(version: str) -> str:
            \"\"\"Deploy a version.\"\"\"
            return version

        @tool(approval=HumanApproval(["ops"]), idempotent=True)
        async def rollback(version: str) -> str:
            \"\"\"Roll a version back.\"\"\"
            return version

        agent = Agent("ops", model="gpt-4o-mini", tools=(deploy, rollback))
        """,
    )
    assert out.returncode == 0, out.stdout + out.stderr
