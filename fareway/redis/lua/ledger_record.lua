-- Records a batch of one team's usage records atomically (accounting/ledger.py): each record not
-- recorded before is appended to the ledger, added to its hour's and month's rollups and to its month's
-- spend; each record's budget reservation is released. Returns how many records were new.
-- KEYS: 1 ledger, 2 reservations, 3 the hour rollups' index, 4 the month rollups' index, then per record:
--       its request id's entry (deduplication), its hour's rollup, its month's rollup, its month's spend,
--       the spend of its reservation's month
-- ARGV: 1 retention (s), 2 trim (ledger ids below it are dropped), 3 number of records, then per record:
--       JSON, hour, month, hour start, month start, rollup cell, metrics (comma-separated, in the order of
--       the names below), spend fields and amounts ("field=amount;..."), reservation field ('' if none)
local metric_names = {${METRIC_NAMES}}
local ttl, trim, n = ARGV[1], ARGV[2], tonumber(ARGV[3])
local indexes = {KEYS[3], KEYS[4]}
local indexed = {}
local added = 0
local k, a = 5, 4
for _ = 1, n do
  local recorded, rollups, spend, reservation_spend = KEYS[k], {KEYS[k + 1], KEYS[k + 2]}, KEYS[k + 3], KEYS[k + 4]
  local body, buckets, starts = ARGV[a], {ARGV[a + 1], ARGV[a + 2]}, {ARGV[a + 3], ARGV[a + 4]}
  local cell, metrics, increments, reservation = ARGV[a + 5], ARGV[a + 6], ARGV[a + 7], ARGV[a + 8]
  k, a = k + ${KEYS_PER_RECORD}, a + ${ARGS_PER_RECORD}
  if reservation ~= '' then
    release(KEYS[2], reservation_spend, reservation)
  end
  if redis.call('EXISTS', recorded) == 0 then
    local entry = redis.call('XADD', KEYS[1], 'MINID', '~', trim, '*', 'json', body)
    redis.call('SET', recorded, entry, 'EX', ttl)
    for l = 1, 2 do
      if not indexed[rollups[l]] then
        redis.call('ZADD', indexes[l], starts[l], buckets[l])
        indexed[rollups[l]] = true
      end
      local m = 0
      for amount in string.gmatch(metrics, '[^,]+') do
        m = m + 1
        if amount ~= '0' then
          redis.call('HINCRBY', rollups[l], cell .. '\30' .. metric_names[m], amount)
        end
      end
    end
    for field, amount in string.gmatch(increments, '([^=;]+)=([^;]+)') do
      redis.call('HINCRBY', spend, field, amount)
    end
    added = added + 1
  end
end
return added
