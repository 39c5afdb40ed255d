"""Declaring tools: the schema the model is shown, the arguments it may pass, and every
declaration mistake caught when the tool is declared."""

from __future__ import annotations

import enum
from datetime import timedelta
from typing import Any

import pytest
from pydantic import BaseModel

from agentflow import HumanApproval, RetryPolicy
from agentflow.agents import Agent
from agentflow.definition.tools import Tool, ToolContext, tool
from agentflow.errors import InvalidInputError, WorkflowDefinitionError


class Priority(enum.Enum):
    LOW = "low"
    HIGH = "high"


class Place(BaseModel):
    city: str
    zip: str | None = None


@tool
async def search_issues(ctx: ToolContext, repo: str, query: str, limit: int = 10) -> list[str]:
    """Search the repository's open issues.

    Matches titles and bodies.

    Args:
        repo: the repository, as owner/name.
        limit: at most this many issues.
    """
    return [f"{repo}:{query}:{limit}:{ctx.idempotency_key}"]


@tool(name="ship-it", description="Deploy a version.", idempotent=True, timeout=timedelta(minutes=5))
def deploy(
    version: str, where: Place, priority: Priority = Priority.LOW, tags: list[str] | None = None
) -> dict[str, Any]:
    return {"version": version, "city": where.city, "priority": priority.value, "tags": tags}


def test_schema_from_hints_and_docstring() -> None:
    spec = search_issues.spec()
    assert spec["name"] == "search_issues"
    assert spec["description"] == "Search the repository's open issues.\n\nMatches titles and bodies."
    params = spec["parameters"]
    assert params["type"] == "object"
    assert params["required"] == ["repo", "query"]  # the ToolContext is not an argument
    assert set(params["properties"]) == {"repo", "query", "limit"}
    assert params["properties"]["repo"]["description"] == "the repository, as owner/name."
    assert params["properties"]["limit"] == {
        "default": 10,
        "description": "at most this many issues.",
        "title": "Limit",
        "type": "integer",
    }
    assert params["additionalProperties"] is False
    assert search_issues.takes_context and search_issues.is_async
    assert not search_issues.idempotent and search_issues.approval is None


def test_options_and_nested_types() -> None:
    assert isinstance(deploy, Tool)
    assert (deploy.name, deploy.description, deploy.idempotent, deploy.timeout) == (
        "ship-it",
        "Deploy a version.",
        True,
        300.0,
    )
    assert not deploy.takes_context and not deploy.is_async
    params = deploy.spec()["parameters"]
    assert params["required"] == ["version", "where"]
    assert params["$defs"]["Priority"]["enum"] == ["low", "high"]
    assert params["$defs"]["Place"]["required"] == ["city"]


def test_validate_arguments_json_and_mapping() -> None:
    args = deploy.validate('{"version": "1.2.3", "where": {"city": "Oslo"}, "priority": "high"}')
    kwargs = deploy.keywords(args)
    assert kwargs["where"] == Place(city="Oslo") and kwargs["priority"] is Priority.HIGH
    assert deploy(**kwargs) == {"version": "1.2.3", "city": "Oslo", "priority": "high", "tags": None}
    assert deploy.keywords(deploy.validate({"version": "2", "where": {"city": "Rome"}}))["tags"] is None


@pytest.mark.parametrize(
    ("arguments", "names"),
    [
        ('{"version": 3, "where": {"city": "Oslo"}}', "version"),
        ({"version": "1", "where": {}}, "where.city"),
        ({"version": "1", "where": {"city": "x"}, "priority": "urgent"}, "priority"),
        ({"version": "1", "where": {"city": "x"}, "force": True}, "force"),  # unknown: refused
        ('{"version": "1", "where": ', "(arguments)"),  # not JSON
    ],
)
def test_invalid_arguments_name_the_tool_and_field(arguments: Any, names: str) -> None:
    with pytest.raises(InvalidInputError) as err:
        deploy.validate(arguments, "run r1, step Ship")
    msg = str(err.value)
    assert msg.startswith("run r1, step Ship: tool 'ship-it': invalid arguments: ")
    assert names in msg
    assert err.value.errors


def test_arguments_that_are_not_an_object() -> None:
    with pytest.raises(InvalidInputError, match="arguments must be a JSON object, got list"):
        deploy.validate([1, 2])
    with pytest.raises(InvalidInputError, match=r"\(arguments\): Input should be an object"):
        deploy.validate("[1, 2]")


def test_local_classes_in_hints_resolve() -> None:
    class Local(BaseModel):
        n: int

    @tool
    def count(item: Local) -> int:
        """Count it."""
        return item.n

    assert count.keywords(count.validate({"item": {"n": 4}})) == {"item": Local(n=4)}


def test_tool_context_carries_the_call() -> None:
    seen: list[tuple[str, Any]] = []
    ctx = ToolContext(
        "r1", "Ship", "ops", "call_1", "r1/Ship.1/ops/call_1", 2, None, lambda k, d: seen.append((k, d))
    )
    ctx.emit("progress", {"pct": 50})
    assert seen == [("progress", {"pct": 50})]
    assert (ctx.attempt, ctx.agent, ctx.call_id) == (2, "ops", "call_1")
    assert "call_1" in repr(ctx)


def _no_doc(x: int) -> int:
    return x


def _star(*items: str) -> None:
    """Star."""


def _kw(**items: str) -> None:
    """Kw."""


def _pos(x: int, /) -> None:
    """Pos."""


def _ctx_late(x: int, ctx: ToolContext) -> None:
    """Late."""


def _callable_arg(fn: Any) -> None:
    """Takes anything."""


class _Opaque:
    pass


def _opaque(x: _Opaque) -> None:
    """Opaque."""


def _bad_hint(x: Missing) -> None:  # type: ignore[name-defined]  # noqa: F821
    """Bad hint."""


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: tool(_no_doc), "has no description: give the function a docstring"),
        (lambda: tool(_star), "parameter 'items' is \\*args"),
        (lambda: tool(_kw), "parameter 'items' is \\*\\*kwargs"),
        (lambda: tool(_pos), "positional-only"),
        (lambda: tool(_ctx_late), "the ToolContext parameter must come first"),
        (lambda: tool(_opaque), "tool '_opaque': an argument type cannot be described"),
        (lambda: tool(_bad_hint), "tool '_bad_hint': cannot read its type hints"),
        (lambda: tool(_no_doc, name="has space", description="d"), "tool name 'has space' is not allowed"),
        (lambda: tool(_no_doc, name="x" * 65, description="d"), "is not allowed"),
        (lambda: tool(_no_doc, description="d", timeout=0), "timeout must be positive"),
        (lambda: tool(_no_doc, description="d", approval="ops"), "approval must be a HumanApproval"),  # type: ignore[call-overload]
        (lambda: tool(_no_doc, description="d", retry=3), "retry must be a RetryPolicy"),  # type: ignore[call-overload]
        (lambda: tool(_no_doc, description="d", idempotent="yes"), "idempotent must be True or False"),  # type: ignore[call-overload]
        (lambda: tool(deploy), "is a tool already"),
        (lambda: tool(42), "takes a function"),  # type: ignore[call-overload]
    ],
)
def test_declaration_mistakes(make: Any, message: str) -> None:
    with pytest.raises(WorkflowDefinitionError, match=message):
        make()


def test_any_is_describable() -> None:
    t = tool(_callable_arg)
    assert t.spec()["parameters"]["required"] == ["fn"]


def test_approval_and_retry_are_kept() -> None:
    gate = HumanApproval(approvers=["ops-lead"], prompt="Deploy?")
    t = tool(_no_doc, description="Double.", approval=gate, retry=RetryPolicy(max_attempts=2))
    assert t.approval is gate and t.retry is not None and t.retry.max_attempts == 2
    assert t(3) == 3  # still the function


def test_an_agent_refuses_plain_functions_and_two_tools_of_one_name() -> None:
    assert Agent(provider="openai", model="m", tools=[search_issues, deploy]).tools == (search_issues, deploy)
    other = tool(_no_doc, name="search_issues", description="Another.")
    with pytest.raises(WorkflowDefinitionError, match="two tools are named 'search_issues'"):
        Agent(provider="openai", model="m", tools=[search_issues, other])
    with pytest.raises(WorkflowDefinitionError, match="_no_doc is not a tool; declare it with @tool"):
        Agent(provider="openai", model="m", tools=[_no_doc])
