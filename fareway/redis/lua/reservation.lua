-- Returns a budget reservation's amounts to its month's spend hash; 1 if there was one, else 0.
-- Shared by budget_release.lua and ledger_record.lua, which settles a recorded request's reservation.
local function release(reservations, spend, field)
  local reserved = redis.call('HGET', reservations, field)
  if not reserved then
    return 0
  end
  redis.call('HDEL', reservations, field)
  for name, amount in string.gmatch(reserved, '([^=;]+)=([^;]+)') do
    if name ~= 'at' and name ~= 'month' then
      redis.call('HINCRBY', spend, name, -tonumber(amount))
    end
  end
  return 1
end
