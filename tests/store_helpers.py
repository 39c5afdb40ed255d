"""Builders shared by the store tests; they live with the conformance suite, in the package."""

from __future__ import annotations

from agentflow.testing.store_conformance import (
    BuildOutput,
    State,
    acquire,
    as_json,
    event,
    expire,
    record,
    same_record,
    started,
    store_now,
)

js = as_json

__all__ = [
    "BuildOutput",
    "State",
    "acquire",
    "as_json",
    "event",
    "expire",
    "js",
    "record",
    "same_record",
    "started",
    "store_now",
]
