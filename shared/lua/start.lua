-- start: take the run lease of a fire (shared.fleet.FireLedger.start, from workers).
--
-- KEYS[1] fence.
-- ARGV[1] key templates (see common.lua), ARGV[2] job_id, ARGV[3] scheduled_at, ARGV[4] task_id,
-- ARGV[5] runner (host:pid), ARGV[6] lease_ms, ARGV[7] force (1 = take over), ARGV[8] fire_ttl_s,
-- ARGV[9] retries (the delivery's retry count).
--
-- Returns {'run', '', 0, attempt}, {'done', '', 0, 0}, {'done', 'retired', 0, 0} (the record was retired) or {'busy', holder, lease_left_ms, 0}.
-- A delivery with more retries than the running attempt is the retry that attempt just
-- published (Celery publishes it before the attempt reports 'retried'): it takes over.
-- A fire whose record was retired (at or before the job's fence watermark: decided long ago,
-- its slot free) answers 'done', 'retired' and writes nothing: no record or slot is created again.
--#include common.lua
local job_id, scheduled_at, task_id = ARGV[2], ARGV[3], ARGV[4]
local fire, inflight = key(T.fire, job_id, scheduled_at), key(T.inflight, job_id)
local f = redis.call('HMGET', fire, 'run', 'run_lease_ms', 'runner', 'run_retries', 'outcome')
if f[1] == 'succeeded' then return {'done', '', 0, 0} end
if not f[5] and fenced(KEYS[1], job_id, scheduled_at) then return {'done', 'retired', 0, 0} end
local lease = tonumber(f[2] or '0')
local held_retries = tonumber(f[4] or '')
local retry_of_holder = held_retries ~= nil and tonumber(ARGV[9]) > held_retries
if f[1] == 'running' and lease > now_ms and ARGV[7] ~= '1' and not retry_of_holder then
  return {'busy', f[3] or '', lease - now_ms, 0}
end
redis.call('HSET', fire, 'run', 'running', 'runner', ARGV[5], 'started_ms', now_ms,
           'run_lease_ms', now_ms + tonumber(ARGV[6]), 'run_retries', ARGV[9])
local attempt = redis.call('HINCRBY', fire, 'attempts', 1)
redis.call('EXPIRE', fire, tonumber(ARGV[8]))
redis.call('ZADD', inflight, now_ms + tonumber(ARGV[6]), task_id)
return {'run', '', 0, attempt}
