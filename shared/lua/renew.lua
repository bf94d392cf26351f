-- renew: a running attempt extends its run lease and its fleet-wide slot
-- (shared.fleet.FireLedger.renew), so a task that outlives its time limit (a pool that
-- enforces none) keeps its slot while it still runs.
--
-- KEYS[1] the fire's hash, KEYS[2] the job's inflight slots (both built by RedisKeys).
-- ARGV[1] key templates (see common.lua; unused here), ARGV[2] task_id, ARGV[3] runner,
-- ARGV[4] attempt, ARGV[5] lease_ms.
-- Returns 1 if the attempt still holds the fire (lease and slot now end lease_ms from now),
-- else 0 (finished, taken over or retired: nothing written).
--#include common.lua
local f = redis.call('HMGET', KEYS[1], 'run', 'runner', 'attempts')
if f[1] ~= 'running' or f[2] ~= ARGV[3] or tonumber(f[3] or '0') ~= tonumber(ARGV[4]) then return 0 end
local until_ms = now_ms + tonumber(ARGV[5])
redis.call('HSET', KEYS[1], 'run_lease_ms', until_ms)
redis.call('ZADD', KEYS[2], until_ms, ARGV[2])
return 1
