-- streak: count a job's consecutive finally-failed fires and pause it after
-- pause_after_failures of them (shared.fleet.FireLedger.streak, from workers).
--
-- KEYS[1] fail_streak, KEYS[2] jobs, KEYS[3] paused, KEYS[4] audit.
-- ARGV[1] job_id, ARGV[2] scheduled_at, ARGV[3] outcome (succeeded | failed), ARGV[4] error,
-- ARGV[5] audit limit, ARGV[6] by (the worker).
--
-- A success resets the count. The threshold is the job's pause_after_failures in its registry
-- entry (what the replicas run). Returns {count, paused}: paused 1 when this call paused it.
local fail_streak, jobs, paused, audit = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local job_id, scheduled_at, outcome, err = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if outcome ~= 'failed' then
  redis.call('HDEL', fail_streak, job_id)
  return {0, 0}
end
local count = redis.call('HINCRBY', fail_streak, job_id, 1)
local entry = redis.call('HGET', jobs, job_id)
local limit = nil
if entry then
  local ok, decoded = pcall(cjson.decode, entry)
  if ok and type(decoded) == 'table' and type(decoded.spec) == 'table' then
    limit = tonumber(decoded.spec.pause_after_failures)
  end
end
if not limit or count < limit or redis.call('HEXISTS', paused, job_id) == 1 then return {count, 0} end
local t = redis.call('TIME')
local at_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local note = count .. ' consecutive failures (pause_after_failures: ' .. limit .. '); last: fire '
             .. scheduled_at .. ': ' .. err
local record = cjson.encode({at_ms = at_ms, action = 'pause', job = job_id, note = note, by = ARGV[6]})
redis.call('HSET', paused, job_id, record)
redis.call('LPUSH', audit, record)
redis.call('LTRIM', audit, 0, tonumber(ARGV[5]) - 1)
redis.call('HDEL', fail_streak, job_id)
return {count, 1}
