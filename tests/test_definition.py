"""Definition mistakes raise WorkflowDefinitionError at build time (or at WorkflowRunner), never mid-run."""

from __future__ import annotations

import re
import textwrap
from datetime import timedelta

import pytest
from pydantic import BaseModel

from agentflow import (
    END,
    START,
    HumanApproval,
    Next,
    Parallel,
    RetryPolicy,
    Wait,
    Workflow,
    WorkflowDefinitionError,
    WorkflowRunner,
    step,
)


class DeployInput(BaseModel):
    repo: str


class DeployState(BaseModel):
    artifact: str | None = None


class BuildOutput(BaseModel):
    artifact: str
    size: int


class Required(BaseModel):
    owner: str
    count: int = 0


async def clone(ctx):
    return "Build"


@step(output=BuildOutput, retry=3, timeout=600)
async def build(ctx):
    ctx.set_state(artifact="out.tar")
    return Next("Test", output=BuildOutput(artifact="out.tar", size=42))


def build_linux(ctx):
    return "linux"


def build_mac(ctx):
    return "mac"


def spec_flow() -> Workflow:
    """The flow of SPEC section 1, with a parallel fan-out on rejection."""
    return (
        Workflow("BuildAndDeploy", "Build, test, deploy")
        .input(DeployInput)
        .state(DeployState)
        .flow(
            {
                START: lambda ctx: "Clone",
                "Clone": clone,
                "Build": build,
                "Test": lambda ctx: "Deploy",
                "Deploy": lambda ctx: Wait(
                    HumanApproval(approvers=["ops-lead"]), "Release", on_reject="Rebuild"
                ),
                "Rebuild": lambda ctx: Parallel([build_linux, build_mac], "Release"),
                "Release": lambda ctx: END,
            }
        )
        .persistence(enabled=True, store="redis", key_prefix="deploy:")
    )


def noop(ctx):
    return END


# -- the flow itself -----------------------------------------------------------


def test_flow_without_start_is_refused() -> None:
    with pytest.raises(WorkflowDefinitionError, match="START"):
        Workflow("W").flow({"A": noop})


def test_flow_and_execute_together_are_refused() -> None:
    async def main(ctx):
        return None

    with pytest.raises(WorkflowDefinitionError, match="not both"):
        Workflow("W").flow({START: noop}).execute(main)
    with pytest.raises(WorkflowDefinitionError, match="not both"):
        Workflow("W").execute(main).flow({START: noop})


def test_neither_flow_nor_execute_is_refused_by_the_runner() -> None:
    wf = Workflow("Empty").input(DeployInput)
    with pytest.raises(WorkflowDefinitionError, match="no steps"):
        WorkflowRunner(wf)


def test_non_callable_step_is_refused() -> None:
    with pytest.raises(WorkflowDefinitionError, match="'B'"):
        Workflow("W").flow({START: noop, "B": "not a function"})


def test_execute_needs_an_async_function() -> None:
    with pytest.raises(WorkflowDefinitionError, match="async"):
        Workflow("W").execute(lambda ctx: None)


def test_reserved_and_non_string_step_names_are_refused() -> None:
    with pytest.raises(WorkflowDefinitionError, match="reserved"):
        Workflow("W").flow({START: noop, END: noop})
    with pytest.raises(WorkflowDefinitionError, match="strings"):
        Workflow("W").flow({START: noop, 3: noop})


def test_models_must_be_pydantic_classes() -> None:
    with pytest.raises(WorkflowDefinitionError):
        Workflow("W").input(dict)
    with pytest.raises(WorkflowDefinitionError):
        Workflow("W").state(DeployState())  # an instance, not the class
    with pytest.raises(WorkflowDefinitionError):
        Workflow("W").output("Model")


def test_empty_name_and_bad_max_steps_are_refused() -> None:
    with pytest.raises(WorkflowDefinitionError):
        Workflow("  ")
    with pytest.raises(WorkflowDefinitionError, match="max_steps"):
        Workflow("W").max_steps(0)


# -- state model and initial state ---------------------------------------------------


def test_state_with_required_fields_and_no_initial_state_is_refused_by_the_runner() -> None:
    wf = Workflow("W").state(Required).flow({START: noop})
    with pytest.raises(WorkflowDefinitionError, match="owner") as err:
        WorkflowRunner(wf)
    assert "initial" in str(err.value), "the message says how to fix it"


async def test_initial_state_makes_a_required_state_model_valid() -> None:
    seen = []

    def first(ctx):
        seen.append(ctx.state)
        return END

    wf = Workflow("W").state(Required, initial={"owner": "ops"}).flow({START: first})
    async with WorkflowRunner(wf) as runner:
        result = await (await runner.run()).result()
    assert seen == [Required(owner="ops", count=0)]
    assert result.state == Required(owner="ops", count=0)


def test_initial_state_that_does_not_validate_is_refused() -> None:
    wf = Workflow("W").state(Required, initial={"owner": "ops", "count": "many"}).flow({START: noop})
    with pytest.raises(WorkflowDefinitionError, match="count"):
        WorkflowRunner(wf)


# -- step options -------------------------------------------------------------------


def test_step_needs_a_callable() -> None:
    with pytest.raises(WorkflowDefinitionError):
        step(42)


@pytest.mark.parametrize(
    "options",
    [
        {"output": dict},
        {"output": BuildOutput(artifact="a", size=1)},
        {"timeout": 0},
        {"timeout": -1.5},
        {"retry": "3"},
        {"retry": True},
        {"retry": 2.5},
    ],
)
def test_bad_step_options_are_refused(options) -> None:
    with pytest.raises(WorkflowDefinitionError):
        step(noop, **options)
    with pytest.raises(WorkflowDefinitionError):
        step(**options)(noop)


def test_retry_policy_needs_one_attempt_at_least() -> None:
    with pytest.raises(WorkflowDefinitionError, match="max_attempts"):
        RetryPolicy(max_attempts=0)


def test_step_keeps_the_function_callable_and_named() -> None:
    wrapped = step(build_linux, retry=RetryPolicy(max_attempts=2), timeout=1)
    assert wrapped(None) == "linux"
    assert wrapped.__name__ == "build_linux"


# -- persistence, gates, parallel -----------------------------------------------------


def test_unknown_store_name_is_refused() -> None:
    with pytest.raises(WorkflowDefinitionError, match="mongo"):
        Workflow("W").flow({START: noop}).persistence(store="mongo")
    with pytest.raises(WorkflowDefinitionError):
        Workflow("W").flow({START: noop}).persistence(store=object())
    with pytest.raises(WorkflowDefinitionError, match="lease_ttl"):
        Workflow("W").flow({START: noop}).persistence(store="memory", lease_ttl=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"approvers": []},
        {"approvers": "alice"},
        {"approvers": ["alice", "bob"], "quorum": 3},
        {"approvers": ["alice", "alice"], "quorum": 2},
        {"approvers": ["alice"], "quorum": 0},
        {"approvers": ["alice"], "timeout": 0},
        {"approvers": ["alice"], "timeout": timedelta(seconds=-1)},
        {"approvers": ["alice"], "context": object()},
    ],
)
def test_bad_human_approval_is_refused(kwargs) -> None:
    with pytest.raises(WorkflowDefinitionError):
        HumanApproval(**kwargs)


@pytest.mark.parametrize(
    "make",
    [
        lambda: Parallel([], "Join"),
        lambda: Parallel({}, "Join"),
        lambda: Parallel([build_linux, build_linux], "Join"),
        lambda: Parallel([lambda ctx: 1, build_mac], "Join"),
        lambda: Parallel([build_linux, "build_mac"], "Join"),
        lambda: Parallel({"linux": build_linux, "mac": None}, "Join"),
        lambda: Parallel([build_linux], "Join", max_concurrency=0),
        lambda: Parallel([build_linux], "Join", on_error="ignore"),
        lambda: Parallel.map(build_linux, [1, 2], "Join", max_concurrency=0),
        lambda: Parallel.map("build_linux", [1, 2], "Join"),
    ],
)
def test_bad_parallel_arguments_are_refused(make) -> None:
    with pytest.raises(WorkflowDefinitionError):
        make()


# -- the Mermaid chart -------------------------------------------------------------------


def _edges(chart: str) -> set[str]:
    return {line.strip() for line in chart.splitlines() if re.search(r"--|-\.", line)}


def test_mermaid_shows_the_edges_gates_and_branches_of_the_spec_flow() -> None:
    chart = spec_flow().mermaid()
    assert chart.startswith("flowchart")
    edges = _edges(chart)
    for edge in [
        "__start__ --> s_Clone",
        "s_Clone --> s_Build",
        "s_Build --> s_Test",
        "s_Test --> s_Deploy",
        "s_Deploy -- approved --> s_Release",
        "s_Deploy -- rejected --> s_Rebuild",
        "s_Release --> __end__",
    ]:
        assert edge in edges, f"{edge!r} missing from\n{chart}"
    # The gate is marked (a hexagon), ordinary steps are not.
    assert re.search(r"s_Deploy\{\{.*Deploy", chart)
    assert not re.search(r"s_Test\{\{", chart)
    # Each parallel branch is drawn between the fan-out step and the join target.
    for branch in ("build_linux", "build_mac"):
        assert any("s_Rebuild -. parallel .->" in e and branch in e for e in edges), branch
        assert any(e.endswith("--> s_Release") and branch in e for e in edges), branch


def test_mermaid_of_a_map_and_a_next_to_end() -> None:
    def fan(ctx):
        return Parallel.map(build_linux, [1, 2], "Join")

    def join(ctx):
        return Next(END, output=1)

    chart = Workflow("M").flow({START: fan, "Join": join}).mermaid()
    edges = _edges(chart)
    assert "s_Join --> __end__" in edges
    assert any("parallel" in e and "build_linux" in e for e in edges)


def test_mermaid_of_an_imperative_workflow_names_its_function() -> None:
    async def release(ctx):
        return None

    chart = Workflow("R").execute(release).mermaid()
    assert chart.startswith("flowchart") and "release" in chart


def test_mermaid_of_a_flow_defined_without_source_still_draws_its_edges() -> None:
    """Under ``exec`` (a REPL, a notebook cell) there is no source: edges come from code constants."""
    code = textwrap.dedent(
        """
        from agentflow import END, START, HumanApproval, Next, Wait, Workflow

        def build(ctx):
            return "Test" if ctx.input else "Fix"

        def fix(ctx):
            return "Build"

        wf = Workflow("NoSource").flow({
            START: lambda ctx: "Build",
            "Build": build,
            "Fix": fix,
            "Test": lambda ctx: Wait(HumanApproval(approvers=["a"]), "Ship"),
            "Ship": lambda ctx: Next(END, output=1),
        })
        """
    )
    namespace: dict[str, object] = {}
    exec(compile(code, "<cell>", "exec"), namespace)
    wf = namespace["wf"]
    assert isinstance(wf, Workflow)
    edges = _edges(wf.mermaid())
    for edge in ("__start__ --> s_Build", "s_Build --> s_Test", "s_Build --> s_Fix", "s_Fix --> s_Build"):
        assert edge in edges, f"{edge!r} missing from\n{wf.mermaid()}"
    assert "s_Test --> s_Ship" in edges and "s_Ship --> __end__" in edges
