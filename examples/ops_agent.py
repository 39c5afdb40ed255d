"""An ops agent that searches freely and deploys only with ops-lead's approval, through a crash.

    python examples/ops_agent.py

The agent has two tools: ``search_incidents`` (read-only, idempotent) and ``deploy``
(not idempotent, and every call needs ``ops-lead``'s approval). The script plays four
processes on one SQLite file:

1. a worker starts the run; the agent searches, then asks to deploy: the run parks on
   a ``tool_call`` approval (tool, arguments, the model's text) and the worker exits;
2. ops-lead approves in a second worker, whose deploy is killed with SIGKILL halfway;
3. a third worker recovers the run: the deploy may or may not have happened, so rather
   than deploy twice the run parks on a ``tool_outcome`` approval showing the call's
   idempotency key;
4. ops-lead looks the key up in the deploy system's ledger, finds the deploy went
   through, and ``respond``s with its result: the agent finishes without deploying again.

With ``OPENAI_API_KEY`` or ``OPENAI_BASE_URL`` set the agent uses the OpenAI provider
(any compatible server: ``OPENAI_BASE_URL=http://localhost:11434/v1`` for Ollama,
``OPS_MODEL`` names the model); otherwise agentflow's scripted provider plays the model.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
from typing import Any

from agentflow import END, START, Agent, HumanApproval, Next, ToolContext, Workflow, WorkflowRunner, tool
from agentflow.agents import ProviderReply, ProviderRequest, ToolUse
from agentflow.testing import ScriptedProvider

LEDGER = os.environ.get("OPS_LEDGER", "")  # the deploy system's record of what it deployed


@tool(idempotent=True)
async def search_incidents(service: str) -> list[str]:
    """Open incidents of a service (read-only)."""
    return [] if service == "api" else [f"{service}: elevated error rate"]


@tool(approval=HumanApproval(approvers=["ops-lead"], prompt="Deploy this version to production?"))
async def deploy(ctx: ToolContext, service: str, version: str) -> dict[str, Any]:
    """Deploy a version of a service to production."""
    _ledger_add({"key": ctx.idempotency_key, "service": service, "version": version})
    print(f"  [{os.getpid()}] deploy: {service} {version} (key {ctx.idempotency_key})", flush=True)
    if os.environ.get("OPS_CRASH") == "1":
        await asyncio.sleep(3600)  # the worker is killed while the rollout "runs"
    return {"service": service, "version": version, "status": "rolled out"}


def _ledger_add(entry: dict[str, str]) -> None:
    """The deploy system records each deploy under its idempotency key."""
    with open(LEDGER, "a") as ledger:
        ledger.write(json.dumps(entry) + "\n")


def _ledger(path: str) -> list[dict[str, str]]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def _scripted_turn(request: ProviderRequest) -> ProviderReply:
    """The model, played from the conversation so far (so any process can continue it)."""
    results = [m for m in request.messages if m.role == "tool"]
    if not results:
        return ProviderReply(
            "Checking for open incidents first.",
            tool_calls=(ToolUse("c1", "search_incidents", {"service": "api"}),),
        )
    if len(results) == 1:
        return ProviderReply(
            "No incidents; deploying.",
            tool_calls=(ToolUse("c2", "deploy", {"service": "api", "version": "2.4.1"}),),
        )
    return ProviderReply(f"Done: {results[-1].content}")


def provider() -> tuple[Any, str]:
    if os.environ.get("OPENAI_API_KEY") or os.environ.get("OPENAI_BASE_URL"):
        return "openai", os.environ.get("OPS_MODEL", "gpt-4o-mini")
    return ScriptedProvider([_scripted_turn] * 10), "scripted"


def ops_workflow(path: str) -> Workflow:
    async def ship(ctx):
        async with ctx.agents.ops as ops:
            run = await ops.run("Deploy api 2.4.1 unless it has an open incident.", max_turns=6)
        return Next(END, output={"answer": run.text, "tools": [c.name for c in run.tool_calls]})

    name, model = provider()
    return (
        Workflow("OpsAgent", "Deploy with approval")
        .flow({START: ship})
        .agents({"ops": Agent(provider=name, model=model, tools=[search_incidents, deploy])})
        .persistence(store="sqlite", path=path, lease_ttl=1.0)
    )


async def worker(command: str, path: str) -> None:
    async with WorkflowRunner(ops_workflow(path)) as runner:
        if command == "start":
            handle = await runner.run(run_id="ops-1")
        elif command == "approve":
            handle = await runner.approve("ops-1", by="ops-lead", comment="go ahead")
        else:
            for _ in range(100):  # the dead worker's lease runs out within lease_ttl
                if await runner.recover():
                    break
                await asyncio.sleep(0.2)
            handle = await runner.attach("ops-1")
        info = await handle.wait_for("waiting")
        for a in info.approvals:
            print(f"  [{os.getpid()}] waiting: {a.kind} of {a.tool} {a.arguments}", flush=True)


async def review(path: str) -> None:
    async with WorkflowRunner(ops_workflow(path)) as runner:
        (approval,) = await runner.approvals(approver="ops-lead")
        print(f"ops-lead sees a {approval.kind}: {approval.prompt}")
        print(f"  tool {approval.tool}, arguments {approval.arguments}, agent {approval.agent!r}")
        print(f"  the model said: {approval.context['text']!r}")


async def settle(path: str, ledger: str) -> None:
    async with WorkflowRunner(ops_workflow(path)) as runner:
        (approval,) = await runner.approvals(approver="ops-lead")
        key = approval.context["idempotency_key"]
        print(f"ops-lead sees a {approval.kind}: was deploy {approval.arguments} done? key {key}")
        found = [entry for entry in _ledger(ledger) if entry["key"] == key]
        print(f"  the deploy ledger has {len(found)} deploy(s) under that key")
        result = {"service": "api", "version": "2.4.1", "status": "rolled out"}
        handle = await runner.respond("ops-1", by="ops-lead", approval=approval.id, result=result)
        done = await handle.result(timeout=60)
        print(f"run {done.status.value}: {done.output}")


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        path, ledger = os.path.join(d, "ops.db"), os.path.join(d, "deploys.jsonl")
        me = os.path.abspath(__file__)
        env = {**os.environ, "OPS_LEDGER": ledger}
        print(f"model: {provider()[1]}")
        print("worker 1 starts the run")
        subprocess.run([sys.executable, me, "start", path], env=env, check=True)
        asyncio.run(review(path))
        print("ops-lead approves; worker 2 runs the deploy and is killed halfway")
        second = subprocess.Popen(
            [sys.executable, me, "approve", path],
            env={**env, "OPS_CRASH": "1"},
            stdout=subprocess.PIPE,
            text=True,
        )
        assert second.stdout is not None
        for line in second.stdout:
            print(line, end="")
            if "deploy:" in line:
                break
        second.send_signal(signal.SIGKILL)
        second.communicate()
        print(f"worker 2 killed with SIGKILL (exit {second.returncode}) during the deploy")
        print("worker 3 recovers the run")
        subprocess.run([sys.executable, me, "recover", path], env=env, check=True)
        asyncio.run(settle(path, ledger))


if __name__ == "__main__":
    if len(sys.argv) == 3:
        asyncio.run(worker(sys.argv[1], sys.argv[2]))
    else:
        main()
