"""Lua: the scripts that make each of a Redis run's writes atomic and one round trip.

Every script touches only keys passed in ``KEYS``, and the keys of one call share a
hash tag (see :mod:`agentflow.stores.keys`), so they run on Redis Cluster too. Record
fields are JSON strings, and the scripts only compare and copy them, never parse them:
a lease is checked by comparing the stored ``lease_owner`` and ``lease_token`` JSON
with the caller's, byte for byte. (``event_count`` and ``commit_seq`` are read as
integers, as HINCRBY would.) The commit script reads the fields a step's commit needs
(one HMGET; a second for a commit that files index entries or may expire the run) and
writes the record once (HSET): each ``redis.call`` costs about as much as the work it
does, and a commit's time in Redis is time every other client waits.

Once only: a commit records its ``(lease token, seq)`` in ``commit_token`` and
``commit_seq``; a commit that finds its own pair there (or a later seq of its token)
was applied before, and returns the control flag without writing. Other writers never
touch the pair, so the check holds whatever happened in between. ``create`` leaves its
nonce in ``_created`` for the same reason.

Time: leases and ``updated_at`` come from the server's ``TIME``, one clock for every
machine. (Redis 7 replicates a script's effects, not the script, so reading the clock
in a script that writes is allowed.)
"""

from __future__ import annotations

import hashlib

from ..types import FINAL

__all__ = ["BY_SHA", "COMMIT", "CREATE", "DELETE", "READ", "RENEW", "TAKE", "ZREM_IF_SCORE", "Script"]

_LIB = """
local function hset_range(key, from, to)  -- ARGV[from..to] are field/value pairs
  for i = from, to, 1000 do redis.call('HSET', key, unpack(ARGV, i, math.min(i + 999, to))) end
end
local function push_range(key, from, to)
  for i = from, to, 1000 do redis.call('RPUSH', key, unpack(ARGV, i, math.min(i + 999, to))) end
end
local function integer(value)  -- a stored count, or nil when it is not one
  if not value then return 0 end
  local n = tonumber(value)  -- written as '%d' by every writer, so it must read back the same
  if n and #value <= 15 and string.format('%d', n) == value then return n end
  return nil
end
local function now()
  local t = redis.call('TIME')
  return t[1] .. '.' .. string.sub('00000' .. t[2], -6)
end
-- Tell watchers in other processes (the ``P#changes`` channel) that the run of record key
-- ``rec`` changed. The prefix is what comes before the key's last "#run:".
local function publish(rec)
  redis.call('PUBLISH', string.match(rec, '^(.*)#run:') .. '#changes', rec)
end
local FINAL = {FINAL_JSON}
""".replace("FINAL_JSON", ", ".join(f"['\"{s.value}\"'] = true" for s in sorted(FINAL)))

# KEYS: rec, events, outputs, journal[, queue].  ARGV: nonce, ttl_ms, n_fields, field pairs,
# events[, run id]. With a queue (a stream: one server only, as it has a hash tag of its
# own), the new run is queued there too, an entry ``run=<id>``; a retry queues nothing.
# Returns 1 when created (now, or by this nonce before), 0 when the id is taken.
_CREATE = (
    _LIB
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then
  if redis.call('HGET', KEYS[1], '_created') == ARGV[1] then return 1 end
  return 0
end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
local n = tonumber(ARGV[3])
hset_range(KEYS[1], 4, 3 + 2 * n)
redis.call('HSET', KEYS[1], '_created', ARGV[1])
local last = #ARGV
if KEYS[5] then last = last - 1 end
push_range(KEYS[2], 4 + 2 * n, last)
local ttl = tonumber(ARGV[2])
if ttl > 0 then for i = 1, 4 do redis.call('PEXPIRE', KEYS[i], ttl) end end
publish(KEYS[1])
if KEYS[5] then redis.call('XADD', KEYS[5], '*', 'run', ARGV[#ARGV]) end
return 1
"""
)

# KEYS: rec, events, outputs, journal.
# ARGV: owner, token, seq, release, ttl_ms, version, workflow, created_at, n_fields,
#       n_events, n_outputs, n_journal, then field pairs, events, outputs, journal pairs.
# ``version`` ('' for none) becomes ``_ix`` (the commit sets the status); ``workflow`` and
# ``created_at`` (JSON, or '' when no index entry is written) are what the caller filed
# the index entries under, checked against the record.
# Returns, once applied: {3, control, old status, old _ix} when the commit set the status,
# else {3, control} with a control flag set, else 3. {2, control, _ix} when this commit was
# applied before; {1} for a stale lease; {0} when the run no longer exists; {4,
# workflow, created_at} (nothing written) when the index entries were filed wrongly.
_COMMIT = (
    _LIB
    + """
local rec = KEYS[1]
local cur = redis.call('HMGET', rec, 'lease_owner', 'lease_token', 'commit_token', 'commit_seq',
  'event_count', 'control')
if not cur[1] then return {0} end
local ttl = tonumber(ARGV[5])
-- The rest of the record is read only when the commit needs it: a commit that leaves the
-- status alone and files nothing, in a store without a ttl, does not.
local status, ix, workflow, created = false, false, false, false
if ARGV[6] ~= '' or ARGV[7] ~= '' or ARGV[8] ~= '' or ttl > 0 then
  local more = redis.call('HMGET', rec, 'status', '_ix', 'workflow', 'created_at')
  status, ix, workflow, created = more[1], more[2], more[3], more[4]
end
local seq = tonumber(ARGV[3])
if seq > 0 and cur[3] == ARGV[2] then
  local done = integer(cur[4])
  if not done then return redis.error_reply('ERR hash value is not an integer') end
  if done >= seq then return {2, cur[6] or '', ix or ''} end
end
if cur[1] ~= ARGV[1] or cur[2] ~= ARGV[2] then return {1} end
if (ARGV[7] ~= '' and workflow ~= ARGV[7]) or (ARGV[8] ~= '' and created ~= ARGV[8]) then
  return {4, workflow or '', created or ''}
end
local nf, ne, no, nj = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11]), tonumber(ARGV[12])
-- Checked before anything is written, as HINCRBY would: a damaged count changes nothing.
local count = integer(cur[5])
if not count then return redis.error_reply('ERR hash value is not an integer') end
local control, was, moved, tell = cur[6], status, false, false
local h = {'event_count', string.format('%d', count + ne), 'updated_at', now()}
local n = 4
if seq > 0 then
  h[5], h[6], h[7], h[8], n = 'commit_token', ARGV[2], 'commit_seq', ARGV[3], 8
end
if ARGV[6] ~= '' then h[n + 1], h[n + 2], n = '_ix', ARGV[6], n + 2 end
for i = 13, 12 + 2 * nf, 2 do
  local name, value = ARGV[i], ARGV[i + 1]
  if name == 'control' then control, tell = value, true
  elseif name == 'status' then status, moved, tell = value, true, true
  elseif name == 'pending' then tell = true end
  h[n + 1], h[n + 2], n = name, value, n + 2
end
if ARGV[4] == '1' then
  h[n + 1], h[n + 2], h[n + 3], h[n + 4] = 'lease_owner', 'null', 'lease_expires', '0.0'
end
redis.call('HSET', rec, unpack(h))
-- Watchers are told of a new status, pending approvals or control flag; a step that only
-- moves the run on is not published (followers of its events look every 100 ms).
if tell then publish(rec) end
local i = 13 + 2 * nf
push_range(KEYS[2], i, i + ne - 1)
i = i + ne
push_range(KEYS[3], i, i + no - 1)
i = i + no
hset_range(KEYS[4], i, i + 2 * nj - 1)
if ttl > 0 and FINAL[status] then
  for _, k in ipairs(KEYS) do redis.call('PEXPIRE', k, ttl) end
elseif moved then  -- back from a final status (a retried run): it must not expire
  for _, k in ipairs(KEYS) do redis.call('PERSIST', k) end
end
if moved then return {3, control or '', was or '', ix or ''} end
if control and control ~= 'null' then return {3, control} end
return 3  -- the common reply, kept small: parsing replies is much of a commit's client time
"""
)

# KEYS: rec.  ARGV: owner, token, ttl (seconds).  The lease runs out ``ttl`` seconds past
# the server's now.  Returns the control flag (JSON, '' if unset), or 0 / 1 like _COMMIT.
_RENEW = (
    _LIB
    + """
local cur = redis.call('HMGET', KEYS[1], 'lease_owner', 'lease_token', 'control')
if not cur[1] then return 0 end
if cur[1] ~= ARGV[1] or cur[2] ~= ARGV[2] then return 1 end
local t = redis.call('TIME')
local expires = tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[3])
redis.call('HSET', KEYS[1], 'lease_expires', string.format('%.6f', expires))
return cur[3] or ''
"""
)

# KEYS: rec, outputs, journal.  ARGV: workflow, owner (JSON), ttl (seconds), nonce.  A worker
# taking a run handed over to it: when the run is running, of that workflow, with no owner
# (and filed in the indexes), its lease goes to ``owner`` (the next token, ``ttl`` seconds
# past the server's now) and the nonce is left in ``_write``. Returns {record, outputs,
# journal} as read after (also when ``_write`` holds the nonce: a retry after a lost
# reply), 0 when the run is not one to take so (the caller's general update decides).
_TAKE = (
    _LIB
    + """
local cur = redis.call('HMGET', KEYS[1], 'status', 'workflow', 'lease_owner', 'lease_token', '_ix', '_write')
if cur[6] ~= ARGV[4] then
  if cur[1] ~= '"running"' or cur[2] ~= ARGV[1] or cur[3] ~= 'null' or not cur[5] then return 0 end
  local token = integer(cur[4])
  if not token then return 0 end
  local t = redis.call('TIME')
  local expires = tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[3])
  redis.call('HSET', KEYS[1], 'lease_owner', ARGV[2], 'lease_token', string.format('%d', token + 1),
    'lease_expires', string.format('%.6f', expires), 'updated_at', now(), '_write', ARGV[4])
end
return {redis.call('HGETALL', KEYS[1]), redis.call('LRANGE', KEYS[2], 0, -1), redis.call('HGETALL', KEYS[3])}
"""
)

# KEYS: rec, events, outputs, journal.  ARGV: nonce, and optionally the ``_created`` nonce
# the run must hold (a create undoing itself).  Returns {1, workflow, status, _ix,
# pending} (JSON, '' when unreadable) when it deleted the run, {0} when there was no such
# run (or it was not created by that nonce).
_DELETE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {0} end
if ARGV[2] and redis.call('HGET', KEYS[1], '_created') ~= ARGV[2] then return {0} end
local found = redis.pcall('HMGET', KEYS[1], 'workflow', 'status', '_ix', 'pending')
if found.err then found = {} end  -- not a hash: deleted all the same
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
return {1, found[1] or '', found[2] or '', found[3] or '', found[4] or ''}
"""

# KEYS: rec.  ARGV: field names.  Reads a record for a listing in one reply: {_ix, the
# fields as one JSON array (null where missing), a '1'/'0' per field: present or not};
# 0 when there is no such record. (One bulk string instead of one per field: parsing
# replies is most of a listing's client time.)
_READ = """
local values = redis.call('HMGET', KEYS[1], '_ix', unpack(ARGV))
local parts, flags, found = {}, {}, values[1] ~= false
for i = 2, #values do
  if values[i] then parts[i - 1], flags[i - 1], found = values[i], '1', true
  else parts[i - 1], flags[i - 1] = 'null', '0' end
end
if not found then return 0 end
return {values[1] or '', '[' .. table.concat(parts, ',') .. ']', table.concat(flags)}
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
TAKE = Script(_TAKE)
DELETE = Script(_DELETE)
READ = Script(_READ)
ZREM_IF_SCORE = Script(_ZREM_IF_SCORE)

#: Every script by its SHA1, for loading one whose call came back NOSCRIPT.
BY_SHA = {s.sha_bytes: s for s in (CREATE, COMMIT, RENEW, TAKE, DELETE, READ, ZREM_IF_SCORE)}
