-- Claims a request_id for one run.
-- KEYS: 1 the claim; ARGV: 1 lease (s), 2 the claiming run's owner token (the admission scripts queued
-- behind the claim count the request only for its owner), 3 the request's fingerprint. Returns {} when
-- claimed, else the stored hash (the caller compares the fingerprints).
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'state', 'running', 'owner', ARGV[2], 'fingerprint', ARGV[3])
  redis.call('EXPIRE', KEYS[1], ARGV[1])
  return {}
end
return redis.call('HGETALL', KEYS[1])
