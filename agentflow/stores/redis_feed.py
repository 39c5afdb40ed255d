"""The Redis store's change feed: a write that creates a run, or changes its status,
pending approvals or control flag, publishes its record key on ``P#changes`` (inside the
write's own script or transaction: no round trip of its own); a step that only moves a
run on does not. A process whose watchers follow runs advanced elsewhere subscribes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import SSLConnection

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
    if isinstance(client, RedisCluster):
        # A plain PUBLISH reaches every node of a cluster: one node's connection hears all.
        node = client.get_random_node()
        own = Redis(host=node.host, port=int(node.port), socket_timeout=None, **_options(node))
    else:  # a connection of its own, outside the store's pool (it is held for as long as it listens)
        pool = client.connection_pool
        kwargs = {k: v for k, v in pool.connection_kwargs.items() if k in _CONNECTION}
        if "path" in kwargs:  # a unix socket
            kwargs["unix_socket_path"] = kwargs.pop("path")
        if issubclass(pool.connection_class, SSLConnection):
            kwargs["ssl"] = True
        own = Redis(**kwargs, socket_timeout=None)  # it waits on messages: no read timeout
    pubsub = own.pubsub()
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
        try:  # bounded: a read cut by a cancellation must not hold the close up
            async with asyncio.timeout(2.0):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
                await own.aclose()
        except (redis_errors.RedisError, OSError, TimeoutError):
            pass


#: What a listening connection takes over from the store's connections.
_CONNECTION = (
    "host",
    "port",
    "path",
    "username",
    "password",
    "client_name",
    "socket_connect_timeout",
    "ssl_keyfile",
    "ssl_certfile",
    "ssl_cert_reqs",
    "ssl_ca_certs",
    "ssl_check_hostname",
)


def _options(node: Any) -> dict[str, Any]:
    """The connection options (password, TLS...) a cluster node's connections use."""
    kwargs = dict(getattr(node, "connection_kwargs", {}) or {})
    keep = ("username", "password", "ssl", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs")
    return {k: kwargs[k] for k in keep if k in kwargs}
