-- decided: which fires are decided already (shared.fleet.FireLedger.decided), so a follower
-- replica does not encode messages for fires the leader has decided.
--
-- KEYS[1] fence.
-- ARGV[1] key templates (see common.lua), then two values per fire: job_id, scheduled_at.
-- Returns, per fire, 1 if its fire hash exists or the job's fence watermark is at or after it,
-- else 0.
--#include common.lua
local out = {}
for i = 2, #ARGV, 2 do
  local job_id, scheduled_at = ARGV[i], ARGV[i + 1]
  local decided = redis.call('EXISTS', key(T.fire, job_id, scheduled_at)) == 1 or fenced(KEYS[1], job_id, scheduled_at)
  out[#out + 1] = decided and 1 or 0
end
return out
