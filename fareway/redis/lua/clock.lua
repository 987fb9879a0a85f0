-- Redis's clock, which every gateway replica shares: now in microseconds, unless the caller
-- gives a time (tests and benchmarks do).
local MINUTE_US = 60000000
local function now_us(given)
  local now = tonumber(given)
  if now then
    return now
  end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
