-- audit: look for the messages of dispatched fires whose run has not started, and act on what
-- is found (shared.fleet.FireLedger.audit, from the leader's dispatch audit, scheduler.audit).
--
-- KEYS[1] dispatched (the audit's index), KEYS[2] counters, KEYS[3] kombu's unacked hash,
-- KEYS[4] kombu's unacked index, KEYS[5..] the queue lists the fires were published to.
-- ARGV[1] key templates (see common.lua), ARGV[2] scan_max (queue entries read per list, from
-- the oldest), ARGV[3] after_ms (the visibility timeout plus the audit's margin: a fire looked at
-- and left is looked at again this much later), then eight values per fire: job_id,
-- scheduled_at, list (index into KEYS from 5, 0: none known), action ('' to look; 'republish' or
-- 'lost'), n (the copy a republish publishes: 1 + copies published before), slot_lapse_ms and
-- next_ms (republish: how long its slot is held; epoch ms of the next look), data (republish: the
-- payload; lost: the reason).
--
-- Where a fire's message is, checked in one atomic step:
--   done      its record is gone (retired), not dispatched (lost, ...) or its run started: it
--             leaves the index;
--   unacked   in kombu's unacked hash and index (a worker holds it, or kombu's sweep will put it
--             back after the visibility timeout): left to kombu;
--   reindexed in the unacked hash but not in its index, where kombu's sweep never looks: put in
--             the index (scored with its dispatch time, older than the visibility timeout), so the
--             next sweep restores it;
--   queued    in its queue list among the oldest scan_max entries, or the list is longer than that
--             (a backlog older than the visibility timeout: it is taken as still queued): left;
--   nowhere   none of these. Only then is an action applied: 'republish' pushes the payload (the
--             same task id and headers, delivery tag <task_id>.r<n>), 'lost' records the outcome
--             lost and frees the fire's slot.
-- A message's delivery tag is its task id (scheduler.encoder), or <task id>.r<n> for the n-th
-- copy this script published, so the unacked hash is probed without a scan. In the queue list
-- each entry's task id is read from its first '"id": "' (the protocol-2 header, the first key
-- of that name in the JSON kombu writes; the body before it is a base64 or JSON-quoted string).
--
-- Each fire found unacked, reindexed or queued is scored with now + after_ms in the index (looked
-- at again one deadline later) and counted once per fire and state (KEYS[2] recovered_<state>; its
-- record's 'audit' field holds the state last counted). Returns, per fire,
-- {state, new (1: first time in this state, or an action applied), copies published again, dispatched_ms}.
--#include common.lua
local dispatched, counters, unacked, index = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local scan_max, after_ms = tonumber(ARGV[2]), tonumber(ARGV[3])
local GROUP = 8

-- Per list: the task ids wanted in it, then which were found, and whether it was read whole.
local wanted, found, whole = {}, {}, {}
local fires = {}
for i = 4, #ARGV, GROUP do
  local list = tonumber(ARGV[i + 2])
  local fire = key(T.fire, ARGV[i], ARGV[i + 1])
  local f = redis.call('HMGET', fire, 'outcome', 'run', 'task_id', 'republished', 'dispatched_ms', 'audit')
  fires[#fires + 1] = {i = i, key = fire, f = f, list = list}
  if f[1] == 'dispatched' and not f[2] and f[3] and list > 0 then
    wanted[list] = wanted[list] or {}
    wanted[list][f[3]] = true
  end
end

for list, ids in pairs(wanted) do
  local name, left, hits, read = KEYS[4 + list], 0, {}, 0
  for _ in pairs(ids) do left = left + 1 end
  local length = redis.call('LLEN', name)
  while read < length and read < scan_max and left > 0 do
    local chunk = math.min(200, scan_max - read)
    local items = redis.call('LRANGE', name, -(read + chunk), -(read + 1))
    for j = 1, #items do
      local id = string.match(items[j], '"id": "([^"]*)"')
      if id and ids[id] and not hits[id] then hits[id], left = true, left - 1 end
    end
    read = read + #items
    if #items < chunk then break end
  end
  found[list], whole[list] = hits, read >= length
end

local function locate(entry)
  local f = entry.f
  if f[1] ~= 'dispatched' or f[2] or not f[3] then return 'done' end
  local copies = tonumber(f[4] or '0')
  for n = 0, copies do
    local tag = f[3]
    if n > 0 then tag = tag .. '.r' .. n end
    if redis.call('HEXISTS', unacked, tag) == 1 then
      if redis.call('ZSCORE', index, tag) then return 'unacked' end
      redis.call('ZADD', index, math.floor(tonumber(f[5] or now_ms) / 1000), tag)
      return 'reindexed'
    end
  end
  if entry.list > 0 and (found[entry.list][f[3]] or not whole[entry.list]) then return 'queued' end
  if entry.list == 0 then return 'unknown' end
  return 'nowhere'
end

local REASONS = {
  reindexed = "put back in kombu's unacked index by the dispatch audit (it was in neither its queue nor the index)",
  republished = 'published again by the dispatch audit (its message was in neither its queue nor unacked)',
}

local out, totals = {}, {}
local function count(name) totals[name] = (totals[name] or 0) + 1 end
for _, entry in ipairs(fires) do
  local i, f = entry.i, entry.f
  local job_id, scheduled_at = ARGV[i], ARGV[i + 1]
  local member = dispatched_member(job_id, scheduled_at)
  local state = locate(entry)
  local new = 0
  local copies = tonumber(f[4] or '0')
  if state == 'done' then
    redis.call('ZREM', dispatched, member)
  elseif state == 'nowhere' and ARGV[i + 3] == 'republish' and tonumber(ARGV[i + 4]) == copies + 1 then
    redis.call('LPUSH', KEYS[4 + entry.list], ARGV[i + 7])
    copies = redis.call('HINCRBY', entry.key, 'republished', 1)
    redis.call('HSET', entry.key, 'audit', 'republished', 'audit_ms', now_ms, 'reason', REASONS.republished)
    redis.call('ZADD', key(T.inflight, job_id), now_ms + tonumber(ARGV[i + 5]), f[3])
    local next_ms = tonumber(ARGV[i + 6])
    if next_ms <= 0 then next_ms = now_ms + after_ms end
    redis.call('ZADD', dispatched, next_ms, member)
    count('recovered_republished')
    state, new = 'republished', 1
  elseif state == 'nowhere' and ARGV[i + 3] == 'lost' then
    redis.call('HSET', entry.key, 'outcome', 'lost', 'reason', ARGV[i + 7], 'audit', 'lost', 'audit_ms', now_ms)
    redis.call('ZREM', key(T.inflight, job_id), f[3])
    redis.call('ZREM', dispatched, member)
    count('lost')
    redis.call('HINCRBY', key(T.job_counters, job_id), 'lost', 1)
    state, new = 'lost', 1
  elseif state ~= 'nowhere' then
    redis.call('ZADD', dispatched, now_ms + after_ms, member)
    if state ~= 'unknown' and (f[6] ~= state or state == 'reindexed') then
      local fields = {'audit', state, 'audit_ms', now_ms}
      if REASONS[state] then fields[#fields + 1] = 'reason'; fields[#fields + 1] = REASONS[state] end
      redis.call('HSET', entry.key, unpack(fields))
      count('recovered_' .. state)
      new = 1
    end
  end
  out[#out + 1] = {state, new, copies, tonumber(f[5] or '0')}
end
for name, n in pairs(totals) do redis.call('HINCRBY', counters, name, n) end
return out
