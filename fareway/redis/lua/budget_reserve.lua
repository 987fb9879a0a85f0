-- Holds a request's maximum cost against its team's and project's monthly budgets.
-- KEYS: 1 budgets, 2 spend (this month), 3 reservations, 4 alerts, 5 the request_id's claim (optional)
-- ARGV: 1 reservation field, 2 project scope, 3 max cost nusd, 4 max list nusd, 5 now (unix s), 6 month,
--       7 the claim's owner ("": no claim)
-- Returns {1} held, {2} no budget applies (nothing held), {3} not this run's claim (nothing held), or
-- {0, scope, hard, spent, reserved, basis}: a hard budget would be passed.
if ARGV[7] ~= '' and redis.call('HGET', KEYS[5], 'owner') ~= ARGV[7] then
  return {3}
end
local scopes = {'team', ARGV[2]}
local amounts = {cost = tonumber(ARGV[3]), list = tonumber(ARGV[4])}
local budgeted = false
for _, scope in ipairs(scopes) do
  local budget = redis.call('HGET', KEYS[1], scope)
  if budget then
    budgeted = true
    local hard = tonumber(string.match(budget, 'hard_nusd=(%-?%d+)'))
    local soft = tonumber(string.match(budget, 'soft_nusd=(%-?%d+)'))
    local basis = string.match(budget, 'basis=(%a+)')
    local spent = tonumber(redis.call('HGET', KEYS[2], scope .. ':' .. basis) or '0')
    local reserved = tonumber(redis.call('HGET', KEYS[2], scope .. ':reserved_' .. basis) or '0')
    if hard >= 0 and spent + reserved + amounts[basis] > hard then
      return {0, scope, tostring(hard), tostring(spent), tostring(reserved), basis}
    end
    if soft >= 0 and spent >= soft and redis.call('HSETNX', KEYS[2], scope .. ':soft_alerted', ARGV[5]) == 1 then
      redis.call('XADD', KEYS[4], '*', 'scope', scope, 'month', ARGV[6], 'basis', basis,
                 'soft_nusd', tostring(soft), 'spent_nusd', tostring(spent), 'at', ARGV[5])
    end
  end
end
if not budgeted then
  return {2}
end
local held = {}
for _, scope in ipairs(scopes) do
  for _, basis in ipairs({'cost', 'list'}) do
    if amounts[basis] > 0 then
      local field = scope .. ':reserved_' .. basis
      redis.call('HINCRBY', KEYS[2], field, amounts[basis])
      table.insert(held, field .. '=' .. amounts[basis])
    end
  end
end
table.insert(held, 'at=' .. ARGV[5])
table.insert(held, 'month=' .. ARGV[6])
redis.call('HSET', KEYS[3], ARGV[1], table.concat(held, ';'))
return {1}
