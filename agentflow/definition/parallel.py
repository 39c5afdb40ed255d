"""Parallel steps: ``Parallel([...], target)`` and ``Parallel.map(fn, items, target)``."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import WorkflowDefinitionError
from .steps import StepFunction, as_step

__all__ = ["BranchError", "OnError", "Parallel"]

OnError = Literal["fail", "collect"]

#: Reserved key marking a stored BranchError (stored outputs are plain JSON).
_ERROR_TAG = "__agentflow_branch_error__"


@dataclass(frozen=True, slots=True)
class BranchError:
    """The result of a branch that failed under ``on_error="collect"``."""

    name: str
    error_type: str
    message: str

    def to_json(self) -> dict[str, Any]:
        """The stored form."""
        return {_ERROR_TAG: True, "name": self.name, "error_type": self.error_type, "message": self.message}

    @staticmethod
    def is_stored(value: Any) -> bool:
        """True when ``value`` is the stored form of a BranchError."""
        return type(value) is dict and value.get(_ERROR_TAG) is True

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> BranchError:
        """Read the stored form back."""
        return cls(str(value["name"]), str(value["error_type"]), str(value["message"]))


class Parallel:
    """Run branch callables concurrently, then go to ``target``.

    A branch is a callable of ctx returning its output. Each output lands in
    ``ctx.step_results`` under the function's name, or the key when ``branches`` is a
    dict. Branch ``set_state`` calls are applied at the join, in declared order.

    Args:
        branches: callables, or a dict name → callable.
        target: the step to go to once every branch finished.
        max_concurrency: how many branches run at once (all when None).
        on_error: ``"fail"``: the first failure cancels the siblings and fails the run;
            ``"collect"``: every branch runs, a failure's result is a :class:`BranchError`.
    """

    __slots__ = ("branches", "items", "map_name", "max_concurrency", "on_error", "target")

    def __init__(
        self,
        branches: Sequence[Callable[..., Any]] | Mapping[str, Callable[..., Any]],
        target: str,
        max_concurrency: int | None = None,
        on_error: OnError = "fail",
    ) -> None:
        if isinstance(branches, Mapping):
            named = {str(k): as_step(v, f"parallel branch {k!r}") for k, v in branches.items()}
        else:
            named = {}
            for fn in branches:
                spec = as_step(fn, "a parallel branch")
                if spec.name in named or spec.name == "<lambda>":
                    raise WorkflowDefinitionError(
                        f"parallel branch name {spec.name!r} is not unique; pass a dict {{name: fn}}"
                    )
                named[spec.name] = spec
        self.branches: dict[str, StepFunction] = named
        self.target = target
        self.max_concurrency = _check(max_concurrency, on_error)
        self.on_error: OnError = on_error
        self.map_name: str | None = None
        self.items: list[Any] | None = None
        if not named:
            raise WorkflowDefinitionError("Parallel needs at least one branch")

    @classmethod
    def map(
        cls,
        fn: Callable[..., Any],
        items: Iterable[Any],
        target: str,
        max_concurrency: int | None = None,
        on_error: OnError = "fail",
    ) -> Parallel:
        """One branch per item (``ctx.item`` inside); results as a list in item order under ``fn``'s name."""
        spec = as_step(fn, "Parallel.map's function")
        self = cls.__new__(cls)
        self.branches = {spec.name: spec}
        self.target = target
        self.max_concurrency = _check(max_concurrency, on_error)
        self.on_error = on_error
        self.map_name = spec.name
        self.items = list(items)
        return self

    def __repr__(self) -> str:
        what = (
            f"map {self.map_name} over {len(self.items or [])} items"
            if self.map_name
            else list(self.branches)
        )
        return f"Parallel({what}, {self.target!r})"


def _check(max_concurrency: int | None, on_error: str) -> int | None:
    if max_concurrency is not None and max_concurrency < 1:
        raise WorkflowDefinitionError(f"max_concurrency must be at least 1, got {max_concurrency}")
    if on_error not in ("fail", "collect"):
        raise WorkflowDefinitionError(f"on_error must be 'fail' or 'collect', got {on_error!r}")
    return max_concurrency
