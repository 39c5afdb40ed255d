"""The step context ``ctx`` a step is called with, and the frame the engine keeps behind it.

A :class:`Frame` is the engine's side of one step execution: the state as the step
sees it, the state its first attempt started from, its agent handles, and (inside a
parallel branch) the updates to apply at the join. The engine reads and resets the
frame; ``ctx`` only exposes the public API over it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Generic

from pydantic import BaseModel, ValidationError
from typing_extensions import TypeVar

from ..errors import AgentflowError, StateValidationError
from ..types import LIFECYCLE_KINDS, Decision
from .values import check_json

if TYPE_CHECKING:
    from .run import LiveRun

__all__ = ["Frame", "StepContext", "StepResults", "validate_state"]

InputT = TypeVar("InputT", default=Any)
StateT = TypeVar("StateT", default=Any)


class StepResults(Mapping[str, Any]):
    """Read-only view: step name → latest output; ``history(name)`` lists every output."""

    __slots__ = ("_history", "_latest")

    def __init__(self, latest: dict[str, Any], history: dict[str, list[Any]]) -> None:
        self._latest = latest
        self._history = history

    def __getitem__(self, name: str) -> Any:
        return self._latest[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._latest)

    def __len__(self) -> int:
        return len(self._latest)

    def history(self, name: str) -> list[Any]:
        """Every output of step ``name``, oldest first (empty if it never produced one)."""
        return list(self._history.get(name, ()))

    def __repr__(self) -> str:
        return f"StepResults({self._latest!r})"


_FIELDS: dict[type[BaseModel], frozenset[str]] = {}


def validate_state(
    model: type[BaseModel], current: BaseModel | None, updates: Mapping[str, Any], where: Any
) -> BaseModel:
    """Merge ``updates`` into ``current`` (shallow) and validate against ``model`` at once.

    ``where`` (built into the message only on error) says which run and step asked.
    A value that could not be stored and read back (not JSON-able, nested too deep) is
    refused here, naming the field, rather than when the run is next loaded.
    """
    fields = _FIELDS.get(model)
    if fields is None:
        fields = _FIELDS[model] = frozenset(model.__pydantic_fields__)
    for key, value in updates.items():
        if key not in fields:
            raise StateValidationError(
                f"{where}: {model.__name__} has no field {key!r}; fields are {sorted(fields)}", field=key
            )
        if type(value) not in _SCALARS:
            # As deep as it is stored: in the state, and in a step_completed event's
            # data["state"] (the fields a step changed; see _engine/history.py).
            problem = check_json({"data": {"state": {key: value}}})
            if problem is not None:
                raise StateValidationError(
                    f"{where}: state field {key!r} cannot be stored: {problem}", field=key
                )
    if current is None:
        merged: dict[str, Any] = {}
    else:
        merged = current.__dict__.copy()
        extra = current.__pydantic_extra__
        if extra:
            merged.update(extra)
    merged.update(updates)
    try:
        # The model's validator itself: model_validate adds nothing here but its cost.
        return model.__pydantic_validator__.validate_python(merged)  # type: ignore[no-any-return]
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        loc = errors[0]["loc"] if errors else ()
        field = str(loc[0]) if loc else None
        detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors)
        raise StateValidationError(
            f"{where}: invalid state for {model.__name__} field {field!r}: {detail}",
            field=field,
            errors=errors,
        ) from None


_SCALARS = frozenset({str, int, bool, type(None)})


class Frame:
    """The engine's side of one step execution (see the module docstring)."""

    __slots__ = ("agents", "base", "scope", "state", "updates")

    def __init__(self, state: BaseModel | None, scope: str = "") -> None:
        self.state = state
        self.base: BaseModel | None = state
        self.agents: Any = None
        self.scope = scope
        self.updates: dict[str, Any] | None = None  # a parallel branch's, applied at the join

    async def close_agents(self) -> None:
        """Close the handles the step left open (each reported as an ``agent_leak``)."""
        if self.agents is not None:
            agents, self.agents = self.agents, None
            await agents.close_all()


class _Where:
    """Lazily formatted "run X, step Y" for error messages (formatting is not free)."""

    __slots__ = ("ctx",)

    def __init__(self, ctx: StepContext[Any, Any]) -> None:
        self.ctx = ctx

    def __str__(self) -> str:
        return f"run {self.ctx.run_id}, step {self.ctx.step_name!r}"


class StepContext(Generic[InputT, StateT]):
    """What a step sees: input, state, earlier outputs, the latest decision, agents.

    Generic in the input and state models, so a step typed
    ``async def build(ctx: StepContext[DeployInput, DeployState])`` is checked.

    Attributes:
        attempt: 1-based attempt number under a retry policy.
        item: the item of a ``Parallel.map`` branch (None elsewhere).
        visit: how many steps the run had started when this one began.
    """

    __slots__ = ("_frame", "_name", "_run", "attempt", "item", "visit")

    def __init__(self, run: LiveRun, name: str, visit: int, frame: Frame, item: Any = None) -> None:
        self._run = run
        self._frame = frame
        self._name = name
        self.visit = visit
        self.attempt = 1
        self.item = item

    @property
    def input(self) -> InputT:
        """The run's validated input model."""
        return self._run.input  # type: ignore[no-any-return]

    @property
    def run_id(self) -> str:
        """The run's id."""
        return self._run.run_id

    @property
    def step(self) -> Any:
        """The current step's name (a branch's name inside a parallel branch).

        In an ``.execute(fn)`` workflow ``ctx.step`` is the journaled-call method
        instead; ``ctx.step_name`` works in both modes.
        """
        return self._name

    @property
    def step_name(self) -> str:
        """The current step's name, in flow and imperative mode alike."""
        return self._name

    @property
    def state(self) -> StateT:
        """The current state model (with this step's own ``set_state`` calls applied)."""
        return self._frame.state  # type: ignore[return-value]

    def set_state(self, updates: Mapping[str, Any] | BaseModel | None = None, /, **fields: Any) -> None:
        """Shallow-merge into the state, validated at once against the state model.

        Accepts a mapping, a model instance (its set fields), or keyword fields.

        Raises:
            StateValidationError: a field is unknown or its value invalid; the state is unchanged.
        """
        run = self._run
        model = run.spec.state_model
        if model is None:
            raise StateValidationError(
                f"run {run.run_id}, step {self._name!r}: the workflow declares no state model; "
                "add .state(Model) to the workflow"
            )
        if updates is None:
            data: Mapping[str, Any] = fields
        elif isinstance(updates, BaseModel):
            data = {k: getattr(updates, k) for k in updates.model_fields_set}
            data.update(fields)
        else:
            data = {**updates, **fields}
        frame = self._frame
        frame.state = validate_state(model, frame.state, data, _Where(self))
        if frame.updates is not None:
            frame.updates.update(data)

    @property
    def step_results(self) -> StepResults:
        """Step name → latest output; ``.history(name)`` for every output."""
        return self._run.results_view

    @property
    def decision(self) -> Decision | None:
        """The latest gate decision, or None."""
        return self._run.decision

    @property
    def agents(self) -> Any:
        """Agent handles: ``await ctx.agents.writer`` or ``async with ctx.agents["writer"] as w``."""
        frame = self._frame
        if frame.agents is None:
            frame.agents = self._run.agents_for(self._name, self.visit, frame.scope)
        return frame.agents

    def emit(self, name: str, data: Any = None) -> None:
        """Record a custom progress event of kind ``name`` on the run.

        Raises:
            AgentflowError: ``name`` is one of the run's lifecycle kinds (``completed``,
                ``failed``...), which watchers rely on; or ``data`` is not JSON-able.
        """
        if name in LIFECYCLE_KINDS:
            raise AgentflowError(
                f"run {self.run_id}, step {self._name!r}: ctx.emit({name!r}) would pose as a lifecycle "
                f"event; pick another name (reserved: {', '.join(sorted(LIFECYCLE_KINDS))})"
            )
        problem = check_json(data)
        if problem is not None:
            raise AgentflowError(f"run {self.run_id}, step {self._name!r}: ctx.emit({name!r}) data {problem}")
        self._run.emit(name, self._name, data)

    def __repr__(self) -> str:
        return f"<ctx run={self.run_id} step={self._name!r} attempt={self.attempt}>"
