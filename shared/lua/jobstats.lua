-- jobstats: read the per-job metrics of a batch of jobs (scheduler.fleetmetrics, at scrape
-- time): one call instead of two commands per job, which cost the scraping replica more CPU
-- to send and parse than everything else of a scrape. Read-only.
--
-- KEYS[1] job_counters of the first job, KEYS[2] its inflight; KEYS[3], KEYS[4] the second
-- job's, and so on (the caller sends a few hundred jobs per call, so Redis never stalls long).
-- ARGV[1] unused (no ARGV).
--
-- Returns, per job, {the counters hash as HGETALL returns it, ZCARD of the slots}.
local out = {}
for i = 1, #KEYS, 2 do
  out[#out + 1] = {redis.call('HGETALL', KEYS[i]), redis.call('ZCARD', KEYS[i + 1])}
end
return out
