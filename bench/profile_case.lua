-- bench/profile_case.lua MODE N: the hot path alone, for bench/profile.sh.
--   table: x + 1 over N ints from a table, consumed by a for loop
--   iter:  the same from an iterator (items are serialized to workers)
--   map:   parmap.map over the table (the results collected in C)
local parmap = require "parmap"
local mode, n = arg[1] or "table", tonumber(arg[2]) or 100000
local function inc(x) return x + 1 end
local items = {}
for i = 1, n do items[i] = i end
local s = 0
if mode == "table" then
  for _, r in parmap.parmap(inc, items, { N = 2 }) do s = s + r end
elseif mode == "map" then
  local r, cnt = parmap.map(inc, items, { N = 2 })
  s = cnt
else
  local i = 0
  local function it()
    i = i + 1
    if i <= n then return i end
  end
  for _, r in parmap.parmap(inc, it, { N = 2 }) do s = s + r end
end
assert(s > 0)
