"""Lua: the scripts that make each of a Redis run's writes atomic and one round trip.

Every script touches only keys passed in ``KEYS``, and the keys of one call share a
hash tag (see :mod:`agentflow.stores.keys`), so they run on Redis Cluster too. Record
fields are JSON strings, and the scripts only compare and copy them, never parse them:
a lease is checked by comparing the stored ``lease_owner`` and ``lease_token`` JSON
with the caller's, byte for byte. (``event_count`` is read as an integer, as HINCRBY
would.) The commit script reads the record once (HMGET) and writes it once (HSET):
each ``redis.call`` costs about as much as the work it does.

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
# Returns the run's control flag (its JSON, '' if unset) once the commit applied, 0 when
# the run no longer exists, 1 when the lease is stale. One read (HMGET) and one HSET for
# the record, whatever the commit holds: a script's calls are most of its time.
_COMMIT = (
    _LIB
    + """
local rec = KEYS[1]
local cur = redis.call('HMGET', rec, '_commit', 'lease_owner', 'lease_token', 'event_count', 'control',
  'status')
if cur[1] == ARGV[1] then return cur[5] or '' end
if not cur[2] then return 0 end
if cur[2] ~= ARGV[2] or cur[3] ~= ARGV[3] then return 1 end
local nf, ne, no, nj = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
-- Checked before anything is written, as HINCRBY would: a damaged count changes nothing.
local count = cur[4] or '0'
if #count > 15 or not string.match(count, '^%-?%d+$') then
  return redis.error_reply('ERR hash value is not an integer')
end
local control, status = cur[5], cur[6]
count = string.format('%d', tonumber(count) + ne)  -- exact: below 2^53
local h = {'event_count', count, 'updated_at', ARGV[6], '_commit', ARGV[1]}
local n = 6
for i = 11, 10 + 2 * nf, 2 do
  local name, value = ARGV[i], ARGV[i + 1]
  if name == 'control' then control = value elseif name == 'status' then status = value end
  h[n + 1], h[n + 2], n = name, value, n + 2
end
if ARGV[4] == '1' then
  h[n + 1], h[n + 2], h[n + 3], h[n + 4] = 'lease_owner', 'null', 'lease_expires', '0.0'
end
redis.call('HSET', rec, unpack(h))
local i = 11 + 2 * nf
push_range(KEYS[2], i, i + ne - 1)
i = i + ne
push_range(KEYS[3], i, i + no - 1)
i = i + no
hset_range(KEYS[4], i, i + 2 * nj - 1)
local ttl = tonumber(ARGV[5])
if ttl > 0 and FINAL[status] then
  for _, k in ipairs(KEYS) do redis.call('PEXPIRE', k, ttl) end
end
return control or ''
"""
)

# KEYS: rec.  ARGV: owner, token, lease_expires.  Returns like _COMMIT.
_RENEW = """
local cur = redis.call('HMGET', KEYS[1], 'lease_owner', 'lease_token', 'control')
if not cur[1] then return 0 end
if cur[1] ~= ARGV[1] or cur[2] ~= ARGV[2] then return 1 end
redis.call('HSET', KEYS[1], 'lease_expires', ARGV[3])
return cur[3] or ''
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

    __slots__ = ("sha", "sha_bytes", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()
        self.sha_bytes = self.sha.encode()


# Each script's source is what the store sends on its first NOSCRIPT reply.
CREATE = Script(_CREATE)
COMMIT = Script(_COMMIT)
RENEW = Script(_RENEW)
DELETE = Script(_DELETE)
ZREM_IF_SCORE = Script(_ZREM_IF_SCORE)
