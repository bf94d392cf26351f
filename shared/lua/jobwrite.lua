-- jobwrite: create, update or delete one API job, all or nothing (scheduler.jobstore.JobStore).
--
-- KEYS[1] api_jobs, KEYS[2] changes, KEYS[3] audit, KEYS[4] jobs, KEYS[5] paused,
-- KEYS[6] last_fire, KEYS[7] fail_streak, KEYS[8] history (of this job), KEYS[9] invalid_jobs.
-- ARGV[1] op (create | update | delete), ARGV[2] job id, ARGV[3] expected version (update,
-- delete; '' = any), ARGV[4] the record's JSON object without its version (create, update),
-- ARGV[5] the job's registry entry JSON (create, update), ARGV[6] the audit entry JSON,
-- ARGV[7] audit limit, ARGV[8] changes stream MAXLEN (approximate).
--
-- Returns {'ok', version, recreated} (recreated 1: the id had fires before, of a deleted job),
-- {'exists', version} (create of a taken API id), {'owned', source} (the id belongs to a job
-- file or code), {'missing', ''} or {'conflict', current version}: nothing was written. A create,
-- or an update with an expected version, repeated after it was applied answers {'ok', version, 0}.
-- The record is stored as '{"version":N,' .. ARGV[4] minus its '{', so the version is its first
-- field. Delete also forgets the job's pause, last fire, failure streak and invalid report: a job created
-- later under the same id is a new job (no catch-up from the old one's last fire).
local api_jobs, changes, audit, jobs, paused, last_fire, fail_streak, history, invalid =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local op, id, expected = ARGV[1], ARGV[2], ARGV[3]

local function owner()
  local entry = redis.call('HGET', jobs, id)
  if not entry then return nil end
  local ok, decoded = pcall(cjson.decode, entry)
  if not ok or type(decoded) ~= 'table' or type(decoded.spec) ~= 'table' then return nil end
  local source = decoded.spec.source
  if type(source) == 'string' and source ~= 'api' then return source end
  return nil
end

local current = redis.call('HGET', api_jobs, id)
local version = 0
if current then version = tonumber(string.match(current, '^{%s*"version"%s*:%s*(%d+)')) or 0 end
-- This very write sent again (its reply was lost, or WAIT did not confirm it and it reached the
-- master that took over): the stored record is its own, so it answers 'ok' and writes nothing.
local function again()
  local comma = current and string.find(current, ',', 1, true)
  return comma ~= nil and string.sub(current, comma + 1) == string.sub(ARGV[4], 2)
end
if op == 'create' then
  if current and again() then return {'ok', tostring(version), 0} end
  if current then return {'exists', tostring(version)} end
else
  if not current then
    local source = owner()
    if source then return {'owned', source} end
    return {'missing', ''}
  end
  if expected ~= '' and tonumber(expected) ~= version then
    if op == 'update' and tonumber(expected) + 1 == version and again() then return {'ok', tostring(version), 0} end
    return {'conflict', tostring(version)}
  end
end
local source = owner()
if source then return {'owned', source} end

local recreated = 0
if op == 'delete' then
  redis.call('HDEL', api_jobs, id)
  redis.call('HDEL', jobs, id)
  redis.call('HDEL', paused, id)
  redis.call('HDEL', last_fire, id)
  redis.call('HDEL', fail_streak, id)
  redis.call('HDEL', invalid, id)
else
  if op == 'create' and redis.call('EXISTS', history) == 1 then recreated = 1 end
  version = version + 1
  redis.call('HSET', api_jobs, id, '{"version":' .. version .. ',' .. string.sub(ARGV[4], 2))
  redis.call('HSET', jobs, id, ARGV[5])
end
-- Entry ids are a sequence (N-0), so a reader knows exactly when entries it has not read were
-- trimmed: the first entry left is past the one after its last (scheduler.jobstore).
local newest = redis.call('XREVRANGE', changes, '+', '-', 'COUNT', 1)
local seq = 1
if #newest > 0 then seq = tonumber(string.match(newest[1][1], '^(%d+)')) + 1 end
redis.call('XADD', changes, 'MAXLEN', '~', ARGV[8], seq .. '-0', 'op', op, 'job', id, 'version', version)
redis.call('LPUSH', audit, ARGV[6])
redis.call('LTRIM', audit, 0, tonumber(ARGV[7]) - 1)
return {'ok', tostring(version), recreated}
