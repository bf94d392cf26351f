-- renew: a running attempt extends its run lease and its fleet-wide slot
-- (shared.fleet.FireLedger.renew), so a task that outlives its time limit (a pool that
-- enforces none) keeps its slot while it still runs.
--
-- KEYS: none.
-- ARGV[1] key templates (see common.lua), ARGV[2] job_id, ARGV[3] scheduled_at, ARGV[4] task_id,
-- ARGV[5] runner, ARGV[6] attempt, ARGV[7] lease_ms.
-- Returns 1 if the attempt still holds the fire (lease and slot now end lease_ms from now),
-- else 0 (finished, taken over or retired: nothing written).
--#include common.lua
local job_id, scheduled_at = ARGV[2], ARGV[3]
local fire = key(T.fire, job_id, scheduled_at)
local f = redis.call('HMGET', fire, 'run', 'runner', 'attempts')
if f[1] ~= 'running' or f[2] ~= ARGV[5] or tonumber(f[3] or '0') ~= tonumber(ARGV[6]) then return 0 end
local until_ms = now_ms + tonumber(ARGV[7])
redis.call('HSET', fire, 'run_lease_ms', until_ms)
redis.call('ZADD', key(T.inflight, job_id), until_ms, ARGV[4])
return 1
