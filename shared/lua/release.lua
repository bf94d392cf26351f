-- release: free lapsed slots and dispatch waiting buffer_one fires where a slot is free
-- (shared.fleet.FireLedger.release, from the scheduler's sweep).
--
-- KEYS[1] counters, KEYS[2] last_fire, KEYS[3] buffered, KEYS[4] dispatched.
-- ARGV[1] key templates (see common.lua), ARGV[2] fire_ttl_s, then the job ids.
-- Returns, per job id, 1 (its waiting fire was dispatched), -1 (it waited past its grace and
-- was recorded missed) or 0 (nothing waiting, or no free slot).
--#include common.lua
local out = {}
for i = 3, #ARGV do
  out[i - 2] = release_buffer(ARGV[i], KEYS[3], KEYS[1], KEYS[2], tonumber(ARGV[2]), KEYS[4])
end
return out
