"""Codec: how the durable stores turn records into JSON and back.

Both durable stores share these rules so they read back the same things:

* Values are written with ``pydantic_core.to_json`` (plain data and pydantic models)
  and read back with ``pydantic_core.from_json`` as plain JSON data. Nothing read from
  a store names a Python object, and no pickle is involved anywhere.
* A value that cannot be written raises :class:`StoreError` naming the run and field,
  before anything is written.
* A stored value that cannot be read (bad JSON, a missing required field, a field of
  the wrong type) raises :class:`CorruptRecordError` naming the run and the key.
* An event's ``seq`` is its 1-based position in the run's history, as stored; the
  stores assign it from that position rather than trusting the caller's value.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import pydantic_core
from pydantic import BaseModel

from ..errors import CorruptRecordError, StoreError
from ..types import RunEvent, RunStatus
from .contract import COMMIT_FIELDS, OutputRecord, RunRecord

__all__ = [
    "JSON_FIELDS",
    "RECORD_FIELDS",
    "approval_rank",
    "approvers_of",
    "check_commit_fields",
    "check_record",
    "check_scalars",
    "column_value",
    "credential_key",
    "damaged",
    "deadline_of",
    "decode",
    "decode_credential",
    "encode",
    "encode_credential",
    "encode_event",
    "encode_output",
    "json_text",
    "make_event",
    "make_output",
    "make_record",
]

#: Every RunRecord field, in declaration order.
RECORD_FIELDS: tuple[str, ...] = tuple(f for f in RunRecord.__dataclass_fields__ if f != "corrupt")
#: The RunRecord fields stored as JSON; the others are scalars, stored as they are.
JSON_FIELDS = frozenset(
    {"input", "state", "pending", "decisions", "output", "error", "usage", "parent", "children"}
)

# RunRecord fields without a default: a stored record lacking one is damaged.
_REQUIRED = ("run_id", "workflow", "status", "input")


def encode(run_id: str, name: str, value: Any) -> bytes:
    """JSON-encode one value of a run.

    Raises:
        StoreError: the value is not JSON-able (names the run and the field).
    """
    try:
        return pydantic_core.to_json(value)
    except (pydantic_core.PydanticSerializationError, TypeError, ValueError) as exc:
        raise StoreError(
            f"run {run_id}: cannot store {name!r}: {exc}; store JSON-able data or pydantic models"
        ) from exc


def json_text(run_id: str, name: str, value: Any) -> str:
    """``value`` as JSON text; most fields hold None or no decisions, known without encoding.

    Raises:
        StoreError: the value is not JSON-able (names the run and the field).
    """
    if value is None:
        return "null"
    if type(value) is tuple and not value:
        return "[]"
    return encode(run_id, name, value).decode()


def column_value(run_id: str, name: str, value: Any) -> Any:
    """The stored form of one RunRecord field in a SQL column: JSON text, a status's value, or the value.

    Raises:
        StoreError: the value is not JSON-able (names the run and the field).
    """
    if name in JSON_FIELDS:
        return json_text(run_id, name, value)
    if name == "status":
        return RunStatus(value).value
    return value


def decode(run_id: str, key: str, raw: str | bytes) -> Any:
    """Decode one stored JSON value into plain data.

    Raises:
        CorruptRecordError: the stored bytes are not JSON.
    """
    try:
        return pydantic_core.from_json(raw)
    except ValueError as exc:
        if "recursion limit" not in str(exc):
            raise CorruptRecordError(run_id, key, f"invalid JSON: {exc}") from exc
    except TypeError as exc:  # a NULL or a number where JSON text belongs
        raise CorruptRecordError(run_id, key, f"invalid JSON: {exc}") from exc
    # Nested deeper than pydantic-core reads (about 200 levels) but no deeper than it
    # writes (255): the standard library reads it, so whatever was stored reads back.
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise CorruptRecordError(run_id, key, f"invalid JSON: {exc}") from exc


def check_scalars(run_id: str, fields: Mapping[str, Any]) -> None:
    """Refuse record scalars of the wrong type (a status that is no status, a str visit).

    Checking before writing keeps a bad value from being stored and then read back as
    a damaged record, which would make the run unrecoverable.

    Raises:
        StoreError: names the run and the field.
    """
    for name, value in fields.items():
        convert = _CONVERT.get(name)
        if convert is not None:
            try:
                convert(value)
            except (TypeError, ValueError) as exc:
                raise StoreError(f"run {run_id}: cannot store {name!r}: {exc}") from None


def _plain_scalars(rec: RunRecord) -> bool:
    """True when every scalar of ``rec`` has its exact type (the common case, checked inline)."""
    return (
        type(rec.run_id) is str
        and type(rec.workflow) is str
        and type(rec.status) is RunStatus
        and (rec.step is None or type(rec.step) is str)
        and type(rec.visit) is int
        and type(rec.decisions) is tuple
        and type(rec.created_at) is float
        and type(rec.updated_at) is float
        and type(rec.event_count) is int
        and (rec.lease_owner is None or type(rec.lease_owner) is str)
        and type(rec.lease_token) is int
        and type(rec.lease_expires) is float
        and (rec.control is None or type(rec.control) is str)
        and type(rec.commit_token) is int
        and type(rec.commit_seq) is int
        and type(rec.children) is tuple
        and (not rec.children or all(type(child) is str for child in rec.children))
        and type(rec.version) is str
    )


def check_record(record: RunRecord) -> None:
    """:func:`check_scalars` over every scalar field of ``record``.

    A record whose scalars all have their exact types (every record the engine builds)
    passes without the generic conversion of each field.

    Raises:
        StoreError: names the run and the field.
    """
    if _plain_scalars(record):
        return
    check_scalars(record.run_id, {name: getattr(record, name) for name in _CONVERT})


def check_commit_fields(run_id: str, fields: Mapping[str, Any]) -> None:
    """Refuse commit fields outside ``COMMIT_FIELDS`` and scalars of the wrong type.

    Raises:
        StoreError: an unknown field or a badly typed scalar (names the run and field).
    """
    for name, value in fields.items():
        # The fields of a step's commit, checked inline: this runs once per step.
        if name == "step":
            if type(value) is str:
                continue
        elif name == "visit":
            if type(value) is int:
                continue
        elif name == "state" or name == "output":
            continue
        elif name not in COMMIT_FIELDS:
            raise StoreError(f"run {run_id}: {name!r} cannot be committed; allowed: {sorted(COMMIT_FIELDS)}")
        check_scalars(run_id, {name: value})


def approval_rank(approval: Mapping[str, Any]) -> tuple[float, str]:
    """Where an approval (JSON) sorts in :meth:`Store.approvals`: ``(created_at, id)``."""
    at = approval.get("created_at")
    if isinstance(at, int | float) and not isinstance(at, bool) and at == at:
        return (float(at), str(approval["id"]))
    return (0.0, str(approval["id"]))


def approvers_of(approval: Mapping[str, Any]) -> list[str]:
    """The distinct approvers of an approval (JSON), in order."""
    names = approval.get("approvers")
    if not isinstance(names, list | tuple):
        return []
    return list(dict.fromkeys(n for n in names if isinstance(n, str)))


def deadline_of(pending: Any) -> float | None:
    """The gate deadline (Unix seconds) in a ``pending`` value, or None."""
    if isinstance(pending, BaseModel):
        deadline = getattr(pending, "deadline", None)
    elif isinstance(pending, Mapping):
        deadline = pending.get("deadline")
    else:
        return None
    if isinstance(deadline, int | float) and not isinstance(deadline, bool):
        return float(deadline)
    return None


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def _float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {value!r}")
    return float(value)


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


def _opt_str(value: Any) -> str | None:
    return None if value is None else _str(value)


def _children(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list | tuple):
        raise TypeError(f"expected a list of run ids, got {type(value).__name__}")
    return tuple(_str(child) for child in value)


def _decisions(value: Any) -> tuple[Any, ...]:
    if value is None:
        return ()
    if not isinstance(value, list | tuple):
        raise TypeError(f"expected a list, got {type(value).__name__}")
    return tuple(value)


_CONVERT: dict[str, Callable[[Any], Any]] = {
    "run_id": _str,
    "workflow": _str,
    "status": RunStatus,
    "step": _opt_str,
    "visit": _int,
    "decisions": _decisions,
    "created_at": _float,
    "updated_at": _float,
    "event_count": _int,
    "lease_owner": _opt_str,
    "lease_token": _int,
    "lease_expires": _float,
    "control": _opt_str,
    "commit_token": _int,
    "commit_seq": _int,
    "children": _children,
    "version": _str,
}


def make_record(run_id: str, key: str, values: Mapping[str, Any]) -> RunRecord:
    """Build a RunRecord from decoded field values, checking each field's type.

    Fields missing from ``values`` take the RunRecord default, except the required ones.

    Raises:
        CorruptRecordError: a required field is missing or a field has the wrong type.
    """
    for name in _REQUIRED:
        if name not in values:
            raise CorruptRecordError(run_id, key, f"required field {name!r} is missing")
    kwargs: dict[str, Any] = {}
    for name in RECORD_FIELDS:
        if name not in values:
            continue
        value = values[name]
        convert = _CONVERT.get(name)
        if convert is not None:
            try:
                value = convert(value)
            except (TypeError, ValueError) as exc:
                raise CorruptRecordError(run_id, f"{key}[{name}]", str(exc)) from exc
        kwargs[name] = value
    return RunRecord(**kwargs)


def damaged(columns: Mapping[str, Any], why: str) -> RunRecord:
    """The light record a listing shows for a stored row that cannot be read: its id,
    workflow, status (``failed`` when unreadable too) and creation time, and ``corrupt``."""
    try:
        status = RunStatus(columns["status"])
    except ValueError:
        status = RunStatus.FAILED
    created = columns["created_at"] if isinstance(columns["created_at"], int | float) else 0.0
    return RunRecord(
        run_id=str(columns["run_id"]),
        workflow=str(columns["workflow"]),
        status=status,
        input=None,
        created_at=float(created),
        updated_at=float(created),
        corrupt=why,
    )


def encode_event(run_id: str, event: RunEvent) -> bytes:
    """JSON-encode an event without its ``seq`` (its position in the history gives it)."""
    body = {"kind": event.kind, "step": event.step, "data": event.data, "at": event.at}
    return encode(run_id, f"event {event.kind!r}", body)


def make_event(run_id: str, key: str, raw: str | bytes, seq: int) -> RunEvent:
    """Decode a stored event; ``seq`` is its position in the run's history.

    Raises:
        CorruptRecordError: the event is not JSON or lacks ``kind`` or ``at``.
    """
    data = decode(run_id, key, raw)
    try:
        kind, step, at = _str(data["kind"]), _opt_str(data.get("step")), _float(data["at"])
        return RunEvent(kind=kind, run_id=run_id, step=step, data=data.get("data"), at=at, seq=seq)
    except (KeyError, TypeError, AttributeError) as exc:
        raise CorruptRecordError(run_id, key, f"event {seq} is malformed: {exc!r}") from exc


def encode_output(run_id: str, output: OutputRecord) -> bytes:
    """JSON-encode a step output record."""
    return encode(run_id, f"output of step {output.step!r}", output.to_json())


def make_output(run_id: str, key: str, raw: str | bytes) -> OutputRecord:
    """Decode a stored step output record.

    Raises:
        CorruptRecordError: the output is not JSON or lacks ``visit`` or ``step``.
    """
    data = decode(run_id, key, raw)
    try:
        return OutputRecord(_int(data["visit"]), _str(data["step"]), data.get("value"))
    except (KeyError, TypeError, AttributeError) as exc:
        raise CorruptRecordError(run_id, key, f"step output is malformed: {exc!r}") from exc


# -- credentials (the Credentials capability) -------------------------------------------


def credential_key(key: str) -> str:
    """``key`` if it can name a credential (a non-empty string without NUL).

    Raises:
        StoreError: it cannot.
    """
    if not isinstance(key, str) or not key or "\0" in key:
        raise StoreError(f"a credential key must be a non-empty string without NUL, not {key!r}")
    return key


def encode_credential(key: str, value: Any) -> bytes:
    """The JSON of credential ``value`` (a JSON object).

    Raises:
        StoreError: ``value`` is not a dict, or not JSON-able (names the key).
    """
    credential_key(key)
    if not isinstance(value, dict):
        raise StoreError(
            f"credential {key!r}: the value must be a dict (a JSON object), not {type(value).__name__}"
        )
    try:
        return pydantic_core.to_json(value)
    except (pydantic_core.PydanticSerializationError, TypeError, ValueError) as exc:
        raise StoreError(f"credential {key!r}: cannot store the value: {exc}; store JSON-able data") from exc


def decode_credential(key: str, raw: str | bytes) -> dict[str, Any]:
    """A stored credential's value.

    Raises:
        StoreError: the stored bytes are not a JSON object (names the key).
    """
    try:
        value = pydantic_core.from_json(raw)
    except (ValueError, TypeError) as exc:
        raise StoreError(f"credential {key!r}: the stored value is unreadable: {exc}") from exc
    if not isinstance(value, dict):
        raise StoreError(f"credential {key!r}: the stored value is not a JSON object")
    return value
