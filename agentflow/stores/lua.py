"""Lua: the scripts that make each of a Redis run's writes atomic and one round trip.

Every script touches only keys passed in ``KEYS``, and the keys of one call share a
hash tag (see :mod:`agentflow.stores.keys`), so they run on Redis Cluster too. Record
fields are JSON strings, and the scripts only compare and copy them, never parse them:
a lease is checked by comparing the stored ``lease_owner`` and ``lease_token`` JSON
with the caller's, byte for byte.

Each write carries a nonce, stored in the record's ``_commit`` field; a script that
finds its own nonce already there returns as if it had just applied, which makes a
retry after a lost reply safe.
"""

from __future__ import annotations

import hashlib

from ..records import FINAL

__all__ = ["COMMIT", "CREATE", "DELETE", "RENEW", "ZREM_IF_SCORE", "Script"]

_LIB = """
local function hset_range(key, from, to)  -- ARGV[from..to] are field/value pairs
  for i = from, to, 1000 do redis.call('HSET', key, unpack(ARGV, i, math.min(i + 999, to))) end
end
local function push_range(key, from, to)
  for i = from, to, 1000 do redis.call('RPUSH', key, unpack(ARGV, i, math.min(i + 999, to))) end
end
local FINAL = {FINAL_JSON}
""".replace("FINAL_JSON", ", ".join(f"['\"{s.value}\"'] = true" for s in sorted(FINAL)))

# KEYS: rec, events, outputs, journal.  ARGV: nonce, ttl_ms, n_fields, field pairs, events.
_CREATE = (
    _LIB
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then
  if redis.call('HGET', KEYS[1], '_commit') == ARGV[1] then return 1 end
  return 0
end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
local n = tonumber(ARGV[3])
hset_range(KEYS[1], 4, 3 + 2 * n)
redis.call('HSET', KEYS[1], '_commit', ARGV[1])
push_range(KEYS[2], 4 + 2 * n, #ARGV)
local ttl = tonumber(ARGV[2])
if ttl > 0 then for _, k in ipairs(KEYS) do redis.call('PEXPIRE', k, ttl) end end
return 1
"""
)

# KEYS: rec, events, outputs, journal.
# ARGV: nonce, owner, token, release, ttl_ms, updated_at, n_fields, n_events, n_outputs,
#       n_journal, then field pairs, events, outputs, journal pairs.
_COMMIT = (
    _LIB
    + """
local rec = KEYS[1]
if redis.call('HGET', rec, '_commit') == ARGV[1] then
  return {1, redis.call('HGET', rec, 'control')}
end
local owner = redis.call('HGET', rec, 'lease_owner')
if not owner then return {0, 'the run no longer exists'} end
if owner ~= ARGV[2] or redis.call('HGET', rec, 'lease_token') ~= ARGV[3] then return {0, 'stale'} end
local nf, ne, no, nj = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
-- The first write: on a damaged count it fails before anything has changed.
redis.call('HINCRBY', rec, 'event_count', ne)
local i = 11
hset_range(rec, i, i + 2 * nf - 1)
i = i + 2 * nf
redis.call('HSET', rec, 'updated_at', ARGV[6], '_commit', ARGV[1])
if ARGV[4] == '1' then redis.call('HSET', rec, 'lease_owner', 'null', 'lease_expires', '0.0') end
push_range(KEYS[2], i, i + ne - 1)
i = i + ne
push_range(KEYS[3], i, i + no - 1)
i = i + no
hset_range(KEYS[4], i, i + 2 * nj - 1)
local ttl = tonumber(ARGV[5])
if ttl > 0 and FINAL[redis.call('HGET', rec, 'status')] then
  for _, k in ipairs(KEYS) do redis.call('PEXPIRE', k, ttl) end
end
return {1, redis.call('HGET', rec, 'control')}
"""
)

# KEYS: rec.  ARGV: owner, token, lease_expires.
_RENEW = """
local owner = redis.call('HGET', KEYS[1], 'lease_owner')
if not owner then return {0, 'the run no longer exists'} end
if owner ~= ARGV[1] or redis.call('HGET', KEYS[1], 'lease_token') ~= ARGV[2] then return {0, 'stale'} end
redis.call('HSET', KEYS[1], 'lease_expires', ARGV[3])
return {1, redis.call('HGET', KEYS[1], 'control')}
"""

# KEYS: rec, events, outputs, journal.  Returns {workflow, created_at} (JSON) or nil.
_DELETE = """
local found = redis.call('HMGET', KEYS[1], 'workflow', 'created_at')
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
if not found[1] then return nil end
return found
"""

# KEYS: an index zset.  ARGV: member, score.  Drops a stale index entry unless someone
# re-added it meanwhile (a re-add carries a new score).
_ZREM_IF_SCORE = """
local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
if s and tonumber(s) == tonumber(ARGV[2]) then return redis.call('ZREM', KEYS[1], ARGV[1]) end
return 0
"""


class Script:
    """A Lua script run by its SHA1 (EVALSHA), loaded on the first NOSCRIPT reply."""

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


# Each script's source is what the store sends on its first NOSCRIPT reply.
CREATE = Script(_CREATE)
COMMIT = Script(_COMMIT)
RENEW = Script(_RENEW)
DELETE = Script(_DELETE)
ZREM_IF_SCORE = Script(_ZREM_IF_SCORE)
