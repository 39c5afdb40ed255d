"""Build, test, and deploy behind a human approval gate, on the embedded SQLite store.

Run it with ``make demo`` (or ``python examples/build_and_deploy.py``). It prints each
step as it happens, stops at the gate, approves as ``ops-lead`` and finishes. The run
is stored in ``agentflow.db`` (set ``AGENTFLOW_DB`` to put it elsewhere).
"""

from __future__ import annotations

import asyncio
import os

from pydantic import BaseModel

from agentflow import END, START, HumanApproval, Next, Wait, Workflow, WorkflowRunner, step


class DeployInput(BaseModel):
    repo: str


class DeployState(BaseModel):
    checkout: str | None = None
    artifact: str | None = None
    tests_passed: int = 0


class BuildOutput(BaseModel):
    artifact: str
    size: int


class Release(BaseModel):
    repo: str
    artifact: str
    approved_by: str


async def clone(ctx):
    await asyncio.sleep(0.05)  # stands in for a git clone
    ctx.set_state(checkout=f"/tmp/src/{ctx.input.repo.replace('/', '_')}")
    return "Build"


@step(output=BuildOutput, retry=3, timeout=600)
async def build(ctx):
    await asyncio.sleep(0.05)
    artifact = f"{ctx.state.checkout}/out.tar"
    ctx.set_state(artifact=artifact)
    return Next("Test", output=BuildOutput(artifact=artifact, size=42))


def test(ctx):
    ctx.set_state(tests_passed=128)
    ctx.emit("tests", {"passed": 128, "failed": 0})
    return "Deploy"


def deploy(ctx):
    build = ctx.step_results["Build"]  # a BuildOutput, also after a reload from the store
    return Wait(
        HumanApproval(
            approvers=["ops-lead"],
            prompt=f"Ship {build.artifact} ({build.size} MB) to production?",
            context={"artifact": build.artifact, "tests_passed": ctx.state.tests_passed},
        ),
        "Release",
    )


def release(ctx):
    return Next(
        END,
        output=Release(repo=ctx.input.repo, artifact=ctx.state.artifact, approved_by=ctx.decision.by),
    )


build_and_deploy = (
    Workflow("BuildAndDeploy", "Build, test, deploy")
    .input(DeployInput)
    .state(DeployState)
    .output(Release)
    .flow(
        {
            START: lambda ctx: "Clone",
            "Clone": clone,
            "Build": build,
            "Test": test,
            "Deploy": deploy,
            "Release": release,
        }
    )
    .persistence(enabled=True, store="sqlite", path=os.environ.get("AGENTFLOW_DB", "agentflow.db"))
)


async def main() -> None:
    async with WorkflowRunner(build_and_deploy) as runner:
        handle = await runner.run({"repo": "acme/app"})
        print(f"run {handle.run_id} started")
        async for ev in handle.events():  # history, then live, until a final status
            print(f"  [{ev.seq:>2}] {ev.kind:<15} {ev.step or ''}")
            if ev.kind == "waiting":
                pending = (await handle.info()).pending
                assert pending is not None
                print(f"       waiting for {list(pending.approvers)}: {pending.prompt}")
                print("       approving as ops-lead")
                await runner.approve(handle.run_id, by="ops-lead", comment="ship it")
        result = await handle.result()
        print(f"{result.status.value}: {result.output!r}")


if __name__ == "__main__":
    asyncio.run(main())
