-- Stores a request_id's outcome.
-- KEYS: 1 the claim; ARGV: 1 seconds to keep the outcome, then its fields and values.
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
