"""The Lua scripts behind ``mcs.redis``: each runs atomically on the Redis server.

Time is the server's (``TIME``), in integer microseconds, so the clients' clocks never enter
the arithmetic and a skewed client cannot break a limit. Every number stays an integer below
2**53, exact in Lua's doubles, and numbers are written back with ``%.0f`` (Lua's own
``tostring`` keeps only 14 digits, less than a timestamp in microseconds has).

Rate (GCRA, reserve-then-wait). State: a hash with the theoretical arrival time ``tat`` in
whole microseconds plus ``rem / den`` of one (the interval ``T = t_us + t_num / t_den`` µs is
exact for any ``per / count`` whose fraction of a microsecond has a denominator up to 10**6,
otherwise rounded up, which only ever slows the rate). Booking ``n`` units advances the TAT by
``n T`` and returns how long to wait before using them: ``tat - burst T - now``, rounded up to a
whole microsecond, never negative. The client waits that long on its own monotonic clock, so
over any window of length W at most ``burst + W / T`` units start (the pitfalls of redis-cell
#50, #56 and #80: sub-millisecond truncation, a retry-after rounded down, float drift).

In flight (leases). State: a sorted set of lease ids scored by their expiry. Acquiring first
drops expired leases (a crashed holder's slots come back within the lease time), then adds one
if fewer than ``total`` remain; otherwise it says in how many microseconds the earliest lease
expires. Holders renew their leases well before expiry; a renewal never revives a lease that
was released or already reclaimed, and returns the ids it did not find.
"""

from __future__ import annotations

__all__ = ["ACQUIRE", "RENEW", "RESERVE"]

_NOW = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local function int(x) return string.format('%.0f', x) end
"""

RESERVE = (
    _NOW
    + """
local key = KEYS[1]
local units = tonumber(ARGV[1])
local t_us, t_num, t_den = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local burst = tonumber(ARGV[5])
local state = redis.call('HMGET', key, 'tat', 'rem', 'den')
local tat, rem = tonumber(state[1]), tonumber(state[2]) or 0
if tat == nil or tat < now then
  tat, rem = now, 0
elseif tonumber(state[3]) ~= t_den then
  if rem > 0 then tat = tat + 1 end  -- booked with another interval: round up, never down
  rem = 0
end
local sum = rem + units * t_num
tat = tat + units * t_us + math.floor(sum / t_den)
rem = sum % t_den
local b = burst * t_num
local allowed = tat - (burst * t_us + math.floor(b / t_den))
if rem > b % t_den then allowed = allowed + 1 end  -- rounded up to a whole microsecond
local wait = allowed - now
if wait < 0 then wait = 0 end
redis.call('HSET', key, 'tat', int(tat), 'rem', int(rem), 'den', int(t_den))
redis.call('PEXPIRE', key, int(math.ceil((tat - now) / 1000) + 1000))
return wait
"""
)

ACQUIRE = (
    _NOW
    + """
local key = KEYS[1]
local total, lease = tonumber(ARGV[1]), tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', key, '-inf', int(now))
if redis.call('ZCARD', key) < total then
  redis.call('ZADD', key, int(now + lease), ARGV[3])
  local ttl = math.ceil(lease / 1000) + 1000
  if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, int(ttl)) end
  return {1, 0}
end
local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
return {0, tonumber(first[2]) - now}
"""
)

RENEW = (
    _NOW
    + """
local key = KEYS[1]
local lease = tonumber(ARGV[1])
local missing = {}
for i = 2, #ARGV do
  if redis.call('ZSCORE', key, ARGV[i]) then
    redis.call('ZADD', key, 'XX', int(now + lease), ARGV[i])
  else
    missing[#missing + 1] = ARGV[i]
  end
end
local ttl = math.ceil(lease / 1000) + 1000
if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, int(ttl)) end
return missing
"""
)
