"""The Redis store's rate limits: a sliding window per limit, judged by the Redis server's clock.

Three keys per limit (built in :func:`agentflow.stores.keys.limit_keys`), sharing the
hash tag of the limit's (escaped) name, so every script names one slot and runs on
Redis Cluster::

    P#limit:{<key>}:calls   ZSET   the window's calls: ticket, scored by when it went
    P#limit:{<key>}:tokens  HASH   ticket -> tokens (reserved, then the real usage);
                                   kept only for a limit with tokens_per_minute
    P#limit:{<key>}:slots   ZSET   concurrency slots held: ticket, scored by expiry

One script per turn (:data:`ACQUIRE`) reads ``TIME``, drops what left the window,
judges the call as :func:`agentflow.stores.limits.verdict` does and, granted, counts
it; so processes on machines whose clocks disagree share one window, the Redis
server's. Every write sets the keys to expire a little after the last call could
still count, so a limit nobody uses any more leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

from redis import exceptions as redis_errors

from ..errors import StoreError
from .capabilities import Quota
from .keys import limit_keys
from .limits import SLOT_POLL

__all__ = ["ACQUIRE", "Quota", "RELEASE", "RENEW", "acquire", "release", "renew"]

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function f(x) return string.format('%.6f', x) end
"""

# KEYS: calls, tokens, slots. ARGV: ticket, requests, tokens cap, concurrent (0: none),
# window, hold, this call's tokens, ttl ms, slot poll. Returns {wait, limit}; '0' granted.
ACQUIRE = (
    _NOW
    + """
local ticket = ARGV[1]
local requests, cap, concurrent = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local window, hold, tokens = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local ttl, poll = tonumber(ARGV[8]), ARGV[9]
local old = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', f(now - window))
if #old > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', f(now - window))
  for i = 1, #old, 1000 do
    redis.call('HDEL', KEYS[2], unpack(old, i, math.min(i + 999, #old)))
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', f(now))
if redis.call('ZSCORE', KEYS[1], ticket) or redis.call('ZSCORE', KEYS[3], ticket) then
  return {'0', ''}
end
local best, why = -1, ''
if requests > 0 then
  local n = redis.call('ZCARD', KEYS[1])
  if n >= requests then
    local e = redis.call('ZRANGE', KEYS[1], n - requests, n - requests, 'WITHSCORES')
    local w = tonumber(e[2]) + window - now
    if w > best then best, why = w, 'requests_per_minute' end
  end
end
if cap > 0 then
  local calls = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
  if #calls > 0 then
    local ids, ats, spent = {}, {}, {}
    for i = 1, #calls, 2 do
      ids[#ids + 1] = calls[i]
      ats[#ats + 1] = tonumber(calls[i + 1])
    end
    for i = 1, #ids, 1000 do
      local part = redis.call('HMGET', KEYS[2], unpack(ids, i, math.min(i + 999, #ids)))
      for j = 1, #part do spent[#spent + 1] = tonumber(part[j]) or 0 end
    end
    local used = 0
    for i = 1, #spent do used = used + spent[i] end
    if used + tokens > cap then
      local at = ats[#ats]
      for i = 1, #spent do
        used = used - spent[i]
        if used + tokens <= cap then
          at = ats[i]
          break
        end
      end
      local w = at + window - now
      if w > best then best, why = w, 'tokens_per_minute' end
    end
  end
end
if concurrent > 0 and redis.call('ZCARD', KEYS[3]) >= concurrent then
  if tonumber(poll) > best then best, why = tonumber(poll), 'concurrent' end
end
if why ~= '' then
  return {tostring(math.max(best, 0.001)), why}
end
redis.call('ZADD', KEYS[1], f(now), ticket)
if cap > 0 then redis.call('HSET', KEYS[2], ticket, tokens) end
if concurrent > 0 then redis.call('ZADD', KEYS[3], f(now + hold), ticket) end
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ttl) end
return {'0', ''}
"""
)

# KEYS: as ACQUIRE's. ARGV: ticket, hold, ttl ms.
RENEW = (
    _NOW
    + """
if redis.call('ZSCORE', KEYS[3], ARGV[1]) then
  redis.call('ZADD', KEYS[3], 'XX', f(now + tonumber(ARGV[2])), ARGV[1])
  redis.call('PEXPIRE', KEYS[3], ARGV[3])
end
return 0
"""
)

# KEYS: as ACQUIRE's. ARGV: ticket, tokens ('' keeps the reservation).
RELEASE = """
redis.call('ZREM', KEYS[3], ARGV[1])
if ARGV[2] ~= '' and redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
end
return 0
"""

_SHA = {script: hashlib.sha1(script.encode()).hexdigest() for script in (ACQUIRE, RENEW, RELEASE)}


def _ttl_ms(quota: Quota) -> int:
    return math.ceil((quota.window + quota.hold) * 1000) + 1000


async def _run(client: Any, script: str, keys: list[str], args: list[Any], what: str) -> Any:
    try:
        try:
            return await client.evalsha(_SHA[script], len(keys), *keys, *args)
        except redis_errors.NoScriptError:
            return await client.eval(script, len(keys), *keys, *args)
    except redis_errors.ResponseError as exc:
        raise StoreError(f"Redis refused {what}: {exc}") from exc
    except (redis_errors.RedisError, OSError) as exc:
        raise StoreError(f"Redis {what} failed: {exc}") from exc


def _n(value: int | None) -> int:
    return 0 if value is None else value


async def acquire(
    client: Any, prefix: str, key: str, ticket: str, quota: Quota, tokens: int
) -> tuple[float, str | None]:
    """:meth:`~agentflow.stores.capabilities.RateLimits.acquire_limit` in one script."""
    args = [
        ticket,
        _n(quota.requests),
        _n(quota.tokens),
        _n(quota.concurrent),
        repr(float(quota.window)),
        repr(float(quota.hold)),
        max(0, tokens),
        _ttl_ms(quota),
        repr(SLOT_POLL),
    ]
    reply = await _run(client, ACQUIRE, limit_keys(prefix, key), args, f"a turn of rate limit {key!r}")
    wait, limit = (v.decode() if isinstance(v, bytes) else str(v) for v in reply)
    return (0.0, None) if wait == "0" else (float(wait), limit or None)


async def renew(client: Any, prefix: str, key: str, ticket: str, quota: Quota) -> None:
    """:meth:`~agentflow.stores.capabilities.RateLimits.renew_limit`."""
    args = [ticket, repr(float(quota.hold)), _ttl_ms(quota)]
    await _run(client, RENEW, limit_keys(prefix, key), args, f"renewing a slot of rate limit {key!r}")


async def release(client: Any, prefix: str, key: str, ticket: str, tokens: int | None) -> None:
    """:meth:`~agentflow.stores.capabilities.RateLimits.release_limit`."""
    args = [ticket, "" if tokens is None else max(0, tokens)]
    await _run(client, RELEASE, limit_keys(prefix, key), args, f"releasing a turn of rate limit {key!r}")
