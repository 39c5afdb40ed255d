"""Typed values at the storage edge: run input, step outputs, the run's output.

Stores hand back plain JSON; these functions turn it back into the models the workflow
declares (types come from the definition, never from the store), and validate what
steps produce on the way in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from .errors import InvalidInputError, OutputValidationError
from .parallel import BranchError

if TYPE_CHECKING:
    from .steps import StepFunction
    from .workflow import WorkflowSpec

__all__ = ["decode_output", "encode_branch", "run_output", "step_output", "validate_input"]


def validate_input(spec: WorkflowSpec, data: Any) -> Any:
    """The run input validated against the input model (or checked JSON-able)."""
    model = spec.input_model
    if model is None:
        return data
    if isinstance(data, model):
        return data
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        detail = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(input)'}: {e['msg']}" for e in errors)
        raise InvalidInputError(
            f"invalid input for workflow {spec.name!r} ({model.__name__}): {detail}", errors=errors
        ) from None


def decode_output(spec: WorkflowSpec, step: str, value: Any) -> Any:
    """A stored step output back as its declared type (BranchErrors and lists included)."""
    if BranchError.is_stored(value):
        return BranchError.from_json(value)
    model = spec.output_types.get(step)
    if model is None:
        return value
    if type(value) is list:
        return [decode_output(spec, step, v) for v in value]
    if isinstance(value, model):
        return value
    return model.model_validate(value)


def encode_branch(value: Any) -> Any:
    """A step output as stored: BranchErrors (also inside a map's list) in their stored form."""
    if isinstance(value, BranchError):
        return value.to_json()
    if type(value) is list:
        return [encode_branch(v) for v in value]
    return value


def _fit(model: type[BaseModel] | None, value: Any, where: str) -> Any:
    if model is None or value is None or isinstance(value, model):
        return value
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise OutputValidationError(f"{where}: output does not fit {model.__name__}: {exc}") from None


def step_output(fn: StepFunction, name: str, run_id: str, value: Any) -> Any:
    """A step's output validated into its declared output model, if it has one."""
    return _fit(fn.output, value, f"run {run_id}, step {name!r}")


def run_output(spec: WorkflowSpec, run_id: str, value: Any) -> Any:
    """The run's output validated into the declared output model."""
    return _fit(spec.output_model, value, f"run {run_id}")
