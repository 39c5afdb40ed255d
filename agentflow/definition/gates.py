"""Gates, as declared: ``Wait(gate, target)`` and ``HumanApproval(...)``.

What happens at a gate (parking the run, deciding, timing out) is the engine's
(``agentflow._engine.gates``); this module only describes gates.
"""

from __future__ import annotations

import ast
import functools
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Protocol, runtime_checkable

import pydantic_core
from pydantic import BaseModel

from ..errors import WorkflowDefinitionError
from .graph import _source_node, scope_of
from .steps import StepFunction

__all__ = ["Gate", "HumanApproval", "Sleep", "Wait", "form_schema", "forms_of", "seconds"]


@functools.lru_cache(maxsize=256)
def form_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The JSON schema of a form model (built once per model: every parked gate carries it)."""
    return model.model_json_schema()


def seconds(value: float | timedelta | None, what: str) -> float | None:
    """A timeout given as seconds or a timedelta, as seconds."""
    if value is None:
        return None
    out = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if out <= 0:
        raise WorkflowDefinitionError(f"{what} must be positive, got {value!r}")
    return out


@runtime_checkable
class Gate(Protocol):
    """Something a run waits on. ``kind`` names it in the stored record."""

    @property
    def kind(self) -> str:
        """What the stored record calls it (``"human_approval"``, ``"sleep"``)."""
        ...

    def describe(self) -> dict[str, Any]:
        """The gate as JSON-able data, kept with the waiting run."""
        ...


@dataclass(frozen=True)
class HumanApproval:
    """Wait for named people to approve.

    Args:
        approvers: who may decide.
        quorum: how many distinct approvals move the run on.
        timeout: seconds or a timedelta; past it the gate times out.
        prompt: what the reviewer is asked.
        context: JSON-able data for review (an agent's draft, a diff).
        form: a pydantic model the reviewer's ``data`` is validated into; the next
            step sees ``ctx.decision.data`` as an instance of it (after a reload too),
            and the stored approval carries its JSON schema.
    """

    approvers: list[str]
    quorum: int = 1
    timeout: float | timedelta | None = None
    prompt: str | None = None
    context: Any = None
    form: type[BaseModel] | None = None
    kind: str = field(default="human_approval", init=False)

    def __post_init__(self) -> None:
        if isinstance(self.approvers, str) or not self.approvers:
            raise WorkflowDefinitionError("HumanApproval needs a non-empty list of approvers")
        if not 1 <= self.quorum <= len(set(self.approvers)):
            raise WorkflowDefinitionError(
                f"HumanApproval quorum {self.quorum} cannot be met by approvers {self.approvers}"
            )
        seconds(self.timeout, "HumanApproval timeout")
        if self.form is not None and not (isinstance(self.form, type) and issubclass(self.form, BaseModel)):
            raise WorkflowDefinitionError(
                f"HumanApproval form must be a pydantic model class, got {self.form!r}"
            )
        try:
            pydantic_core.to_json(self.context)
        except pydantic_core.PydanticSerializationError as exc:
            raise WorkflowDefinitionError(f"HumanApproval context must be JSON-able: {exc}") from exc

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "approvers": list(self.approvers),
            "quorum": self.quorum,
            "timeout": seconds(self.timeout, "timeout"),
            "prompt": self.prompt,
            "context": pydantic_core.to_jsonable_python(self.context),
            "form": None if self.form is None else form_schema(self.form),
        }


@dataclass(frozen=True, init=False)
class Sleep:
    """A durable timer: ``Wait(Sleep(seconds), target)`` parks the run until it is due.

    The run holds no task while it sleeps; when the time has come it continues at
    ``target`` in whichever process serves the workflow's store (one that starts later
    picks up timers that came due while no process was alive).

    Args:
        duration: seconds or a timedelta (positive).
    """

    seconds: float
    kind: str = field(default="sleep", init=False)

    def __init__(self, duration: float | timedelta) -> None:
        if isinstance(duration, bool) or not isinstance(duration, int | float | timedelta):
            raise WorkflowDefinitionError(f"Sleep takes seconds or a timedelta, got {duration!r}")
        value = seconds(duration, "Sleep duration")
        assert value is not None
        object.__setattr__(self, "seconds", value)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "seconds": self.seconds}


@dataclass(frozen=True, slots=True)
class Wait:
    """Stop the run at ``gate``; approved → ``target``, rejected → ``on_reject``, timed out → ``on_timeout``.

    Without ``on_reject`` a rejection ends the run as ``rejected``; without
    ``on_timeout`` a timeout ends it as ``expired``.
    """

    gate: Gate
    target: str
    on_reject: str | None = None
    on_timeout: str | None = None


def forms_of(fn: Callable[..., Any]) -> tuple[type[BaseModel], ...]:
    """The form models of the gates a step may return, found from its code.

    ``step(fn, form=Model)`` declares one. Otherwise they are read from the code: a
    ``HumanApproval(..., form=Model)`` call in the step (or in a function it calls), a
    ``HumanApproval`` or ``Wait`` it refers to by name. As for declared outputs, the
    types come from the code, never from the store.
    """
    found: list[type[BaseModel]] = []
    _collect_forms(fn, found, 0)
    return tuple(found)


def _collect_forms(fn: Any, found: list[type[BaseModel]], depth: int) -> None:
    if isinstance(fn, StepFunction):
        if fn.form is not None and fn.form not in found:
            found.append(fn.form)
        fn = fn.fn
    code = getattr(fn, "__code__", None)
    if code is None or depth > 3:
        return
    scope = scope_of(fn)

    def add(model: Any) -> None:
        if isinstance(model, type) and issubclass(model, BaseModel) and model not in found:
            found.append(model)

    tree = _source_node(fn)
    for node in ast.walk(tree) if tree is not None else ():
        if isinstance(node, ast.Call) and _callee(node.func) == "HumanApproval":
            for kw in node.keywords:
                if kw.arg == "form":
                    add(_resolve(kw.value, scope))
    codes = [code]
    while codes:
        c = codes.pop()
        for name in (*c.co_names, *c.co_freevars):
            obj = scope.get(name)
            gate = obj.gate if isinstance(obj, Wait) else obj
            if isinstance(gate, HumanApproval):
                add(gate.form)
            elif isinstance(obj, StepFunction) or (isinstance(obj, types.FunctionType) and obj is not fn):
                _collect_forms(obj, found, depth + 1)
        codes.extend(k for k in c.co_consts if isinstance(k, types.CodeType))


def _callee(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _resolve(node: ast.AST, scope: dict[str, Any]) -> Any:
    """The object a name (``Model``) or dotted name (``forms.Model``) in ``scope`` stands for."""
    if isinstance(node, ast.Name):
        return scope.get(node.id)
    if isinstance(node, ast.Attribute):
        return getattr(_resolve(node.value, scope), node.attr, None)
    return None
