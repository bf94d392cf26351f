-- Shared by the scripts that include it (the loader in shared/lua/__init__.py pastes it in
-- place of their `--#include common.lua` line).
--
-- ARGV[1] of every script: the per-job key templates, in the order of
-- shared.fleet.KEY_TEMPLATES: fire, history, job_counters, inflight, buffer. Each is the key
-- shared.names.RedisKeys builds for job id "\1" (and, for fire, scheduled_at "\2"); they are
-- joined by "\31". So the key layout is written once, in RedisKeys, and never here.
local T = {}
do
  local names = {'fire', 'history', 'job_counters', 'inflight', 'buffer'}
  local i = 0
  for t in string.gmatch(ARGV[1], '[^\31]+') do
    i = i + 1
    local j = string.find(t, '\1', 1, true)
    local a = string.find(t, '\2', 1, true) or (#t + 1)
    T[names[i]] = {string.sub(t, 1, j - 1), string.sub(t, j + 1, a - 1), string.sub(t, a + 1)}
  end
end

-- The key of template t (T.fire, T.history, ...) for job_id (and scheduled_at, for T.fire).
local function key(t, job_id, scheduled_at)
  return t[1] .. job_id .. t[2] .. (scheduled_at or '') .. t[3]
end

local now_ms
do
  local t = redis.call('TIME')
  now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Epoch microseconds of a scheduled_at as shared.names.format_scheduled_at writes it:
-- 'YYYY-MM-DDTHH:MM:SS[.ffffff]+00:00' (always UTC). Exact: below 2^53.
local function epoch_us(s)
  local y, m, d = tonumber(string.sub(s, 1, 4)), tonumber(string.sub(s, 6, 7)), tonumber(string.sub(s, 9, 10))
  local clock = tonumber(string.sub(s, 12, 13)) * 3600 + tonumber(string.sub(s, 15, 16)) * 60
                + tonumber(string.sub(s, 18, 19))
  local us = 0
  if string.sub(s, 20, 20) == '.' then us = tonumber(string.sub(s, 21, 26)) end
  -- Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's days_from_civil).
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local doy = math.floor((153 * ((m + 9) % 12) + 2) / 5) + d - 1
  local days = era * 146097 + yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy - 719468
  return (days * 86400 + clock) * 1000000 + us
end

-- True if the job's fence watermark (hash `fence`: job id -> scheduled_at of the newest
-- retired fire) is at or after scheduled_at: the fire was decided once and its record retired.
local function fenced(fence, job_id, scheduled_at)
  local mark = redis.call('HGET', fence, job_id)
  return mark ~= false and epoch_us(scheduled_at) <= epoch_us(mark)
end

-- A fire's member in the `dispatched` sorted set (shared.names.RedisKeys.dispatched).
local function dispatched_member(job_id, scheduled_at)
  return job_id .. '\31' .. scheduled_at
end

-- When the dispatch audit first looks at a fire dispatched now: `after_ms` later (the visibility
-- timeout plus its margin), or its message's expiry (epoch ms, at least a second after now; 0:
-- none) plus `margin_ms` if that comes first: a message past its expiry can no longer run, and
-- one that is nowhere then is lost whatever the visibility timeout.
local function audit_due(expiry_ms, after_ms, margin_ms)
  local due = now_ms + after_ms
  if expiry_ms > 0 then due = math.min(due, math.max(expiry_ms, now_ms + 1000) + margin_ms) end
  return due
end

-- The one spelling of a last_fire entry (read by scheduler.state.StateStore.load_last_fires).
local function last_fire_json(scheduled_at, dispatched_ms, task_id)
  return '{"scheduled_at":"' .. scheduled_at .. '","dispatched_ms":' .. dispatched_ms
         .. ',"task_id":"' .. task_id .. '"}'
end

-- Retire the job's oldest records while its history (`depth` entries) holds more than `limit`: the oldest
-- decided fire's hash is deleted and the fence watermark raised to it, once its nominal time is
-- older than the fence window and nothing needs the record any more: it holds no live slot
-- (queued, running or retried), is not waiting for one (buffered), and is not a dispatched fire
-- whose run has not started and which the dispatch audit has not ended yet (in `dispatched`: it
-- is republished or recorded lost first). A record that is still needed stops the retiring
-- until it is not. At most `budget` records per call.
local function retire(fence, dispatched, job_id, depth, limit, window_ms, budget)
  local history, n = key(T.history, job_id), depth
  local horizon = (now_ms - window_ms) * 1000
  while n > limit and budget > 0 do
    local stamp = redis.call('LINDEX', history, -1)
    local at = epoch_us(stamp)
    if at > horizon then return end
    local fire = key(T.fire, job_id, stamp)
    local f = redis.call('HMGET', fire, 'outcome', 'task_id', 'run')
    if f[1] == 'buffered' then return end
    if f[1] == 'dispatched' and not f[3] and redis.call('ZSCORE', dispatched, dispatched_member(job_id, stamp)) then
      return
    end
    if f[2] then
      local lapse = redis.call('ZSCORE', key(T.inflight, job_id), f[2])
      if lapse and tonumber(lapse) > now_ms then return end
    end
    redis.call('RPOP', history)
    redis.call('DEL', fire)
    local mark = redis.call('HGET', fence, job_id)
    if not mark or epoch_us(mark) < at then redis.call('HSET', fence, job_id, stamp) end
    n, budget = n - 1, budget - 1
  end
end

-- Dispatch the job's buffered fire if a slot is free (or record it missed if it waited past
-- its grace); a dispatched one joins `dispatched` (the dispatch audit's index). Returns 1 (dispatched), -1 (missed) or 0 (nothing to do or no free slot).
local function release_buffer(job_id, buffered, counters, last_fire, fire_ttl, dispatched)
  local inflight, buffer = key(T.inflight, job_id), key(T.buffer, job_id)
  local job_counters = key(T.job_counters, job_id)
  redis.call('ZREMRANGEBYSCORE', inflight, '-inf', now_ms)
  if redis.call('EXISTS', buffer) == 0 then
    redis.call('SREM', buffered, job_id)
    return 0
  end
  local b = redis.call('HGETALL', buffer)
  local f = {}
  for i = 1, #b, 2 do f[b[i]] = b[i + 1] end
  local fire = key(T.fire, job_id, f['scheduled_at'])
  local deadline = tonumber(f['deadline_ms'])
  if deadline > 0 and now_ms > deadline then
    redis.call('DEL', buffer)
    redis.call('SREM', buffered, job_id)
    redis.call('HSET', fire, 'outcome', 'missed', 'reason', 'waited past its grace for a free slot', 'decided_ms', now_ms)
    redis.call('HINCRBY', counters, 'missed', 1)
    redis.call('HINCRBY', job_counters, 'missed', 1)
    return -1
  end
  if redis.call('ZCARD', inflight) >= tonumber(f['max_instances']) then return 0 end
  redis.call('DEL', buffer)
  redis.call('SREM', buffered, job_id)
  redis.call('ZADD', inflight, now_ms + tonumber(f['slot_lapse_ms']), f['task_id'])
  redis.call('LPUSH', f['list_key'], f['payload'])
  local due = audit_due(tonumber(f['expiry_ms'] or '0'), tonumber(f['audit_after_ms'] or '3660000'),
                        tonumber(f['audit_margin_ms'] or '60000'))
  redis.call('ZADD', dispatched, due, dispatched_member(job_id, f['scheduled_at']))
  redis.call('HSET', fire, 'outcome', 'dispatched', 'reason', 'buffered until a slot freed', 'dispatched_ms', now_ms)
  redis.call('EXPIRE', fire, fire_ttl)
  redis.call('HSET', last_fire, job_id, last_fire_json(f['scheduled_at'], now_ms, f['task_id']))
  redis.call('HINCRBY', counters, 'dispatched', 1)
  redis.call('HINCRBY', job_counters, 'dispatched', 1)
  return 1
end
