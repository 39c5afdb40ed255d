"""Tools an agent may call, as declared: ``@tool`` / ``tool(fn, ...)``, and the ``ToolContext`` a tool sees.

A tool is a plain function (sync or async) whose type hints are its argument schema:
pydantic builds a model from the parameters, and that model's JSON schema is what the
model is shown; the model's arguments are validated into it before the tool runs. The
description comes from the docstring (its summary and body; an ``Args:`` section gives
each parameter its description), unless one is given. An optional first parameter
annotated :class:`ToolContext` receives the calling run's context and is not part of
the schema.

Every mistake that can be known from the declaration (no description, a parameter type
pydantic cannot describe, ``*args``, a name the providers refuse, two tools of one
name, caught by ``Agent(tools=...)``) raises
:class:`~agentflow.errors.WorkflowDefinitionError` when declared, not mid-run.
Running a tool — journaling, approvals, timeouts, retries — is the engine's.
"""

from __future__ import annotations

import inspect
import re
import sys
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, overload

import docstring_parser
import pydantic
import pydantic_core
from pydantic import BaseModel, ConfigDict

from ..agents.spi import ToolContext
from ..errors import InvalidInputError, WorkflowDefinitionError
from .gates import HumanApproval, seconds
from .steps import RetryPolicy, is_async_callable

__all__ = ["Tool", "ToolContext", "tool"]

#: What both providers accept as a tool (function) name.
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True, eq=False)
class Tool:
    """A declared tool. Build it with :func:`tool`; call it like the function it wraps.

    Attributes:
        fn: the function.
        name: the name the model calls it by.
        description: what the model is told it does.
        arguments: the pydantic model of its arguments (from the type hints).
        approval: a :class:`HumanApproval` every call must pass first, or None.
        idempotent: running it twice with the same arguments and idempotency key is
            harmless (after a crash during the call, it is run again rather than asked about).
        timeout: seconds one execution may take, or None.
        retry: how a failing execution is retried, or None (once).
        takes_context: its first parameter is the :class:`ToolContext`.
        is_async: it is a coroutine function (else it runs in a worker thread).
    """

    fn: Callable[..., Any]
    name: str
    description: str
    arguments: type[BaseModel]
    approval: HumanApproval | None = None
    idempotent: bool = False
    timeout: float | None = None
    retry: RetryPolicy | None = None
    takes_context: bool = False
    is_async: bool = False
    parameters: dict[str, Any] = field(default_factory=dict, repr=False)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def spec(self) -> dict[str, Any]:
        """What a provider shows the model: ``{"name", "description", "parameters"}`` (JSON schema)."""
        return {"name": self.name, "description": self.description, "parameters": self.parameters}

    def validate(self, arguments: Any, where: str = "") -> BaseModel:
        """The model's (or a reviewer's) arguments, validated: JSON text or a mapping.

        Raises:
            InvalidInputError: not JSON, not an object, or a field fails validation; the
                message names the tool and the field (``where`` says which run and step).
        """
        subject = f"{where}: " if where else ""
        try:
            if isinstance(arguments, str | bytes):
                return self.arguments.model_validate_json(arguments or "{}")
            if arguments is None:
                arguments = {}
            if not isinstance(arguments, Mapping):
                raise InvalidInputError(
                    f"{subject}tool {self.name!r}: arguments must be a JSON object, "
                    f"got {type(arguments).__name__}"
                )
            return self.arguments.model_validate(dict(arguments))
        except pydantic.ValidationError as exc:
            errors = exc.errors(include_url=False, include_context=False)
            detail = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(arguments)'}: {e['msg']}" for e in errors)
            raise InvalidInputError(
                f"{subject}tool {self.name!r}: invalid arguments: {detail}", errors
            ) from None

    def keywords(self, arguments: BaseModel) -> dict[str, Any]:
        """Validated arguments as the keyword arguments of ``fn`` (models stay models)."""
        return {name: getattr(arguments, name) for name in type(arguments).model_fields}


class _Arguments(BaseModel):
    """Base of every tool's argument model: unknown arguments are an error, not dropped."""

    model_config = ConfigDict(extra="forbid")


def _hints(fn: Callable[..., Any], name: str, localns: Mapping[str, Any] | None) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn, localns=dict(localns) if localns else None, include_extras=True)
    except Exception as exc:  # NameError for a hint naming something out of reach, and the like
        raise WorkflowDefinitionError(f"tool {name!r}: cannot read its type hints: {exc}") from exc


def _context_param(param: inspect.Parameter, hints: Mapping[str, Any]) -> bool:
    hint = hints.get(param.name, param.annotation)
    return hint is ToolContext or hint == "ToolContext"


def _build(
    fn: Callable[..., Any], name: str, doc: docstring_parser.Docstring, localns: Mapping[str, Any] | None
) -> tuple[type[BaseModel], bool]:
    """The argument model of ``fn``, and whether its first parameter is the ToolContext."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError) as exc:
        raise WorkflowDefinitionError(f"tool {name!r}: cannot read its signature: {exc}") from exc
    hints = _hints(fn, name, localns)
    params = list(sig.parameters.values())
    takes_context = bool(params) and _context_param(params[0], hints)
    if takes_context:
        params = params[1:]
    described = {p.arg_name: p.description for p in doc.params if p.description}
    fields: dict[str, Any] = {}
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise WorkflowDefinitionError(
                f"tool {name!r}: parameter {p.name!r} is "
                f"{'*args' if p.kind is p.VAR_POSITIONAL else '**kwargs'}; "
                "a tool's parameters are named, one per argument the model passes"
            )
        if p.kind is p.POSITIONAL_ONLY:
            raise WorkflowDefinitionError(
                f"tool {name!r}: parameter {p.name!r} is positional-only; the model passes arguments by name"
            )
        if _context_param(p, hints):
            raise WorkflowDefinitionError(f"tool {name!r}: the ToolContext parameter must come first")
        hint = hints.get(p.name, Any)
        default = ... if p.default is p.empty else p.default
        fields[p.name] = (hint, pydantic.Field(default, description=described.get(p.name)))
    model_name = "".join(part.capitalize() for part in re.split(r"[_-]+", name) if part) or "Tool"
    try:
        model = pydantic.create_model(f"{model_name}Arguments", __base__=_Arguments, **fields)
        model.model_json_schema()
    except (pydantic.PydanticSchemaGenerationError, pydantic.PydanticUserError, TypeError) as exc:
        raise WorkflowDefinitionError(
            f"tool {name!r}: an argument type cannot be described as JSON schema: {exc}"
        ) from exc
    except pydantic_core.PydanticSerializationError as exc:
        raise WorkflowDefinitionError(f"tool {name!r}: a default value is not JSON-able: {exc}") from exc
    return model, takes_context


def _schema(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema()
    schema.pop("title", None)
    schema.setdefault("properties", {})
    return schema


def _description(doc: docstring_parser.Docstring) -> str:
    parts = [p for p in (doc.short_description, doc.long_description) if p]
    return "\n\n".join(parts).strip()


def _make(
    fn: Callable[..., Any],
    name: str | None,
    description: str | None,
    approval: HumanApproval | None,
    idempotent: bool,
    timeout: float | timedelta | None,
    retry: RetryPolicy | None,
    localns: Mapping[str, Any] | None = None,
) -> Tool:
    if isinstance(fn, Tool):
        raise WorkflowDefinitionError(f"tool {fn.name!r} is a tool already")
    if not callable(fn):
        raise WorkflowDefinitionError(f"tool() takes a function, got {fn!r}")
    tool_name = name if name is not None else getattr(fn, "__name__", "")
    if not isinstance(tool_name, str) or not _NAME.match(tool_name):
        raise WorkflowDefinitionError(
            f"tool name {tool_name!r} is not allowed: use 1 to 64 letters, digits, '_' or '-' (pass name=...)"
        )
    doc = docstring_parser.parse(inspect.getdoc(fn) or "")
    text = description if description is not None else _description(doc)
    if not isinstance(text, str) or not text.strip():
        raise WorkflowDefinitionError(
            f"tool {tool_name!r} has no description: give the function a docstring or pass description=..."
        )
    if approval is not None and not isinstance(approval, HumanApproval):
        raise WorkflowDefinitionError(
            f"tool {tool_name!r}: approval must be a HumanApproval, got {approval!r}"
        )
    if not isinstance(idempotent, bool):
        raise WorkflowDefinitionError(
            f"tool {tool_name!r}: idempotent must be True or False, got {idempotent!r}"
        )
    if retry is not None and not isinstance(retry, RetryPolicy):
        raise WorkflowDefinitionError(f"tool {tool_name!r}: retry must be a RetryPolicy, got {retry!r}")
    model, takes_context = _build(fn, tool_name, doc, localns)
    return Tool(
        fn=fn,
        name=tool_name,
        description=text.strip(),
        arguments=model,
        approval=approval,
        idempotent=idempotent,
        timeout=seconds(timeout, f"tool {tool_name!r} timeout"),
        retry=retry,
        takes_context=takes_context,
        is_async=is_async_callable(fn),
        parameters=_schema(model),
    )


@overload
def tool(fn: Callable[..., Any], /) -> Tool: ...


@overload
def tool(
    fn: Callable[..., Any],
    /,
    name: str | None = None,
    description: str | None = None,
    approval: HumanApproval | None = None,
    idempotent: bool = False,
    timeout: float | timedelta | None = None,
    retry: RetryPolicy | None = None,
) -> Tool: ...


@overload
def tool(
    fn: None = None,
    /,
    name: str | None = None,
    description: str | None = None,
    approval: HumanApproval | None = None,
    idempotent: bool = False,
    timeout: float | timedelta | None = None,
    retry: RetryPolicy | None = None,
) -> Callable[[Callable[..., Any]], Tool]: ...


def tool(
    fn: Callable[..., Any] | None = None,
    /,
    name: str | None = None,
    description: str | None = None,
    approval: HumanApproval | None = None,
    idempotent: bool = False,
    timeout: float | timedelta | None = None,
    retry: RetryPolicy | None = None,
) -> Tool | Callable[[Callable[..., Any]], Tool]:
    """Declare ``fn`` a tool: ``tool(fn, ...)``, ``@tool`` or ``@tool(...)``.

    Args:
        name: the name the model calls it by (default: the function's name).
        description: what it does (default: the docstring).
        approval: a HumanApproval each call waits for before it runs.
        idempotent: safe to run again after a crash during the call.
        timeout: seconds (or a timedelta) one execution may take.
        retry: a RetryPolicy for failing executions.

    Raises:
        WorkflowDefinitionError: the declaration is wrong (names the tool and what).
    """
    if fn is None:

        def decorate(f: Callable[..., Any]) -> Tool:
            return _make(f, name, description, approval, idempotent, timeout, retry, _caller_locals())

        return decorate
    return _make(fn, name, description, approval, idempotent, timeout, retry, _caller_locals())


def _caller_locals() -> Mapping[str, Any] | None:
    """The names where the tool is declared (two frames up), so hints may name local classes."""
    frame = sys._getframe(2)
    return None if frame.f_locals is frame.f_globals else frame.f_locals
