-- finish: record how an attempt ended (shared.fleet.FireLedger.finish, from workers).
--
-- KEYS[1] counters, KEYS[2] last_fire, KEYS[3] buffered, KEYS[4] fence, KEYS[5] dispatched.
-- ARGV[1] key templates (see common.lua), ARGV[2] job_id, ARGV[3] scheduled_at, ARGV[4] task_id,
-- ARGV[5] outcome, ARGV[6] error, ARGV[7] worker, ARGV[8] fire_ttl_s, ARGV[9] runner,
-- ARGV[10] attempt, ARGV[11] retry_lapse_ms.
-- A success also stamps the job's counters hash with last_success_ms (Redis time; the metrics'
-- chronoq_job_last_success_timestamp_seconds).
-- Returns {'applied', ''} or {'stale', '<run> by <runner>'} (nothing was written).
--
-- A report from an attempt (runner set) applies only while that attempt holds the fire: run is
-- 'running', runner is its own and, if attempt > 0, so is the attempt number. A late report of
-- an attempt whose lease lapsed and was taken over must neither overwrite the newer attempt's
-- outcome nor free the slot it holds. A report about a message that never started (runner '':
-- revoked or expired before it ran) applies only if no attempt ran yet, the last one asked
-- for a retry, or the running one's lease lapsed; it records no duration (duration_ms stays
-- the last attempt that ran, if any). A report on a retired fire (its record deleted, at or
-- before the job's fence watermark) is stale: no record is created again. So is one on a fire the
-- dispatch audit recorded lost (its outcome is final). A report on a message that never started
-- takes the fire out of the dispatch audit's index (KEYS[5]).
--#include common.lua
local counters, last_fire, buffered, fence = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local job_id, scheduled_at, task_id = ARGV[2], ARGV[3], ARGV[4]
local outcome, runner, attempt = ARGV[5], ARGV[9], tonumber(ARGV[10])
local fire, inflight = key(T.fire, job_id, scheduled_at), key(T.inflight, job_id)
local f = redis.call('HMGET', fire, 'run', 'runner', 'attempts', 'run_lease_ms', 'started_ms', 'outcome')
local run = f[1]
local current = (run or 'not started') .. ' by ' .. (f[2] or '-')
if not f[6] and fenced(fence, job_id, scheduled_at) then return {'stale', 'retired'} end
if f[6] == 'lost' then return {'stale', 'lost'} end
if runner == '' then
  local lapsed = run == 'running' and tonumber(f[4] or '0') <= now_ms
  if run and run ~= 'retried' and not lapsed then return {'stale', current} end
elseif run ~= 'running' or f[2] ~= runner or (attempt > 0 and tonumber(f[3] or '0') ~= attempt) then
  return {'stale', current}
end
redis.call('HSET', fire, 'run', outcome, 'finished_ms', now_ms, 'error', ARGV[6])
if runner == '' then redis.call('ZREM', KEYS[5], dispatched_member(job_id, scheduled_at)) end
if runner ~= '' and f[5] then redis.call('HSET', fire, 'duration_ms', now_ms - tonumber(f[5])) end
if ARGV[7] ~= '' then redis.call('HSET', fire, 'worker', ARGV[7]) end
redis.call('HDEL', fire, 'run_lease_ms')
redis.call('EXPIRE', fire, tonumber(ARGV[8]))
redis.call('HINCRBY', counters, outcome, 1)
redis.call('HINCRBY', key(T.job_counters, job_id), outcome, 1)
if outcome == 'succeeded' then redis.call('HSET', key(T.job_counters, job_id), 'last_success_ms', now_ms) end
if outcome == 'retried' then
  -- The retry keeps the slot: until it is due and has run, then it lapses on its own.
  if tonumber(ARGV[11]) > 0 then redis.call('ZADD', inflight, now_ms + tonumber(ARGV[11]), task_id) end
else
  redis.call('ZREM', inflight, task_id)
  release_buffer(job_id, buffered, counters, last_fire, tonumber(ARGV[8]), KEYS[5])
end
return {'applied', ''}
