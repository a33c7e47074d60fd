-- parmap.process: the rest of parmapper's toolbox.
--   ReturnProcess  one call in a forked child, its values on join
--   ParEval        a whole-array function evaluated in parallel chunks
--   values         a stage's results as the items of the next stage
-- Loaded by lua/parmap.lua, which passes its module table, the C core and
-- its private helpers; adds its functions to the module table.
return function(M, core, private)
  local error, type, next, setmetatable, tostring, select =
    error, type, next, setmetatable, tostring, select
  local format, move = string.format, table.move
  local callable, typename = private.callable, private.typename
  local shown, integer, unknown = private.shown, private.integer,
    private.unknown
  local make_error, describe, check = private.make_error, private.describe,
    private.check
  local upstream = private.upstream

  local EXCEPTION = { raise = 0, ["return"] = 1, proc = 2 }

  -- Check a constructor's two arguments (errors point at its caller);
  -- returns its error function, for the caller's own checks, and opts ({}
  -- for nil).
  local function checker(who, fname, f, opts)
    local function fail(level, msg, ...)
      error(who .. ": " .. format(msg, ...), level + 1)
    end
    if not callable(f) then
      fail(3, "bad argument #1 '%s' (function expected, got %s)", fname, typename(f))
    end
    if opts == nil then
      opts = {}
    elseif type(opts) ~= "table" then
      fail(3, "bad argument #2 'opts' (table expected, got %s)", typename(opts))
    end
    return function(msg, ...) fail(3, msg, ...) end, opts
  end

  -------------------------------------------------------------- ReturnProcess

  local RP_OPTIONS = { args = true, kwargs = true, exception = true }

  --- p = parmap.ReturnProcess(target, {args = {...}, kwargs = {...},
  ---   exception = "raise" | "return" | "proc"}); p:start(); p:join()
  function M.ReturnProcess(target, opts)
    local bad
    bad, opts = checker("parmap.ReturnProcess", "target", target, opts)
    for k in next, opts do
      if not RP_OPTIONS[k] then bad("%s", unknown(k, RP_OPTIONS)) end
    end
    local args, nargs = private.check_args(2, "parmap.ReturnProcess", opts.args)
    local kwargs = opts.kwargs
    if kwargs ~= nil and type(kwargs) ~= "table" then
      bad("bad option 'kwargs' (table expected, got %s)", shown(kwargs))
    end
    local exception = opts.exception
    if exception == nil then exception = "raise" end
    if not EXCEPTION[exception] then
      bad("bad option 'exception' ('raise', 'return' or 'proc' expected, got %s)",
        shown(exception))
    end
    return core.process({ target = target, args = args,
      nargs = nargs, kwargs = kwargs, has_kw = kwargs ~= nil,
      exception = EXCEPTION[exception], make_error = make_error,
      describe = describe })
  end

  -------------------------------------------------------------- ParEval

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

  local ParEval = { __name = "parmap.ParEval" }
  ParEval.__index = ParEval

  --- parfun = parmap.ParEval(fun, {n_chunks = k | n_eval = m, n_min = j,
  ---   ...parmap options}); y = parfun(X)
  function M.ParEval(fun, opts)
    local bad
    bad, opts = checker("parmap.ParEval", "fun", fun, opts)
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
      elseif not private.OPTIONS[k] then
        bad("%s", unknown(k, OWN, private.OPTIONS))
      else
        popts[k] = v
      end
    end
    if self.n_chunks and self.n_eval then
      bad("give n_chunks or n_eval, not both")
    end
    if not self.n_chunks and not self.n_eval then self.n_chunks = core.ncpu() end
    self.n_min = self.n_min or 0
    check(2, fun, {}, popts) -- the parmap options, checked now
    popts.chunksize = 1
    self.opts = popts
    return self
  end

  --- parfun:bounds(n): the chunks of n items, a list of {first, last}.
  function ParEval:bounds(n)
    local m = integer(n)
    if not m or m < 0 then
      error(format("parmap.ParEval: bad argument #1 'n' (non-negative integer expected, got %s)",
        shown(n)), 2)
    end
    return bounds(m, self.n_chunks, self.n_eval, self.n_min)
  end

  function ParEval.__call(self, X, ...)
    if X == private.ipairs_aux or X == next
      or (type(X) == "function" and select("#", ...) > 0) then
      error("parmap.ParEval: bad argument #1 'X' (an iterator triple: "
        .. private.TRIPLE .. ")", 2)
    end
    if type(X) ~= "table" then
      error(format("parmap.ParEval: bad argument #1 'X' (table expected, got %s)",
        typename(X)), 2)
    end
    local n, why = private.seqlen(X, "X")
    if not n then
      error(format("parmap.ParEval: bad argument #1 'X' (%s)", why), 2)
    end
    if private.not_sequence(X, n) then
      error("parmap.ParEval: bad argument #1 'X' ("
        .. private.NOT_SEQUENCE:gsub("#t", "#X") .. ")", 2)
    end
    local b = bounds(n, self.n_chunks, self.n_eval, self.n_min)
    -- Chunk k is built on demand where it is used: a worker slices its own
    -- copy of X, so nothing of X travels.
    local chunks = setmetatable({ n = #b }, { __index = function(_, k)
      local ab = b[k]
      if ab then return move(X, ab[1], ab[2], 1, {}) end
    end })
    local parts, has_n = {}, false
    for k, r in M.parmap(self.fun, chunks, self.opts) do
      if M.iserror(r) then error(r, 0) end -- exception = "return"
      if type(r) ~= "table" then
        error(format("parmap.ParEval: chunk %d (items %d..%d) returned a %s, not a sequence",
          k, b[k][1], b[k][2], typename(r)), 2)
      end
      local rn = r.n
      if rn ~= nil then
        if not integer(rn) or rn < 0 then
          error(format("parmap.ParEval: chunk %d (items %d..%d) returned a table whose n is %s",
            k, b[k][1], b[k][2], tostring(rn)), 2)
        end
        has_n = true
      end
      parts[k] = r
    end
    local out, len = {}, 0
    for k = 1, #b do
      local r = parts[k]
      local rn = r.n or #r
      move(r, 1, rn, len + 1, out)
      len = len + rn
    end
    if has_n then out.n = len end
    return out
  end

  -------------------------------------------------------------- pipelines

  --- parmap.values(f, s, c[, closer]): the values of a stage (any
  --- iterator yielding index, value: a parmap, ipairs...) as an items
  --- function for the next stage. Memory stays bounded: the next stage
  --- pulls one value at a time. A nil value would end the next stage
  --- early, so it is an error naming the item. Closing the next stage's
  --- map closes this stage too.
  function M.values(f, s, c, closer)
    if not callable(f) then
      error(format("parmap.values: bad argument #1 (iterator function expected, got %s)",
        typename(f)), 2)
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
end
