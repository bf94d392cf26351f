-- jobstats: read the per-job metrics of a batch of jobs (scheduler.fleetmetrics, at scrape
-- time): one call instead of two commands per job, and one short string per job, which the
-- scraping replica compares with the last read and parses only when it changed. Read-only.
--
-- KEYS[1] job_counters of the first job, KEYS[2] its inflight; KEYS[3], KEYS[4] the second
-- job's, and so on (the caller sends a few hundred jobs per call, so Redis never stalls long).
-- ARGV[1] unused (no ARGV).
--
-- Returns, per job, "<slots in use> <field> <value> <field> <value> ..." (ZCARD of the slots,
-- then the counters hash as HGETALL returns it; its fields and values hold no spaces).
local out = {}
for i = 1, #KEYS, 2 do
  local counters = redis.call('HGETALL', KEYS[i])
  out[#out + 1] = redis.call('ZCARD', KEYS[i + 1]) .. ' ' .. table.concat(counters, ' ')
end
return out
