-- Admits one request against its team's and project's rate and concurrency limits, or none of them.
-- KEYS: 1 rate, 2 team in-flight set, 3 project in-flight set, 4 the request_id's claim (optional)
-- ARGV: 1 request id, 2 tokens, 3 slot lease (us), 4 now (us; "" reads Redis's clock),
--       5 the claim's owner ("": no claim; a claim another run owns: nothing counted, {2}),
--       then per scope (one or two: the team, the project): name, rpm, tpm, concurrent (-1: none)
-- Returns {1} admitted, {2} not this run's claim, or {0, scope, limit, value, retry after (us; -1: never)}.
if ARGV[5] ~= '' and redis.call('HGET', KEYS[4], 'owner') ~= ARGV[5] then
  return {2}
end
local now = now_us(ARGV[4])
local tokens = tonumber(ARGV[2])
-- Times are doubles: allow the rounding of a long burst's sums (a millisecond's early admission at most).
local slack = 1000
local writes = {}
for i = 6, #ARGV, 4 do
  local scope, rpm, tpm, concurrent = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
  for _, bucket in ipairs({{'rpm', rpm, 1}, {'tpm', tpm, tokens}}) do
    local name, limit, cost = bucket[1], bucket[2], bucket[3]
    if limit > 0 then
      if cost > limit then
        return {0, scope, 'tpm_request', tostring(limit), '-1'}
      end
      local interval = MINUTE_US / limit
      local tat = math.max(tonumber(redis.call('HGET', KEYS[1], scope .. ':' .. name) or '0'), now)
      local new_tat = tat + cost * interval
      if new_tat - now > MINUTE_US + slack then
        return {0, scope, name, tostring(limit), string.format('%.0f', math.max(new_tat - now - MINUTE_US, 1))}
      end
      table.insert(writes, {scope .. ':' .. name, new_tat})
    end
  end
  if concurrent > 0 then
    local set = scope == 'team' and KEYS[2] or KEYS[3]
    redis.call('ZREMRANGEBYSCORE', set, '-inf', now)
    if redis.call('ZCARD', set) >= concurrent then
      return {0, scope, 'concurrent', tostring(concurrent), '1000000'}
    end
    table.insert(writes, {set})
  end
end
for _, w in ipairs(writes) do
  if w[2] then
    redis.call('HSET', KEYS[1], w[1], string.format('%.17g', w[2]))
  else
    redis.call('ZADD', w[1], now + tonumber(ARGV[3]), ARGV[1])
  end
end
return {1}
