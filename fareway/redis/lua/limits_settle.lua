-- Settles a request's reserved tokens to what it used, and frees its concurrency slots.
-- KEYS: 1 rate, 2 team in-flight set, 3 project in-flight set
-- ARGV: 1 request id, 2 now (us; "" reads Redis's clock), then per scope (one or two):
--       name, token correction (actual - reserved), tpm at admission (0: none), holds a slot (0/1)
local now = now_us(ARGV[2])
for i = 3, #ARGV, 4 do
  local scope, correction, tpm, slot = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2]), ARGV[i + 3]
  if tpm > 0 and correction ~= 0 then
    local field = scope .. ':tpm'
    local tat = tonumber(redis.call('HGET', KEYS[1], field) or '0')
    -- A refund cannot fill the bucket past full; an overrun is a debt later requests wait out.
    tat = math.max(tat + correction * MINUTE_US / tpm, now)
    redis.call('HSET', KEYS[1], field, string.format('%.17g', tat))
  end
  if slot == '1' then
    redis.call('ZREM', scope == 'team' and KEYS[2] or KEYS[3], ARGV[1])
  end
end
return 1
