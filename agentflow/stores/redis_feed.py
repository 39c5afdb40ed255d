"""The Redis store's change feed: every write of a run publishes its record key on
``P#changes`` (inside the write's own script or transaction: no round trip of its own),
and a process whose watchers follow runs advanced elsewhere subscribes to it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

from redis import exceptions as redis_errors

from ..errors import StoreError

__all__ = ["follow", "run_of"]


def run_of(rec_key: bytes | str) -> str | None:
    """The run id of a record key ``P#run:{<escaped id>}:rec``, or None for another key."""
    key = rec_key.decode() if isinstance(rec_key, bytes) else rec_key
    start = key.rfind("#run:{")
    if start < 0 or not key.endswith("}:rec"):
        return None
    return unquote(key[start + 6 : -5])


async def follow(client: Any, channel: str, changed: Callable[[str], None]) -> None:
    """Call ``changed(run_id)`` for each write published on ``channel`` until cancelled.

    Raises:
        StoreError: the subscription was cut (the caller subscribes again).
    """
    pubsub = client.pubsub()
    try:
        await pubsub.subscribe(channel)
        async for message in pubsub.listen():
            if message.get("type") == "message":
                run_id = run_of(message["data"])
                if run_id is not None:
                    changed(run_id)
    except (redis_errors.RedisError, OSError) as exc:
        raise StoreError(f"the Redis change feed on {channel!r} was cut: {exc}") from exc
    finally:
        try:
            await pubsub.aclose()
        except (redis_errors.RedisError, OSError):
            pass
