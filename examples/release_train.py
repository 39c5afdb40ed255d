"""A release train: one parent run fans out a child release run per service, each behind its own gate.

Run it with ``python examples/release_train.py``. The ``ReleaseTrain`` workflow runs
the ``ServiceRelease`` workflow once per service (``Parallel.map`` over ``Run(...)``).
Each child is a run of its own in the same SQLite store (``release_train.db``, or
``AGENTFLOW_DB``): it builds, then waits for its owner's approval. The parent waits
without a task until every child ended; a reviewer of the parent sees the children's
approvals in ``RunInfo.approvals`` and decides them through the parent's id. The
parent's join step gets each child's output typed as a ``ServiceReleased``.
"""

from __future__ import annotations

import asyncio
import os

from pydantic import BaseModel

from agentflow import END, START, HumanApproval, Next, Parallel, Run, Wait, Workflow, WorkflowRunner


class Service(BaseModel):
    name: str
    version: str
    owner: str


class ServiceState(BaseModel):
    artifact: str | None = None


class ServiceReleased(BaseModel):
    service: str
    artifact: str
    approved_by: str


async def build(ctx):
    await asyncio.sleep(0.02)  # stands in for the build
    ctx.set_state(artifact=f"{ctx.input.name}-{ctx.input.version}.tar")
    return Wait(
        HumanApproval(approvers=[ctx.input.owner], prompt=f"Release {ctx.input.name} {ctx.input.version}?"),
        "Publish",
    )


def publish(ctx):
    released = ServiceReleased(
        service=ctx.input.name, artifact=ctx.state.artifact, approved_by=ctx.decision.by
    )
    return Next(END, output=released)


service_release = (
    Workflow("ServiceRelease", "Build one service and release it once its owner approves")
    .input(Service)
    .state(ServiceState)
    .output(ServiceReleased)
    .flow({START: build, "Publish": publish})
)


class Train(BaseModel):
    services: list[Service]


def release_one(ctx):
    return Run(service_release, ctx.item)  # one child run per service


def fan_out(ctx):
    return Parallel.map(release_one, ctx.input.services, "Announce")


def announce(ctx):
    done = ctx.step_results["release_one"]  # ServiceReleased instances, in service order
    return Next(END, output={"released": [f"{r.service} ({r.approved_by})" for r in done]})


release_train = (
    Workflow("ReleaseTrain", "Release every service of the train")
    .input(Train)
    .flow({START: fan_out, "Announce": announce})
    .persistence(store="sqlite", path=os.environ.get("AGENTFLOW_DB", "release_train.db"))
)

SERVICES = [
    {"name": "api", "version": "2.4.0", "owner": "ana"},
    {"name": "web", "version": "1.9.3", "owner": "bo"},
    {"name": "worker", "version": "0.8.1", "owner": "ana"},
]


async def main() -> None:
    async with WorkflowRunner(release_train) as runner:
        handle = await runner.run({"services": SERVICES})
        info = await handle.wait_for("waiting")
        while len(info.approvals) < len(SERVICES):  # each child reaches its gate
            await asyncio.sleep(0.02)
            info = await handle.info()
        print(f"train {handle.run_id} waits on {len(info.children)} child runs")
        for approval in info.approvals:
            print(f"  {approval.run_id}: {approval.prompt} (approvers {list(approval.approvers)})")
        for approval in info.approvals:
            # Decided through the parent's id: the approval id names the child's gate.
            await runner.approve(handle.run_id, by=approval.approvers[0], approval=approval.id)
            print(f"approved {approval.run_id} as {approval.approvers[0]}")
        result = await handle.result(timeout=30)
        print(f"{result.status.value}: {result.output}")
        for child in info.children:
            c = await (await runner.attach(child)).info()
            print(f"  child {c.run_id} {c.workflow} {c.status.value}, parent step {c.parent.step!r}")


if __name__ == "__main__":
    asyncio.run(main())
