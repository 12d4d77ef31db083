"""The versioned Lua scripts behind shared limits (one round trip per request).

All keys of one call share the user's hash tag (``{u:<user>}``) so the
scripts run unchanged on a Redis Cluster.  The version is part of every key
name (``<prefix>:v1:...``): a rolling deploy that changes a script's data
layout bumps it, and old and new workers then keep separate counters instead
of misreading each other's.

Time comes from Redis (``TIME``), so every worker on every host agrees on it.

Counter kinds, one key per (kind, scope):

- ``r`` requests: ZSET of request ids scored by arrival ms; a rolling minute.
- ``t`` tokens: HASH unix-second -> tokens reserved in that second; the
  last 60 seconds count.
- ``c`` concurrency: ZSET of request ids scored by lease expiry ms; a lease
  that is neither renewed nor released expires by itself.
- ``b`` budget: HASH ``v`` = micro-dollars spent + reserved, ``g`` = the
  generation written when the counter was (re)built.  A missing budget
  counter is never treated as zero: the caller rebuilds it from the ledger.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

VERSION = "v1"


@dataclass(frozen=True, slots=True)
class Script:
    name: str
    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        # Redis names scripts by SHA-1 (EVALSHA).
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())  # noqa: S324


# KEYS[i]: one counter per check.  ARGV: member, tokens, cost, lease_ms, then
# per check i: ARGV[3+2i] kind, ARGV[4+2i] limit.
# Returns {1, sec, 0, 0, used_1, reset_1, ..., gen_1, ...} (admitted; used counts
# this request; one gen per budget check), {0, sec, failed_i, retry_ms, used_1,
# reset_1, ...} (rejected, nothing reserved) or {-1, sec, 0, 0} (a budget
# counter is missing: rebuild it first, nothing reserved).
ADMIT = Script(
    f"gw_admit_{VERSION}",
    r"""
local t = redis.call('TIME')
local sec = tonumber(t[1])
local now = sec * 1000 + math.floor(tonumber(t[2]) / 1000)
local member = ARGV[1]
local tokens = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local lease = tonumber(ARGV[4])
local n = #KEYS
local used, reset = {}, {}
local failed, retry, budget_failed = 0, 0, false
for i = 1, n do
  local kind, limit, key = ARGV[3 + 2 * i], tonumber(ARGV[4 + 2 * i]), KEYS[i]
  local u, r, over = 0, 0, false
  if kind == 'r' then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now - 60000)
    u = redis.call('ZCARD', key)
    if u > 0 then
      r = tonumber(redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')[2]) + 60000 - now
    end
    if u + 1 > limit then
      over = true
      -- one more fits once the (u - limit + 1)-th oldest request left the window
      local e = redis.call('ZRANGE', key, u - limit, u - limit, 'WITHSCORES')
      local w = tonumber(e[2]) + 60000 - now
      if w > retry then retry = w end
    end
  elseif kind == 't' then
    local h = redis.call('HGETALL', key)
    local live = {}
    for j = 1, #h, 2 do
      local s = tonumber(h[j])
      if s <= sec - 60 then
        redis.call('HDEL', key, h[j])
      else
        local v = tonumber(h[j + 1])
        u = u + v
        live[#live + 1] = {s, v}
      end
    end
    table.sort(live, function(a, b) return a[1] < b[1] end)
    if #live > 0 then r = (live[1][1] + 60) * 1000 - now end
    if u + tokens > limit then
      over = true
      local left, w = u, 60000
      for j = 1, #live do
        left = left - live[j][2]
        if left + tokens <= limit then
          w = (live[j][1] + 60) * 1000 - now
          break
        end
      end
      if w > retry then retry = w end
    end
  elseif kind == 'c' then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    u = redis.call('ZCARD', key)
    if u + 1 > limit then over = true end
  else
    local v = redis.call('HGET', key, 'v')
    if not v then return {-1, sec, 0, 0} end
    u = tonumber(v)
    if u + cost > limit then
      over = true
      if not budget_failed then failed = i end
      budget_failed = true
    end
  end
  used[i], reset[i] = u, r
  if over and failed == 0 then failed = i end
end
local out = {1, sec, 0, 0}
if failed > 0 then out = {0, sec, failed, retry} end
for i = 1, n do
  out[#out + 1] = used[i]
  out[#out + 1] = reset[i]
end
if failed > 0 then return out end
for i = 1, n do
  local kind, key = ARGV[3 + 2 * i], KEYS[i]
  if kind == 'r' then
    redis.call('ZADD', key, now, member)
    redis.call('PEXPIRE', key, 61000)
    out[3 + 2 * i] = used[i] + 1
    if used[i] == 0 then out[4 + 2 * i] = 60000 end
  elseif kind == 't' then
    redis.call('HINCRBY', key, sec, ARGV[2])
    redis.call('PEXPIRE', key, 61000)
    out[3 + 2 * i] = used[i] + tokens
    if used[i] == 0 then out[4 + 2 * i] = 60000 end
  elseif kind == 'c' then
    redis.call('ZADD', key, now + lease, member)
    redis.call('PEXPIRE', key, lease * 2)
    out[3 + 2 * i] = used[i] + 1
  else
    out[3 + 2 * i] = redis.call('HINCRBY', key, 'v', ARGV[3])
  end
end
for i = 1, n do
  if ARGV[3 + 2 * i] == 'b' then out[#out + 1] = redis.call('HGET', KEYS[i], 'g') end
end
return out
""",
)

# KEYS[i]: the counters to settle.  ARGV: member, sec, tokens_delta,
# cost_reserved, cost_actual, then per key i: ARGV[4+2i] kind, ARGV[5+2i] gen.
# Tokens: the reservation's second moves by (actual - reserved), never below 0.
# Concurrency: the lease is released.  Budget: moves by (actual - reserved) when
# the counter is the one the reservation was made on (same generation); a
# counter rebuilt since then did not hold the reservation, so it gets the
# actual cost; a missing counter is left to the next rebuild from the ledger.
SETTLE = Script(
    f"gw_settle_{VERSION}",
    r"""
local member, sec, dtok = ARGV[1], ARGV[2], tonumber(ARGV[3])
local reserved, actual = tonumber(ARGV[4]), tonumber(ARGV[5])
for i = 1, #KEYS do
  local kind, key = ARGV[4 + 2 * i], KEYS[i]
  if kind == 't' then
    if dtok ~= 0 and redis.call('HEXISTS', key, sec) == 1 then
      local v = redis.call('HINCRBY', key, sec, string.format('%d', dtok))
      if v <= 0 then redis.call('HDEL', key, sec) end
    end
  elseif kind == 'c' then
    redis.call('ZREM', key, member)
  elseif kind == 'b' then
    local g = redis.call('HGET', key, 'g')
    if g then
      local delta = actual
      if g == ARGV[5 + 2 * i] then delta = actual - reserved end
      if delta ~= 0 then
        local v = redis.call('HINCRBY', key, 'v', string.format('%d', delta))
        if v < 0 then redis.call('HSET', key, 'v', 0) end
      end
    end
  end
end
return 1
""",
)

# KEYS[i]: budget counters.  ARGV: gen, then per key i: ARGV[2i] spent,
# ARGV[2i+1] ttl seconds (0 = none).  Creates only missing counters (another
# worker may have rebuilt them meanwhile); returns how many it created.
SEED = Script(
    f"gw_seed_{VERSION}",
    r"""
local created = 0
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 then
    redis.call('HSET', KEYS[i], 'v', ARGV[2 * i], 'g', ARGV[1])
    local ttl = tonumber(ARGV[2 * i + 1])
    if ttl > 0 then redis.call('EXPIRE', KEYS[i], ttl) end
    created = created + 1
  end
end
return created
""",
)

# KEYS[i]: concurrency sets of one user.  ARGV: member, lease_ms.  Extends a
# live lease (never resurrects one that expired or was released).
RENEW = Script(
    f"gw_renew_{VERSION}",
    r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[2])
for i = 1, #KEYS do
  if redis.call('ZADD', KEYS[i], 'XX', 'CH', now + lease, ARGV[1]) == 1 then
    redis.call('PEXPIRE', KEYS[i], lease * 2)
  end
end
return 1
""",
)

ALL = (ADMIT, SETTLE, SEED, RENEW)
