-- decide: decide each fire once, fleet-wide (shared.fleet.FireLedger.decide).
--
-- KEYS[1] counters, KEYS[2] last_fire, KEYS[3] buffered, KEYS[4] fence, KEYS[5] dispatched.
-- ARGV[1] key templates (see common.lua), ARGV[2] history_limit, ARGV[3] fire_ttl_s,
-- ARGV[4] owner, ARGV[5] fence_window_ms, ARGV[6] audit_after_ms, ARGV[7] audit_margin_ms, then two
-- values per fire: its fields joined by "\31" and its payload (the encoded broker message; empty
-- unless dispatched).
-- Fire fields: scheduled_at, job_id, task_id, outcome, reason, trigger, max_instances, overlap, slot_lapse_ms, deadline_ms, list_key, expiry_ms
--
-- Returns, per fire, the outcome this call decided (dispatched, coalesced, skipped, missed,
-- buffered) or 'decided': its fire hash exists, or the job's fence watermark is at or after it
-- (its record was retired). Each pushed fire retires up to two of the job's oldest records
-- beyond the history limit (see retire in common.lua), so the records per job stay bounded.
-- A skipped fire also counts, in KEYS[1] only, as skipped_paused, skipped_overlap or
-- skipped_other (its reason), for the metrics' chronoq_fires_skipped_total{reason}.
-- A dispatched fire joins KEYS[5] until its run starts, scored with when the dispatch audit
-- (scheduler.audit) is to look at it (audit_due in common.lua: its dispatch time plus
-- audit_after_ms, or its message's expiry plus audit_margin_ms if sooner).
--#include common.lua
local function fields(s)
  local t, start = {}, 1
  while true do
    local stop = string.find(s, '\31', start, true)
    if not stop then t[#t + 1] = string.sub(s, start); return t end
    t[#t + 1] = string.sub(s, start, stop - 1)
    start = stop + 1
  end
end
local limit, fire_ttl, owner, window_ms = tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
local audit_after_ms, audit_margin_ms = tonumber(ARGV[6]), tonumber(ARGV[7])
local counters, last_fire, buffered, fence = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local out, last, totals, sent = {}, {}, {}, {}
local n = (#ARGV - 7) / 2
for i = 0, n - 1 do
  local f = fields(ARGV[8 + 2*i])
  local payload = ARGV[9 + 2*i]
  local scheduled_at, job_id, task_id, outcome, reason = f[1], f[2], f[3], f[4], f[5]
  local trigger, max_instances, overlap = f[6], tonumber(f[7]), f[8]
  local slot_lapse_ms, deadline_ms, list_key, expiry_ms = tonumber(f[9]), f[10], f[11], tonumber(f[12])
  local fire = key(T.fire, job_id, scheduled_at)
  if redis.call('EXISTS', fire) == 1 or fenced(fence, job_id, scheduled_at) then
    out[i + 1] = 'decided'
  else
    local inflight, buffer = key(T.inflight, job_id), key(T.buffer, job_id)
    if outcome == 'dispatched' then
      redis.call('ZREMRANGEBYSCORE', inflight, '-inf', now_ms)
      if overlap ~= 'allow' and redis.call('ZCARD', inflight) >= max_instances then
        if overlap == 'buffer_one' and redis.call('EXISTS', buffer) == 0 then
          redis.call('HSET', buffer, 'task_id', task_id, 'scheduled_at', scheduled_at, 'list_key', list_key,
                     'payload', payload, 'slot_lapse_ms', slot_lapse_ms, 'deadline_ms', deadline_ms, 'max_instances', max_instances,
                     'expiry_ms', expiry_ms, 'audit_after_ms', audit_after_ms, 'audit_margin_ms', audit_margin_ms)
          redis.call('SADD', buffered, job_id)
          outcome, reason = 'buffered', 'waiting for one of ' .. max_instances .. ' slots'
        else
          outcome = 'skipped'
          reason = 'overlap: ' .. max_instances .. ' already queued or running'
          if overlap == 'buffer_one' then reason = reason .. ', one already waiting' end
        end
      end
    end
    if outcome == 'dispatched' then
      redis.call('ZADD', inflight, now_ms + slot_lapse_ms, task_id)
      redis.call('LPUSH', list_key, payload)
      sent[#sent + 1] = audit_due(expiry_ms, audit_after_ms, audit_margin_ms)
      sent[#sent + 1] = dispatched_member(job_id, scheduled_at)
      if trigger ~= 'backfill' then  -- a backfilled past fire must not move restart catch-up back
        last[#last + 1] = job_id
        last[#last + 1] = last_fire_json(scheduled_at, now_ms, task_id)
      end
      redis.call('HSET', fire, 'outcome', outcome, 'reason', reason, 'task_id', task_id, 'scheduled_at', scheduled_at,
                 'job_id', job_id, 'decided_ms', now_ms, 'owner', owner, 'trigger', trigger, 'dispatched_ms', now_ms)
    else
      redis.call('HSET', fire, 'outcome', outcome, 'reason', reason, 'task_id', task_id, 'scheduled_at', scheduled_at,
                 'job_id', job_id, 'decided_ms', now_ms, 'owner', owner, 'trigger', trigger)
    end
    redis.call('EXPIRE', fire, fire_ttl)
    local depth = redis.call('LPUSH', key(T.history, job_id), scheduled_at)
    if depth > limit then retire(fence, KEYS[5], job_id, depth, limit, window_ms, 2) end
    if outcome ~= 'buffered' then
      totals[outcome] = (totals[outcome] or 0) + 1
      if outcome == 'skipped' then
        local why = 'skipped_other'
        if reason == 'paused' then why = 'skipped_paused' elseif string.sub(reason, 1, 7) == 'overlap' then why = 'skipped_overlap' end
        totals[why] = (totals[why] or 0) + 1
      end
      redis.call('HINCRBY', key(T.job_counters, job_id), outcome, 1)
    end
    out[i + 1] = outcome
  end
end
-- In slices: unpack() is bounded by Lua's C stack. A job fired twice in a batch keeps its
-- later fire, as with one HSET per fire.
for first = 1, #last, 1000 do
  redis.call('HSET', last_fire, unpack(last, first, math.min(first + 999, #last)))
end
for first = 1, #sent, 1000 do
  redis.call('ZADD', KEYS[5], unpack(sent, first, math.min(first + 999, #sent)))
end
for outcome, count in pairs(totals) do
  redis.call('HINCRBY', counters, outcome, count)
end
return out
