"""The step context ``ctx`` a step is called with."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from .errors import StateValidationError
from .records import Decision, RunEvent

if TYPE_CHECKING:
    from .engine import LiveRun

__all__ = ["StepContext", "StepResults", "validate_state"]


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
    """
    fields = _FIELDS.get(model)
    if fields is None:
        fields = _FIELDS[model] = frozenset(model.__pydantic_fields__)
    for key in updates:
        if key not in fields:
            raise StateValidationError(
                f"{where}: {model.__name__} has no field {key!r}; fields are {sorted(fields)}", field=key
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
        return model.model_validate(merged)
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


class _Where:
    """Lazily formatted "run X, step Y" for error messages (formatting is not free)."""

    __slots__ = ("ctx",)

    def __init__(self, ctx: StepContext) -> None:
        self.ctx = ctx

    def __str__(self) -> str:
        return f"run {self.ctx.run_id}, step {self.ctx.step_name!r}"


class StepContext:
    """What a step sees: input, state, earlier outputs, the latest decision, agents.

    Attributes:
        input: the validated input model.
        run_id: the run.
        attempt: 1-based attempt number under a retry policy.
        item: the item of a ``Parallel.map`` branch (None elsewhere).
    """

    __slots__ = ("_agents", "_base", "_run", "_state", "_step", "attempt", "item", "visit")

    def __init__(self, run: LiveRun, step: str, visit: int, item: Any = None) -> None:
        self._run = run
        self._state: BaseModel | None = run.state
        self._base: BaseModel | None = None
        self._agents: Any = None
        self._step = step
        self.visit = visit
        self.attempt = 1
        self.item = item

    @property
    def input(self) -> Any:
        """The run's validated input model."""
        return self._run.input

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
        return self._step

    @property
    def step_name(self) -> str:
        """The current step's name, in flow and imperative mode alike."""
        return self._step

    @property
    def state(self) -> Any:
        """The current state model (with this step's own ``set_state`` calls applied)."""
        return self._state

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
                f"run {run.run_id}, step {self._step!r}: the workflow declares no state model; "
                "add .state(Model) to the workflow"
            )
        if updates is None:
            data: Mapping[str, Any] = fields
        elif isinstance(updates, BaseModel):
            data = {k: getattr(updates, k) for k in updates.model_fields_set}
            data.update(fields)
        else:
            data = {**updates, **fields}
        self._state = validate_state(model, self._state, data, _Where(self))

    async def _begin_attempt(self, attempt: int) -> None:
        """Start attempt ``attempt``: a failed attempt's ``set_state`` calls do not carry over.

        Its agent handles are closed too, so the retry acquires fresh ones and its calls
        get the same journal keys: finished calls come back from the journal.
        """
        if attempt == 1:
            self._base = self._state
        else:
            self._state = self._base
            if self._agents is not None:
                await self._agents.close_all()
                self._agents = None
        self.attempt = attempt

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
        if self._agents is None:
            self._agents = self._run.agents_for(self)
        return self._agents

    def emit(self, name: str, data: Any = None) -> None:
        """Record a custom progress event of kind ``name`` on the run."""
        self._run.emit(RunEvent(name, self._run.run_id, self._step, data))

    def __repr__(self) -> str:
        return f"<ctx run={self.run_id} step={self._step!r} attempt={self.attempt}>"
