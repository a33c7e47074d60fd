-- parmap/pipeline.lua: one stage's results as the items of the next
-- (parmap.values), and the to-be-closed values that close a stage with the
-- map reading it. Private to parmap: lua/parmap.lua requires it.

local Check = require "parmap.check"
require("parmap.errors").own()

local error, tostring, setmetatable, getmetatable =
  error, tostring, setmetatable, getmetatable
local format = string.format

local P = {}

-- Upstream stages: values(...) registers the iterator it returns with the
-- to-be-closed value of the stage it reads, so that closing a map that
-- reads it closes that stage too.
local upstream = setmetatable({}, { __mode = "k" })

local function close_value(v)
  local mt = getmetatable(v)
  if mt and mt.__close then mt.__close(v) end
end

-- The to-be-closed value of a map that reads another stage: closes both.
local Chain = { __name = "parmap.Pipeline" }
Chain.__index = Chain
function Chain.__close(c)
  close_value(c[1])
  close_value(c[2])
end
Chain.close = Chain.__close

--- A to-be-closed value that closes a, then b.
function P.chain(a, b)
  return setmetatable({ a, b }, Chain)
end

--- The closer of a map over items: closer, and the stage items reads
--- when items came from values().
function P.closer(items, closer)
  local up = upstream[items]
  if up ~= nil then return P.chain(closer, up) end
  return closer
end

--- parmap.values(f, s, c[, closer]): the values of a stage (any
--- iterator yielding index, value: a parmap, ipairs...) as an items
--- function for the next stage. Memory stays bounded: the next stage
--- pulls one value at a time. A nil value would end the next stage
--- early, so it is an error naming the item. Closing the next stage's
--- map closes this stage too.
function P.values(f, s, c, closer)
  if not Check.callable(f) then
    error(format("parmap.values: bad argument #1 (iterator function expected, got %s)",
      Check.typename(f)), 2)
  end
  local done = false
  local function g()
    if done then return nil end
    local i, v = f(s, c)
    if i == nil then
      done = true
      return nil
    end
    c = i
    if v == nil then
      error(format("parmap.values: item %s gave nil, which would end the next stage early (return a table to pass nils)",
        tostring(i)), 0)
    end
    return v
  end
  if closer ~= nil then upstream[g] = closer end
  return g
end

return P
