"""Steward: a registry of workflows, described and run by name (SPEC section 9)."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from agentflow import (
    END,
    START,
    AgentflowError,
    HumanApproval,
    InvalidInputError,
    Next,
    RunHandle,
    RunStatus,
    Steward,
    Wait,
    Workflow,
    WorkflowDefinitionError,
    WorkflowInfo,
)


class Ticket(BaseModel):
    title: str


class Triage(BaseModel):
    priority: int = 3


def triage_flow() -> Workflow:
    return (
        Workflow("Triage", "Sort incoming tickets")
        .input(Ticket)
        .state(Triage)
        .flow(
            {
                START: lambda ctx: "Rate",
                "Rate": lambda ctx: Wait(HumanApproval(approvers=["lead"]), "Done"),
                "Done": lambda ctx: Next(END, output=ctx.input.title.upper()),
            }
        )
    )


def echo_flow() -> Workflow:
    return Workflow("Echo").flow({START: lambda ctx: Next(END, output=ctx.input)})


def test_register_returns_the_workflow_and_workflows_describes_each() -> None:
    steward = Steward()
    wf = triage_flow()
    assert steward.register(wf) is wf
    steward.register(echo_flow())
    infos = steward.workflows()
    assert [i.name for i in infos] == ["Echo", "Triage"]
    info = infos[1]
    assert isinstance(info, WorkflowInfo)
    assert info.description == "Sort incoming tickets"
    assert info.input_schema["properties"]["title"]["type"] == "string"
    assert info.input_schema["required"] == ["title"]
    assert info.state_schema["properties"]["priority"]["default"] == 3
    assert info.steps == ["Rate", "Done"]
    echo = infos[0]
    assert (echo.input_schema, echo.state_schema, echo.description) == (None, None, "")


def test_register_refuses_a_broken_workflow_and_a_name_clash() -> None:
    steward = Steward()
    with pytest.raises(WorkflowDefinitionError):
        steward.register(Workflow("NoSteps"))
    with pytest.raises(WorkflowDefinitionError):
        steward.register("Triage")
    steward.register(triage_flow())
    with pytest.raises(WorkflowDefinitionError, match="Triage"):
        steward.register(triage_flow())
    assert [i.name for i in steward.workflows()] == ["Triage"]


def test_get_returns_the_workflow_and_an_unknown_name_lists_the_known_ones() -> None:
    steward = Steward("ops")
    wf = steward.register(triage_flow())
    steward.register(echo_flow())
    assert steward.get("Triage") is wf
    with pytest.raises(AgentflowError) as err:
        steward.get("Triaj")
    message = str(err.value)
    assert "'Triaj'" in message and "Echo" in message and "Triage" in message


def test_describe_has_schemas_steps_and_mermaid() -> None:
    steward = Steward()
    steward.register(triage_flow())
    desc = steward.describe("Triage")
    assert desc["name"] == "Triage"
    assert desc["description"] == "Sort incoming tickets"
    assert desc["input_schema"] == Ticket.model_json_schema()
    assert desc["state_schema"] == Triage.model_json_schema()
    assert desc["steps"] == ["Rate", "Done"]
    assert desc["mermaid"].startswith("flowchart")
    assert "s_Rate -- approved --> s_Done" in desc["mermaid"]
    with pytest.raises(AgentflowError, match="Nope"):
        steward.describe("Nope")


async def test_run_by_name_returns_a_handle() -> None:
    steward = Steward()
    steward.register(triage_flow())
    steward.register(echo_flow())
    try:
        handle = await steward.run("Triage", {"title": "disk full"})
        assert isinstance(handle, RunHandle)
        assert (await handle.info()).workflow == "Triage"
        echo = await steward.run("Echo", [1, 2])
        assert (await echo.result()).output == [1, 2]
        with pytest.raises(InvalidInputError):
            await steward.run("Triage", {"subject": "x"})
        with pytest.raises(AgentflowError, match="Missing"):
            await steward.run("Missing", {})
        approved = await handle.approve(by="lead")
        assert (await approved.result()).output == "DISK FULL"
        # The same runner serves every run of a workflow: it sees the earlier run.
        runs = await steward.runner("Triage").list_runs(status=RunStatus.COMPLETED)
        assert [r.run_id for r in runs] == [handle.run_id]
    finally:
        await steward.close()


async def test_discover_registers_the_workflows_of_a_module() -> None:
    steward = Steward.discover("sample_workflows")
    assert [i.name for i in steward.workflows()] == ["Hello", "Shout"]
    hello = steward.describe("Hello")
    assert hello["description"] == "Greets someone"
    assert hello["input_schema"]["required"] == ["name"]
    try:
        result = await (await steward.run("Hello", {"name": "ada"})).result()
        assert result.output == "hello ada"
        assert result.state.greeted == 1
        assert (await (await steward.run("Shout", {"name": "ada"})).result()).output == "ADA!"
    finally:
        await steward.close()


def test_discover_into_an_existing_steward_and_a_missing_module() -> None:
    steward = Steward()
    steward.register(echo_flow())
    assert Steward.discover("sample_workflows", steward) is steward
    assert [i.name for i in steward.workflows()] == ["Echo", "Hello", "Shout"]
    with pytest.raises(ModuleNotFoundError):
        Steward.discover("no_such_module_for_agentflow")
