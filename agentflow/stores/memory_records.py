"""The memory store's stored form of a run: a :class:`Run` of JSON bytes, and the
helpers that put values in and take them out.

Callers rely on two things: every value is encoded to JSON when it comes in (what is
not JSON-able raises :class:`~agentflow.errors.StoreError` before anything is written),
and every value read out is decoded afresh, so no caller can change a stored value in
place. Events without data and outputs without a mutable value are kept as they are,
skipping the encoder (their parts are immutable JSON already).
"""

from __future__ import annotations

import operator
from collections.abc import Collection
from typing import Any

from ..types import RunEvent, RunStatus
from .codec import (
    JSON_FIELDS,
    RECORD_FIELDS,
    check_record,
    decode,
    encode,
    encode_event,
    encode_output,
    make_event,
    make_output,
)
from .contract import OutputRecord, RunRecord
from .memory_index import SortKey

__all__ = [
    "INF",
    "NULL",
    "Event",
    "Output",
    "Run",
    "encode_record",
    "read_event",
    "read_output",
    "record_of",
    "store_event",
    "store_output",
]

# What a listed (light) record leaves out. (Record fields in codec.JSON_FIELDS are kept
# as JSON bytes; the others are scalars kept as they are.)
_HEAVY = frozenset({"input", "state", "output"})
_LIGHT_JSON = tuple(name for name in RECORD_FIELDS if name in JSON_FIELDS and name not in _HEAVY)
NULL = b"null"

INF = float("inf")

# A stored event: its JSON, or the event itself when it carries no data (its str and
# float parts are immutable JSON as they are).
Event = bytes | RunEvent
# A stored step output: its JSON, or the record itself when it holds no mutable value.
Output = bytes | OutputRecord


def store_event(run_id: str, event: RunEvent) -> Event:
    # Most events carry no data and skip the encoder (a step commits two); NaN fails
    # the range check, as it would not read back from JSON.
    step, at = event.step, event.at
    if (
        event.data is None
        and type(event.kind) is str
        and (step is None or type(step) is str)
        and type(at) is float
        and -INF < at < INF
        and type(event) is RunEvent
    ):
        return event
    return encode_event(run_id, event)


def read_event(run_id: str, i: int, stored: Event) -> RunEvent:
    if isinstance(stored, bytes):
        return make_event(run_id, f"events[{i}]", stored, i + 1)
    if stored.seq == i + 1 and stored.run_id == run_id:
        return stored
    return RunEvent(stored.kind, run_id, stored.step, None, stored.at, i + 1)


def store_output(run_id: str, output: OutputRecord) -> Output:
    value = output.value
    if (
        (value is None or type(value) is str)
        and type(output.visit) is int
        and type(output.step) is str
        and type(output) is OutputRecord
    ):
        return output
    return encode_output(run_id, output)


def read_output(run_id: str, i: int, stored: Output) -> OutputRecord:
    if isinstance(stored, OutputRecord):
        return stored
    return make_output(run_id, f"outputs[{i}]", stored)


class Run:
    """A run's stored parts, every value as JSON bytes (the record's scalars as they are)."""

    __slots__ = ("approvals", "deadline", "events", "expires", "fields", "journal", "outputs")

    def __init__(self, fields: dict[str, Any], events: list[Event]) -> None:
        self.fields = fields
        self.events = events
        self.outputs: list[Output] = []
        self.journal: dict[str, bytes] = {}
        self.deadline: float | None = None
        self.expires: float | None = None
        self.approvals: tuple[str, ...] = ()  # ids of its approvals in the store's lists

    @property
    def sort_key(self) -> SortKey:
        return (self.fields["created_at"], self.fields["run_id"])


_ALL_FIELDS = operator.attrgetter(*RECORD_FIELDS)
_JSON_NAMES = tuple(name for name in RECORD_FIELDS if name in JSON_FIELDS)
_LISTS = frozenset({"decisions", "children"})


def encode_record(rec: RunRecord) -> dict[str, Any]:
    """Every field of ``rec`` in its stored form, checked; raises StoreError before any write."""
    check_record(rec)
    run_id = rec.run_id
    fields: dict[str, Any] = dict(zip(RECORD_FIELDS, _ALL_FIELDS(rec), strict=True))
    for name in _JSON_NAMES:
        value = fields[name]
        if value is None:
            fields[name] = NULL
        elif name in _LISTS:
            fields[name] = encode(run_id, name, list(value)) if value else b"[]"
        else:
            fields[name] = encode(run_id, name, value)
    if type(fields["status"]) is not RunStatus:
        fields["status"] = RunStatus(fields["status"])
    if not (
        type(fields["created_at"]) is float
        and type(fields["updated_at"]) is float
        and type(fields["lease_expires"]) is float
    ):
        for name in ("created_at", "updated_at", "lease_expires"):
            fields[name] = float(fields[name])
    return fields


def record_of(run: Run, light: bool = False) -> RunRecord:
    """The run's record, every value decoded afresh; ``light`` leaves out input, state and output."""
    fields = run.fields
    values = dict(fields)
    if light:
        values["input"] = values["state"] = values["output"] = None
        names: Collection[str] = _LIGHT_JSON
    else:
        names = JSON_FIELDS
    run_id = fields["run_id"]
    for name in names:
        raw = fields[name]
        values[name] = None if raw == NULL else decode(run_id, name, raw)
    values["decisions"] = tuple(values["decisions"] or ())
    values["children"] = tuple(values["children"] or ())
    return RunRecord(**values)
