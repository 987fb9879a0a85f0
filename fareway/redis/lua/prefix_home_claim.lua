-- Claims the home worker of a prompt prefix among the caller's candidates (gateway/shared_homes.py).
-- KEYS: homes, used, held. ARGV: digest, prefix tokens, now, max keys, idle cutoff (unix s), then the
-- candidates in rendezvous order as (name, KV capacity in tokens) pairs. Returns the home's worker name.
local homes, used, held = KEYS[1], KEYS[2], KEYS[3]
local digest, tokens, now, max_keys = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local function forget(oldest)
  local gone = redis.call('HGET', homes, oldest)
  if gone then
    local worker, homed = string.match(gone, '^(.*)\t(%d+)$')
    redis.call('HINCRBY', held, worker, -tonumber(homed))
    redis.call('HDEL', homes, oldest)
  end
  redis.call('ZREM', used, oldest)
end
-- Prefixes no replica has claimed for a while have left the caches: a few at a time, oldest first.
for _, idle in ipairs(redis.call('ZRANGEBYSCORE', used, '-inf', ARGV[5], 'LIMIT', 0, 8)) do
  forget(idle)
end
local home = redis.call('HGET', homes, digest)
if home then
  local worker = string.match(home, '^(.*)\t')
  for i = 6, #ARGV, 2 do
    if ARGV[i] == worker then
      redis.call('ZADD', used, now, digest)
      return worker
    end
  end
  forget(digest)
end
local best, best_room
for i = 6, #ARGV, 2 do
  local capacity = tonumber(ARGV[i + 1])
  local homed = tonumber(redis.call('HGET', held, ARGV[i]) or '0')
  local room = -homed
  if capacity > 0 then room = 1 - homed / capacity end
  if best_room == nil or room > best_room then best, best_room = ARGV[i], room end
end
redis.call('HSET', homes, digest, best .. '\t' .. tokens)
redis.call('HINCRBY', held, best, tokens)
redis.call('ZADD', used, now, digest)
while redis.call('ZCARD', used) > max_keys do
  forget(redis.call('ZRANGE', used, 0, 0)[1])
end
return best
