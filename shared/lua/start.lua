-- start: take the run lease of a fire (shared.fleet.FireLedger.start, from workers).
--
-- KEYS[1] fence, KEYS[2] dispatched (the run starting takes the fire out of the dispatch audit's index).
-- ARGV[1] key templates (see common.lua), ARGV[2] job_id, ARGV[3] scheduled_at, ARGV[4] task_id,
-- ARGV[5] runner (host:pid), ARGV[6] lease_ms, ARGV[7] force (1 = take over), ARGV[8] fire_ttl_s,
-- ARGV[9] retries (the delivery's retry count), ARGV[10] token (one per admission, '' = none),
-- ARGV[11] require_record ('1': a fire without a record never runs).
--
-- Returns {'run', '', 0, attempt}, {'done', '', 0, 0}, {'done', 'retired', 0, 0} (the record was retired),
-- {'done', outcome, 0, 0} (the fire was decided otherwise), {'done', 'undecided', 0, 0} or {'busy', holder, lease_left_ms, 0}.
-- A delivery with more retries than the running attempt is the retry that attempt just
-- published (Celery publishes it before the attempt reports 'retried'): it takes over.
-- A fire whose record was retired (at or before the job's fence watermark: decided long ago,
-- its slot free) answers 'done', 'retired' and writes nothing: no record or slot is created again.
-- The same call sent again (its reply was lost, or WAIT did not confirm it: it may have landed on
-- the master that took over) finds its own token on the running lease and answers 'run' again.
-- A message whose fire is recorded coalesced, skipped or missed, or (with require_record: set
-- with WAIT-based durability) has no record at all, was published by a decision that a failover
-- discarded (it reached only the old master): it never runs. The decision kept on the new master
-- rules, and published its own message if it dispatched the fire.
--#include common.lua
local job_id, scheduled_at, task_id = ARGV[2], ARGV[3], ARGV[4]
local fire, inflight = key(T.fire, job_id, scheduled_at), key(T.inflight, job_id)
local f = redis.call('HMGET', fire, 'run', 'run_lease_ms', 'runner', 'run_retries', 'outcome', 'run_token', 'attempts')
if f[1] == 'succeeded' then return {'done', '', 0, 0} end
if f[1] == 'running' and ARGV[10] ~= '' and f[6] == ARGV[10] then return {'run', '', 0, tonumber(f[7])} end
if not f[5] and fenced(KEYS[1], job_id, scheduled_at) then return {'done', 'retired', 0, 0} end
if f[5] and f[5] ~= 'dispatched' then return {'done', f[5], 0, 0} end  -- lost too: recorded for good
if not f[5] and ARGV[11] == '1' then return {'done', 'undecided', 0, 0} end
local lease = tonumber(f[2] or '0')
local held_retries = tonumber(f[4] or '')
local retry_of_holder = held_retries ~= nil and tonumber(ARGV[9]) > held_retries
if f[1] == 'running' and lease > now_ms and ARGV[7] ~= '1' and not retry_of_holder then
  return {'busy', f[3] or '', lease - now_ms, 0}
end
redis.call('HSET', fire, 'run', 'running', 'runner', ARGV[5], 'started_ms', now_ms,
           'run_lease_ms', now_ms + tonumber(ARGV[6]), 'run_retries', ARGV[9], 'run_token', ARGV[10])
local attempt = redis.call('HINCRBY', fire, 'attempts', 1)
redis.call('EXPIRE', fire, tonumber(ARGV[8]))
redis.call('ZADD', inflight, now_ms + tonumber(ARGV[6]), task_id)
redis.call('ZREM', KEYS[2], dispatched_member(job_id, scheduled_at))
return {'run', '', 0, attempt}
