"""Typed values at the edge of a run: input, step outputs, the run's output.

Stores hand back plain JSON; these functions turn it back into the models the workflow
declares (types come from the definition, never from the store), and validate what
steps produce on the way in.

Values without a declared model are *normalised to JSON* when they enter the run
(``datetime`` and ``Decimal`` become strings, tuples and sets lists, NaN None), so a
step sees the same value whether the run went on in memory or was reloaded from a
store. A value that could not be stored at all is refused at the door, naming where.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pydantic_core
from pydantic import BaseModel, ValidationError

from ..definition.parallel import BranchError
from ..errors import InvalidInputError, OutputValidationError
from ..stores.codec import decode

if TYPE_CHECKING:
    from ..definition.steps import StepFunction
    from ..definition.workflow import WorkflowSpec

__all__ = [
    "check_json",
    "decode_output",
    "encode_branch",
    "normalize",
    "revive",
    "run_output",
    "step_output",
    "validate_input",
]

_PLAIN = frozenset({str, int, bool, type(None)})


def _encode(value: Any) -> bytes:
    # NaN and infinities are not JSON: they become null, as JSON tools other than
    # pydantic would read them.
    return pydantic_core.to_json(value, inf_nan_mode="null")


def check_json(value: Any) -> str | None:
    """Why ``value`` cannot be stored and read back, or None when it can."""
    if type(value) in _PLAIN:
        return None
    try:
        raw = _encode(value)
    except (pydantic_core.PydanticSerializationError, TypeError, ValueError) as exc:
        if "depth" in str(exc):
            return f"is nested too deep to be stored ({exc})"
        return f"is not JSON-able ({exc})"
    try:
        decode("-", "-", raw)
    except Exception as exc:
        return f"cannot be read back once stored ({exc})"
    return None


def normalize(value: Any, where: str) -> Any:
    """``value`` as a store would hand it back (see the module docstring).

    Raises:
        OutputValidationError: the value cannot be stored (``where`` names it).
    """
    if type(value) in _PLAIN or isinstance(value, BaseModel):
        return value
    try:
        raw = _encode(value)
    except (pydantic_core.PydanticSerializationError, TypeError, ValueError) as exc:
        raise OutputValidationError(
            f"{where}: output is not JSON-able ({exc}); return JSON data or a pydantic model"
        ) from None
    try:
        return decode("-", "-", raw)
    except Exception as exc:
        raise OutputValidationError(f"{where}: output cannot be read back once stored ({exc})") from None


def validate_input(spec: WorkflowSpec, data: Any) -> Any:
    """The run input validated against the input model (or normalised to JSON without one).

    Raises:
        InvalidInputError: with pydantic's field errors; or the input cannot be stored.
    """
    model = spec.input_model
    if model is None:
        problem = check_json(data)
        if problem is not None:
            raise InvalidInputError(f"input for workflow {spec.name!r} {problem}")
        return data if type(data) in _PLAIN else decode("-", "input", _encode(data))
    if not isinstance(data, model):
        try:
            data = model.model_validate(data)
        except ValidationError as exc:
            errors = exc.errors(include_url=False)
            detail = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(input)'}: {e['msg']}" for e in errors)
            raise InvalidInputError(
                f"invalid input for workflow {spec.name!r} ({model.__name__}): {detail}", errors=errors
            ) from None
    problem = check_json(data)
    if problem is not None:
        # Name the field (each checked as the model holds it, one level down).
        name = next((f for f in type(data).model_fields if check_json({f: getattr(data, f)})), None)
        where = f"field {name!r} " if name else ""
        raise InvalidInputError(f"input for workflow {spec.name!r} ({model.__name__}) {where}{problem}")
    return data


def decode_output(spec: WorkflowSpec, step: str, value: Any) -> Any:
    """A stored step output back as its declared type (BranchErrors and lists included)."""
    if BranchError.is_stored(value):
        return BranchError.from_json(value)
    model = spec.output_types.get(step)
    if type(value) is list:
        return [decode_output(spec, step, v) for v in value]
    if model is None or isinstance(value, model):
        return value
    return model.model_validate(value)


def encode_branch(value: Any) -> Any:
    """A value as stored: BranchErrors (also inside lists and dicts) in their tagged stored form."""
    if isinstance(value, BranchError):
        return value.to_json()
    if type(value) is list:
        return [encode_branch(v) for v in value]
    if type(value) is dict:
        return {k: encode_branch(v) for k, v in value.items()}
    return value


def revive(value: Any) -> Any:
    """Stored BranchErrors (also inside a list) back as :class:`BranchError`."""
    if BranchError.is_stored(value):
        return BranchError.from_json(value)
    if type(value) is list:
        return [revive(v) for v in value]
    if type(value) is dict:
        return {k: revive(v) for k, v in value.items()}
    return value


def _fit(model: type[BaseModel] | None, value: Any, where: str) -> Any:
    if value is None or (model is not None and isinstance(value, model)):
        return value
    if model is None:
        # BranchErrors (a join's collected failures) keep their type, live and reloaded.
        return revive(normalize(encode_branch(value), where))
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise OutputValidationError(f"{where}: output does not fit {model.__name__}: {exc}") from None


def step_output(fn: StepFunction, name: str, run_id: str, value: Any) -> Any:
    """A step's output validated into its declared output model, or normalised to JSON."""
    return _fit(fn.output, value, f"run {run_id}, step {name!r}")


def run_output(spec: WorkflowSpec, run_id: str, value: Any) -> Any:
    """The run's output validated into the declared output model, or normalised to JSON."""
    return _fit(spec.output_model, value, f"run {run_id}")
