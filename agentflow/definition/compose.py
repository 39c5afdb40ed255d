"""Composition, as declared: ``Run(child_workflow, input, target)`` and finding a flow's children.

What happens when a step returns a ``Run`` (starting the child, parking the parent,
resuming it when the child ends) is the engine's (``agentflow._engine.compose``);
this module only describes it, and finds the workflows a flow may run as children
from its steps' code, as :mod:`.graph` finds its edges.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from ..errors import WorkflowDefinitionError
from .graph import scope_of
from .steps import END, StepFunction

if TYPE_CHECKING:
    from .workflow import Workflow

__all__ = ["Run", "referenced_workflows"]


@dataclass(frozen=True, slots=True)
class Run:
    """Run ``workflow`` as a child run with ``input``, then go to ``target`` with its output.

    Returned by a flow step (or by a ``Parallel.map`` branch, where ``target``,
    ``on_fail`` and ``on_reject`` are ignored: the ``Parallel``'s own target and
    ``on_error`` apply). The child's output becomes this step's result, typed by the
    child's ``.output(Model)``.

    Args:
        workflow: the child workflow; it must be found in the parent's step code or
            declared with ``Workflow.children(...)``.
        input: the child's input (validated against the child's input model).
        target: the step the parent goes to once the child completed (``END``, the
            default, ends the parent with the child's output as its output).
        on_fail: the step to go to when the child fails (its result is then a
            ``BranchError`` naming the child run); without it the parent fails.
        on_reject: the step to go to when the child ends rejected or expired (its
            result is then a ``BranchError``); without it the parent ends with the
            child's status.
    """

    workflow: Workflow
    input: Any = None
    target: str = END
    on_fail: str | None = None
    on_reject: str | None = None

    def __post_init__(self) -> None:
        if not _is_workflow(self.workflow):
            raise WorkflowDefinitionError(
                f"Run(...) takes a Workflow as its first argument, got {self.workflow!r}"
            )
        for what in ("target", "on_fail", "on_reject"):
            value = getattr(self, what)
            if value is not None and not isinstance(value, str):
                raise WorkflowDefinitionError(
                    f"Run({self.workflow.name!r}): {what} must be a step name, got {value!r}"
                )


_WORKFLOW: list[type] = []  # the Workflow class, imported on first use (it imports this module)


def _is_workflow(obj: Any) -> bool:
    if not _WORKFLOW:
        from .workflow import Workflow

        _WORKFLOW.append(Workflow)
    return isinstance(obj, _WORKFLOW[0])


def referenced_workflows(fn: Callable[..., Any], depth: int = 0) -> Iterator[Workflow]:
    """Workflows ``fn``'s code refers to by global or closure name (helpers it calls included).

    The names a function's code uses are resolved in its globals and closure; a
    ``Workflow`` found there is a child the step may run. Functions (and step
    functions) it refers to are looked into as well, a few levels deep, so
    ``Parallel.map(release, ...)`` finds the workflow ``release`` runs.
    """
    code = getattr(fn, "__code__", None)
    if code is None or depth > 3:
        return
    scope = scope_of(fn)
    codes = [code]
    module = getattr(fn, "__module__", None)
    while codes:
        c = codes.pop()
        names = (*c.co_names, *c.co_freevars)
        modules = [m for m in (scope.get(n) for n in names) if isinstance(m, types.ModuleType)]
        for name in names:
            obj = scope.get(name)
            if obj is None:
                obj = next((a for m in modules if _is_workflow(a := getattr(m, name, None))), None)
            if _is_workflow(obj):
                yield cast("Workflow", obj)
            elif isinstance(obj, StepFunction):
                yield from referenced_workflows(obj.fn, depth + 1)
            elif isinstance(obj, types.FunctionType) and obj is not fn and obj.__module__ == module:
                yield from referenced_workflows(obj, depth + 1)
        codes.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
