"""The versioned Lua scripts behind shared limits (one round trip per request).

All keys of one call share the user's hash tag (``{u:<user>}``) so the
scripts run unchanged on a Redis Cluster.  The version is part of every key
name (``<prefix>:v3:...``): a rolling deploy that changes a script's data
layout bumps it, and old and new workers then keep separate counters instead
of misreading each other's.

Time comes from Redis (``TIME``), so every worker on every host agrees on it.

Counter kinds, one key per (kind, scope):

- ``r`` requests: ZSET of request ids scored by arrival ms; a rolling minute.
- ``t`` tokens: HASH unix-second -> tokens reserved in that second; the
  last 60 seconds count.
- ``c`` concurrency: ZSET of request ids scored by lease expiry ms; a lease
  that is neither renewed nor released expires by itself.
- ``b`` budget: HASH ``v`` = pico-dollars spent (what the ledger holds, as
  far as this counter knows), ``r`` = pico-dollars held, and per request
  ``h:<id>`` (the worst-case reservation of a request in flight) or
  ``p:<id>`` (its real cost, settled but not yet committed to the ledger),
  each with ``e:<id>``, the ms time at which the hold lapses by itself (a
  dead worker's holds are never renewed).  ``g`` is the generation and
  ``s`` the Postgres snapshot (``xmin:xmax:xip,...``) of the ledger read
  that (re)built the counter.  A budget admits while ``v + r + cost <=
  limit``; expired holds are pruned only when that fails.  A counter without
  ``v`` is missing, never zero: the caller rebuilds it from the ledger first.

Budget money moves in two steps.  The request's end (SETTLE) turns its
reservation into its real cost, still held; once the usage record is
committed to the ledger, the ledger writer's APPLY moves it from held to
``v``, unless the counter's rebuild snapshot already saw that commit (the
transaction id is visible in ``s``).  So a counter equals the ledger it was
built from plus exactly the commits after it, whatever order the two steps
take.  A record APPLY finds no counter for, or a counter being rebased
(``x``, set by MARK), is queued instead (``q:<id>``) and SEED folds the queue
in against its own snapshot: a rebase (MARK, ledger read, SEED with the
mark's token) resets ``v`` to the ledger's figure, exactly, while requests
keep their holds.  Without a ledger (Redis but no Postgres) SETTLE adds the
real cost to ``v`` directly (``hold_ms`` 0).

v3 (exact money): amounts are pico-dollars and never pass through a Lua
number: they are added by HINCRBY and compared as two exact limbs (``_BIG``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from gateway.stores.resp import encode_parts

VERSION = "v3"


@dataclass(frozen=True, slots=True)
class Script:
    name: str
    source: str
    sha: str = field(init=False)
    head: bytes = field(init=False)  # ``EVALSHA <sha>`` as RESP bulk strings (the command's first two parts)

    def __post_init__(self) -> None:
        # Redis names scripts by SHA-1 (EVALSHA).
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())  # noqa: S324
        object.__setattr__(self, "head", encode_parts("EVALSHA", self.sha))


# Budget amounts are pico-dollars (10^-12 USD): past 2^53 (~9,000 USD) a Lua number
# (a double) is no longer exact, so amounts stay decimal strings.  Redis adds them
# with HINCRBY (64-bit integers, ~9.2 million USD per counter); the scripts compare
# them as two limbs, whole dollars and pico-dollars below a dollar (each exact).
_BIG = r"""
local BIG_B = 1000000000000
local function big(s)
  s = tostring(s)
  local neg = string.sub(s, 1, 1) == '-'
  if neg then s = string.sub(s, 2) end
  local n, hi, lo = #s, 0, 0
  if n > 12 then
    hi, lo = tonumber(string.sub(s, 1, n - 12)), tonumber(string.sub(s, n - 11))
  else
    lo = tonumber(s)
  end
  if neg then
    hi, lo = -hi, -lo
    if lo < 0 then lo, hi = lo + BIG_B, hi - 1 end
  end
  return {hi, lo}
end
local function big_add(a, b)
  local hi, lo = a[1] + b[1], a[2] + b[2]
  if lo >= BIG_B then lo, hi = lo - BIG_B, hi + 1 end
  return {hi, lo}
end
local function big_gt(a, b)
  return a[1] > b[1] or (a[1] == b[1] and a[2] > b[2])
end
local function big_str(a)
  local hi, lo = a[1], a[2]
  if hi < 0 then
    -- negative: -(|hi| * B - lo)
    if lo > 0 then hi, lo = hi + 1, BIG_B - lo else lo = -lo end
    if hi == 0 then return '-' .. string.format('%d', lo) end
    return '-' .. string.format('%d', -hi) .. string.format('%012d', lo)
  end
  if hi == 0 then return string.format('%d', lo) end
  return string.format('%d', hi) .. string.format('%012d', lo)
end
local function big_neg(s)
  s = tostring(s)
  if s == '0' then return '0' end
  if string.sub(s, 1, 1) == '-' then return string.sub(s, 2) end
  return '-' .. s
end
"""

# KEYS[i]: one counter per check.  ARGV: member, tokens, cost, lease_ms, then
# per check i: ARGV[3+2i] kind, ARGV[4+2i] limit.
# Returns {1, sec, 0, 0, used_1, reset_1, ...} (admitted; used counts this
# request; a budget's used is spent + held), {0, sec, failed_i, retry_ms, used_1,
# reset_1, ...} (rejected, nothing reserved) or {-1, sec, 0, 0} (a budget
# counter is missing: rebuild it first, nothing reserved).
ADMIT = Script(
    f"gw_admit_{VERSION}",
    _BIG
    + r"""
-- Drop a budget's lapsed holds and recount what it holds (also heals a drifted 'r'); exact (HINCRBY).
local function prune(key, now)
  local h = redis.call('HGETALL', key)
  local amount, field, expiry = {}, {}, {}
  for j = 1, #h, 2 do
    local f, p = h[j], string.sub(h[j], 1, 2)
    if p == 'h:' or p == 'p:' then
      amount[string.sub(f, 3)], field[string.sub(f, 3)] = h[j + 1], f
    elseif p == 'e:' then
      expiry[string.sub(f, 3)] = tonumber(h[j + 1])
    end
  end
  for m, e in pairs(expiry) do
    if e <= now then
      if field[m] then redis.call('HDEL', key, field[m]) end
      redis.call('HDEL', key, 'e:' .. m)
      amount[m] = nil
    end
  end
  redis.call('HSET', key, 'r', 0)
  for _, a in pairs(amount) do redis.call('HINCRBY', key, 'r', a) end
  return redis.call('HGET', key, 'r')
end
local t = redis.call('TIME')
local sec = tonumber(t[1])
local now = sec * 1000 + math.floor(tonumber(t[2]) / 1000)
local member = ARGV[1]
local tokens = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local costb = big(ARGV[3])
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
    -- Pico-dollars: exact two-limb arithmetic (a Lua number is a double), strings out.
    local v = redis.call('HGET', key, 'v')
    if not v then return {-1, sec, 0, 0} end
    local held = redis.call('HGET', key, 'r') or '0'
    local ub, lim = big_add(big(v), big(held)), big(ARGV[4 + 2 * i])
    if big_gt(big_add(ub, costb), lim) and tonumber(held) > 0 then
      ub = big_add(big(v), big(prune(key, now)))
    end
    if big_gt(big_add(ub, costb), lim) then
      over = true
      if not budget_failed then failed = i end
      budget_failed = true
    end
    u = big_str(ub)
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
    if cost > 0 then
      redis.call('HINCRBY', key, 'r', ARGV[3])
      redis.call('HSET', key, 'h:' .. member, ARGV[3], 'e:' .. member, now + lease)
    end
    out[3 + 2 * i] = big_str(big_add(big(used[i]), costb))
  end
end
return out
""",
)

# Is Postgres transaction ``xid`` visible in snapshot ``snap`` (``xmin:xmax:xip,...``),
# i.e. committed before the ledger read that took the snapshot?
_VISIBLE = r"""
local function visible(xid, snap)
  local xmin, xmax, xip = string.match(snap, '^(%d+):(%d+):(.*)$')
  if not xmin then return false end
  if xid < tonumber(xmin) then return true end
  if xid >= tonumber(xmax) then return false end
  for x in string.gmatch(xip, '%d+') do
    if tonumber(x) == xid then return false end
  end
  return true
end
"""

# One request's settlement, over KEYS[first ...] (one per letter of ``kinds``):
# member, sec (the reservation's second), dtok (actual - reserved tokens),
# cost (actual pico-dollars, a decimal string), hold_ms.
# Tokens: the reservation's second moves by (actual - reserved), never below 0.
# Concurrency: the lease is released.  Budget, hold_ms > 0 (a ledger will commit
# the record): the reservation becomes the real cost, still held for hold_ms or
# until APPLY; hold_ms = 0 (no ledger): the real cost goes to ``v`` at once.
# A reservation no longer there (lapsed, applied already, counter rebuilt) is
# left alone: APPLY (or, without a ledger, ``v``) accounts for the cost.
_SETTLE_ONE = r"""
local now = 0
local function settle_one(first, kinds, member, sec, dtok, cost, hold)
  local actual = tonumber(cost)
  for j = 1, #kinds do
    local kind, key = string.sub(kinds, j, j), KEYS[first + j - 1]
    if kind == 't' then
      if dtok ~= 0 and redis.call('HEXISTS', key, sec) == 1 then
        local v = redis.call('HINCRBY', key, sec, string.format('%d', dtok))
        if v <= 0 then redis.call('HDEL', key, sec) end
      end
    elseif kind == 'c' then
      redis.call('ZREM', key, member)
    elseif kind == 'b' and redis.call('HEXISTS', key, 'v') == 1 then
      local amt = redis.call('HGET', key, 'h:' .. member)
      if amt then
        local keep = '0'
        if hold > 0 then keep = cost end
        redis.call('HINCRBY', key, 'r', keep)
        local r = redis.call('HINCRBY', key, 'r', big_neg(amt))
        if r < 0 then redis.call('HSET', key, 'r', 0) end
        redis.call('HDEL', key, 'h:' .. member)
        if tonumber(keep) > 0 then
          if now == 0 then
            local t = redis.call('TIME')
            now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
          end
          redis.call('HSET', key, 'p:' .. member, keep, 'e:' .. member, now + hold)
        else
          redis.call('HDEL', key, 'e:' .. member)
        end
      end
      if hold == 0 and actual ~= 0 then
        redis.call('HINCRBY', key, 'v', cost)
      end
    end
  end
end
"""

# KEYS[i]: the counters to settle.  ARGV: member, sec, tokens_delta, cost_actual,
# hold_ms, then per key i: ARGV[5+i] kind.
SETTLE = Script(
    f"gw_settle_{VERSION}",
    _BIG
    + _SETTLE_ONE
    + r"""
local kinds = ''
for i = 1, #KEYS do kinds = kinds .. ARGV[5 + i] end
settle_one(1, kinds, ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5]))
return 1
""",
)

# Many requests' settlements in one call (the single-node fast path: one round trip
# and one command per loop pass).  KEYS: each request's counters in turn.  ARGV[1]:
# hold_ms; ARGV[2]: one line per request, ``sec dtok cost kinds member`` (the
# member last: it may hold spaces, never a newline).
SETTLE_MANY = Script(
    f"gw_settle_many_{VERSION}",
    _BIG
    + _SETTLE_ONE
    + r"""
local hold, first = tonumber(ARGV[1]), 1
for line in string.gmatch(ARGV[2], '[^\n]+') do
  local sec, dtok, cost, kinds, member = string.match(line, '^(%-?%d+) (%-?%d+) (%-?%d+) (%a*) (.*)$')
  settle_one(first, kinds, member, sec, tonumber(dtok), cost, hold)
  first = first + #kinds
end
return 1
""",
)

# Must APPLY queue a record on this counter instead of adding it: the counter is
# missing (SEED will build it) or marked for a rebase (MARK, until SEED or the
# mark's expiry); SEED folds the queue in against its new snapshot.  A mark
# that was abandoned (expired; or dropped by UNMARK when the rebase failed) has
# its queue folded the way APPLY would have added it, against the counter's
# current snapshot.  Needs _VISIBLE.
_QUEUES = r"""
local function unqueue(key)
  local snap = redis.call('HGET', key, 's')
  local h = redis.call('HGETALL', key)
  for j = 1, #h, 2 do
    if string.sub(h[j], 1, 2) == 'q:' then
      local cost, xid = string.match(h[j + 1], '^(%d+):(%d+)$')
      if cost and not (snap and visible(tonumber(xid), snap)) then
        redis.call('HINCRBY', key, 'v', cost)
      end
      redis.call('HDEL', key, h[j])
    end
  end
  redis.call('HDEL', key, 'x')
end
local function queues(key, now)
  if redis.call('HEXISTS', key, 'v') == 0 then return true end
  local x = redis.call('HGET', key, 'x')
  if not x then return false end
  local exp = tonumber(string.match(x, ':(%d+)$') or '0')
  if exp > now then return true end
  unqueue(key)
  return false
end
"""

# The budget counters KEYS[first .. last] of one committed usage record: member,
# cost (a decimal string), xid (the Postgres transaction that committed the record).
# The record's hold (settled or not) is dropped; its cost goes to ``v`` unless
# the counter was rebuilt from a ledger read that already counted it.  A
# missing or rebasing counter gets the record queued (``q:<id>`` = cost:xid).
_APPLY_ONE = r"""
local function apply_one(first, last, member, cost, xids, now)
  local actual, xid = tonumber(cost), tonumber(xids)
  for i = first, last do
    local key = KEYS[i]
    local amt = redis.call('HGET', key, 'p:' .. member) or redis.call('HGET', key, 'h:' .. member)
    if amt then
      local r = redis.call('HINCRBY', key, 'r', big_neg(amt))
      if r < 0 then redis.call('HSET', key, 'r', 0) end
      redis.call('HDEL', key, 'p:' .. member, 'h:' .. member, 'e:' .. member)
    end
    if queues(key, now) then
      redis.call('HSET', key, 'q:' .. member, cost .. ':' .. xids)
      if redis.call('TTL', key) < 0 and redis.call('HEXISTS', key, 'v') == 0 then
        redis.call('EXPIRE', key, 86400)
      end
    else
      local snap = redis.call('HGET', key, 's')
      if not (snap and visible(xid, snap)) and actual ~= 0 then
        redis.call('HINCRBY', key, 'v', cost)
      end
    end
  end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS[i]: the budget counters of one committed usage record.  ARGV: member,
# cost, xid.
APPLY = Script(
    f"gw_apply_{VERSION}",
    _BIG
    + _VISIBLE
    + _QUEUES
    + _APPLY_ONE
    + r"""
apply_one(1, #KEYS, ARGV[1], ARGV[2], ARGV[3], now)
return 1
""",
)

# Many committed records of one transaction in one call (the single-node fast path).
# KEYS: each record's budget counters in turn.  ARGV[1]: xid; ARGV[2]: one line
# per record, ``nkeys cost member`` (the member last, never holding a newline).
APPLY_MANY = Script(
    f"gw_apply_many_{VERSION}",
    _BIG
    + _VISIBLE
    + _QUEUES
    + _APPLY_ONE
    + r"""
local first = 1
for line in string.gmatch(ARGV[2], '[^\n]+') do
  local n, cost, member = string.match(line, '^(%d+) (%-?%d+) (.*)$')
  n = tonumber(n)
  apply_one(first, first + n - 1, member, cost, ARGV[1], now)
  first = first + n
end
return 1
""",
)

# KEYS[i]: budget counters about to be rebased.  ARGV: token, ttl_ms.  From now
# until REBASE (or ttl_ms), APPLY queues instead of adding: the ledger read that
# follows may or may not see those commits, and REBASE tells them apart.
MARK = Script(
    f"gw_mark_{VERSION}",
    r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 1, #KEYS do
  if redis.call('HEXISTS', KEYS[i], 'v') == 1 then
    redis.call('HSET', KEYS[i], 'x', ARGV[1] .. ':' .. (now + tonumber(ARGV[2])))
  end
end
return 1
""",
)

# KEYS[i]: budget counters.  ARGV: gen, snapshot ('' = no ledger), token ('' =
# seed only), then per key i: ARGV[2+2i] spent, ARGV[3+2i] ttl seconds (0 =
# none).  Builds a missing counter (another worker may have built it meanwhile:
# then it is left alone); with a token, also resets ``v`` of a counter this
# caller marked (MARK) to the ledger's figure, keeping every hold.  Either way
# the queued records the snapshot did not see are added.  Returns how many
# counters it (re)built.
SEED = Script(
    f"gw_seed_{VERSION}",
    _VISIBLE
    + r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local gen, snap, token = ARGV[1], ARGV[2], ARGV[3]
local built = 0
for i = 1, #KEYS do
  local key = KEYS[i]
  local has = redis.call('HEXISTS', key, 'v') == 1
  local mine = false
  if has and token ~= '' then
    local x = redis.call('HGET', key, 'x')
    if x then
      local tok, exp = string.match(x, '^(.*):(%d+)$')
      mine = tok == token and tonumber(exp) > now
    end
  end
  if not has or mine then
    -- Pico-dollars stay strings: HSET the ledger's figure, HINCRBY each queued cost (exact).
    local queued = {}
    local h = redis.call('HGETALL', key)
    for j = 1, #h, 2 do
      if string.sub(h[j], 1, 2) == 'q:' then
        local cost, xid = string.match(h[j + 1], '^(%d+):(%d+)$')
        if cost and not (snap ~= '' and visible(tonumber(xid), snap)) then queued[#queued + 1] = cost end
        redis.call('HDEL', key, h[j])
      end
    end
    if has then
      redis.call('HSET', key, 'v', ARGV[2 + 2 * i], 'g', gen)
      redis.call('HDEL', key, 'x')
    else
      redis.call('DEL', key)
      redis.call('HSET', key, 'v', ARGV[2 + 2 * i], 'r', 0, 'g', gen)
      local ttl = tonumber(ARGV[3 + 2 * i])
      if ttl > 0 then redis.call('EXPIRE', key, ttl) end
    end
    for _, cost in ipairs(queued) do redis.call('HINCRBY', key, 'v', cost) end
    if snap ~= '' then redis.call('HSET', key, 's', snap) else redis.call('HDEL', key, 's') end
    built = built + 1
  end
end
return built
""",
)

# KEYS[i]: the concurrency sets and budget counters of one request in flight.
# ARGV: member, lease_ms, then per key i: ARGV[2+i] kind.  Extends a live lease
# or budget reservation (never resurrects one that lapsed or was released).
RENEW = Script(
    f"gw_renew_{VERSION}",
    r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local member, lease = ARGV[1], tonumber(ARGV[2])
for i = 1, #KEYS do
  if ARGV[2 + i] == 'c' then
    if redis.call('ZADD', KEYS[i], 'XX', 'CH', now + lease, member) == 1 then
      redis.call('PEXPIRE', KEYS[i], lease * 2)
    end
  elseif redis.call('HEXISTS', KEYS[i], 'h:' .. member) == 1 then
    redis.call('HSET', KEYS[i], 'e:' .. member, now + lease)
  end
end
return 1
""",
)

# KEYS[i]: budget counters marked by MARK.  ARGV: token.  The rebase failed (no
# ledger answer): drop the mark and add what it queued as APPLY would have.
UNMARK = Script(
    f"gw_unmark_{VERSION}",
    _VISIBLE
    + _QUEUES
    + r"""
for i = 1, #KEYS do
  local x = redis.call('HGET', KEYS[i], 'x')
  if x and string.match(x, '^(.*):%d+$') == ARGV[1] then unqueue(KEYS[i]) end
end
return 1
""",
)

ALL = (ADMIT, SETTLE, SETTLE_MANY, APPLY, APPLY_MANY, MARK, UNMARK, SEED, RENEW)
