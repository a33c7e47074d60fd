-- parmap/pareval.lua: parmap.ParEval, a whole-array function evaluated in
-- parallel chunks of its array. Private to parmap: lua/parmap.lua requires
-- it and passes its parmap function.

local Check = require "parmap.check"
local Errors = require "parmap.errors"
local integer, shown, typename = Check.integer, Check.shown, Check.typename
local ncpu = require("parmap.core").ncpu
Errors.own()

local error, type, next, setmetatable, tostring, select =
  error, type, next, setmetatable, tostring, select
local format, move = string.format, table.move

local WHO = "parmap.ParEval"
local OWN = { n_chunks = true, n_eval = true, n_min = true }

-- The chunks of n items: parmapper's rule (ParEval's _chunker), then
-- never an empty chunk and always one chunk for a non-empty input (where
-- parmapper would make empty chunks or divide by zero). A list of
-- {first, last}, 1-based, inclusive.
local function bounds(n, n_chunks, n_eval, n_min)
  local out = {}
  if n == 0 then return out end
  if n_eval then
    n_eval = n_eval > n_min and n_eval or n_min
    n_chunks = (n - 1) // n_eval + 1 -- ceil(n / n_eval), cannot overflow
  end
  if n_min > 0 and n // n_chunks < n_min then n_chunks = n // n_min end
  if n_chunks > n then n_chunks = n end
  if n_chunks < 1 then n_chunks = 1 end
  local size, extra, a = n // n_chunks, n % n_chunks, 1
  for k = 1, n_chunks do
    local b = a + size - 1 + (k <= extra and 1 or 0)
    out[k] = { a, b }
    a = b + 1
  end
  return out
end

return function(parmap)
  local ParEval = { __name = "parmap.ParEval" }
  ParEval.__index = ParEval

  --- parfun = parmap.ParEval(fun, {n_chunks = k | n_eval = m, n_min = j,
  ---   ...parmap options}); y = parfun(X)
  local function new(fun, opts)
    local bad
    opts, bad = Check.constructor(2, WHO, "fun", fun, opts)
    local self, popts = setmetatable({ fun = fun }, ParEval), {}
    for k, v in next, opts do
      if OWN[k] then
        local least = k == "n_min" and 0 or 1
        v = integer(v)
        if not v or v < least then
          bad("bad option '%s' (%s integer expected, got %s)", k,
            least == 0 and "non-negative" or "positive", shown(opts[k]))
        end
        self[k] = v
      elseif k == "chunksize" or k == "total" then
        bad("option '%s' is set by ParEval (one chunk per item)", k)
      elseif not Check.OPTIONS[k] then
        bad("%s", Check.unknown(k, OWN, Check.OPTIONS))
      else
        popts[k] = v
      end
    end
    if self.n_chunks and self.n_eval then
      bad("give n_chunks or n_eval, not both")
    end
    if not self.n_chunks and not self.n_eval then self.n_chunks = ncpu() end
    self.n_min = self.n_min or 0
    Check.map_spec(2, fun, {}, popts) -- the parmap options, checked now
    popts.chunksize = 1
    self.opts = popts
    return self
  end

  --- parfun:bounds(n): the chunks of n items, a list of {first, last}.
  function ParEval:bounds(n)
    local m = integer(n)
    if not m or m < 0 then
      error(format("%s: bad argument #1 'n' (non-negative integer expected, got %s)",
        WHO, shown(n)), 2)
    end
    return bounds(m, self.n_chunks, self.n_eval, self.n_min)
  end

  function ParEval.__call(self, X, ...)
    Check.no_triple(2, WHO, 1, "X", X, select("#", ...) > 0)
    if type(X) ~= "table" then
      error(format("%s: bad argument #1 'X' (table expected, got %s)", WHO,
        typename(X)), 2)
    end
    local n = Check.sequence(2, WHO, 1, "X", X)
    local b = bounds(n, self.n_chunks, self.n_eval, self.n_min)
    -- Chunk k is built on demand where it is used: a worker slices its own
    -- copy of X, so nothing of X travels.
    local chunks = setmetatable({ n = #b }, { __index = function(_, k)
      local ab = b[k]
      if ab then return move(X, ab[1], ab[2], 1, {}) end
    end })
    local parts, has_n = {}, false
    for k, r in parmap(self.fun, chunks, self.opts) do
      -- exception = "return": a whole-array call cannot return a part
      if Errors.iserror(r) then Errors.apply("raise", false, r) end
      if type(r) ~= "table" then
        error(format("%s: chunk %d (items %d..%d) returned a %s, not a sequence",
          WHO, k, b[k][1], b[k][2], typename(r)), 2)
      end
      local rn = r.n
      if rn ~= nil then
        if not integer(rn) or rn < 0 then
          error(format("%s: chunk %d (items %d..%d) returned a table whose n is %s",
            WHO, k, b[k][1], b[k][2], shown(rn)), 2)
        end
        has_n = true
      end
      parts[k] = r
    end
    local out, len = {}, 0
    for k = 1, #b do
      local r = parts[k]
      local rn = integer(r.n) or #r -- 2.0 is 2: out.n stays an integer
      move(r, 1, rn, len + 1, out)
      len = len + rn
    end
    if has_n then out.n = len end
    return out
  end

  return new
end
