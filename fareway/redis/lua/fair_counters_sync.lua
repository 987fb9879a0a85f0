-- Adds one gateway replica's unsent service to a model's virtual token counters; returns them all.
-- KEYS: 1 the model's hash. ARGV: 1 TTL (s), then per tenant: field, floor ("" for none), amount.
for i = 2, #ARGV, 3 do
  local value = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0')
  if ARGV[i + 1] ~= '' then value = math.max(value, tonumber(ARGV[i + 1])) end
  redis.call('HSET', KEYS[1], ARGV[i], string.format('%.17g', value + tonumber(ARGV[i + 2])))
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return redis.call('HGETALL', KEYS[1])
