-- parmap: a parallel map for Lua 5.4 on forked worker processes.
--
-- This is the friendly front: it checks arguments (every message names the
-- argument), gives the call semantics of Python's parmapper, draws progress
-- and builds error objects. The C half (parmap.core) runs the workers.
-- When the module is compiled into a C host, the core table is passed in.

local core = ...
if type(core) ~= "table" then core = require "parmap.core" end

-- No accidental SPMD (issue 13): in an MPI job of several processes that
-- parmap-mpi did not start, every rank would run the whole script.
do
  local function n(var) return tonumber(os.getenv(var) or "") or 0 end
  local size = math.max(n("OMPI_COMM_WORLD_SIZE"), n("PMI_SIZE"),
    n("PMIX_SIZE"), n("SLURM_STEP_NUM_TASKS"))
  if size > 1 and os.getenv("PARMAP_MPI") == nil then
    error(string.format("parmap: this script runs as one of %d processes of an "
      .. "MPI job (or srun step), so each would run all of it; start it "
      .. "through parmap-mpi, which runs it once and the maps on every node: "
      .. "mpirun -n K parmap-mpi script.lua (or srun ... parmap-mpi "
      .. "script.lua)", size), 2)
  end
end
local Progress = require "parmap.progress"

local error, type, select, tostring, setmetatable, getmetatable, next =
  error, type, select, tostring, setmetatable, getmetatable, next
local math_type, tointeger = math.type, math.tointeger
local format = string.format

local M = {}
M._VERSION = "0.1.0"

-- star = parmap.None: the item is counted but not passed.
M.None = setmetatable({}, {
  __name = "parmap.None",
  __tostring = function() return "parmap.None" end,
  __newindex = function() error("parmap.None is read-only", 2) end,
})

---------------------------------------------------------------- errors

local Error = {}
Error.__index = Error
Error.__name = "parmap.Error"

function Error.__tostring(e)
  local s
  if e.index == nil then -- a ReturnProcess
    s = format("parmap: process %d failed: %s", e.pid, e.message)
  elseif e.rank then -- the MPI backend: a worker of a node agent
    s = format("parmap: item %d failed in worker %d on %s (rank %d): %s",
      e.index, e.pid, tostring(e.host), e.rank, e.message)
  else
    s = format("parmap: item %d failed in %s %d: %s", e.index,
      e.pid == core.pid() and "process" or "worker", e.pid, e.message)
  end
  if e.where then s = s .. "\n(raised to the loop at " .. e.where .. ")" end
  if e.traceback ~= "" then s = s .. "\n" .. e.traceback end
  return s
end

-- kind: "error" (fn raised), "value" (a result cannot travel), "died" (the
-- worker ended), "timeout" (the item ran past opts.timeout). index is nil
-- for a ReturnProcess.
local function make_error(index, kind, err, message, traceback, pid)
  return setmetatable({ index = index, kind = kind, err = err,
    message = message, traceback = traceback or "", pid = pid }, Error)
end

-- "file:line" of the code that consumed a failed item: the first frame
-- above where(level)'s caller at `level` that is neither C nor parmap's own
-- Lua code (the loop, or the call of parmap.map). nil without a debug library.
local getinfo = debug and debug.getinfo
local OWN = {} -- the sources of parmap's own Lua files
if getinfo then OWN[getinfo(1, "S").source] = true end
local function where(level)
  if not getinfo then return nil end
  level = level + 1
  while true do
    local info = getinfo(level, "Sl")
    if info == nil then return nil end
    if info.what ~= "C" and info.currentline > 0 and not OWN[info.source] then
      return info.short_src .. ":" .. info.currentline
    end
    level = level + 1
  end
end

-- make_error for an error the map raises to its loop: it names the loop.
local function make_raised_error(...)
  local e = make_error(...)
  e.where = where(1)
  return e
end

--- Is v an error object of parmap?
function M.iserror(v)
  return getmetatable(v) == Error
end

---------------------------------------------------------------- values

local SCALAR = { ["nil"] = true, boolean = true, number = true, string = true }

local function keypath(k)
  if type(k) == "string" then
    if k:match("^[%a_][%w_]*$") then return "." .. k end
    return format("[%q]", k)
  elseif math_type(k) == "float" then
    return format("[%.17g]", k)
  elseif type(k) == "table" then
    return "[<table>]"
  end
  return "[" .. tostring(k) .. "]"
end

-- Where, breadth first, the first value that cannot travel sits in v.
-- A table's path is kept as (parent, step) and spelt out only once found:
-- building every path string would cost O(depth^2) on deep nesting.
local function find_unsendable(v)
  local t = type(v)
  if SCALAR[t] then return nil end
  if t ~= "table" then return "", t end
  local seen, queue, parent, step, head = { [v] = true }, { v }, { 0 }, { "" }, 1
  local function path(i, last)
    local parts = { last }
    while i > 1 do parts[#parts + 1] = step[i]; i = parent[i] end
    local n = #parts
    for j = 1, n // 2 do parts[j], parts[n + 1 - j] = parts[n + 1 - j], parts[j] end
    if n > 24 then -- the first and last steps of a deep path
      return table.concat(parts, "", 1, 12) .. format("...(%d levels)...", n - 24)
        .. table.concat(parts, "", n - 11, n)
    end
    return table.concat(parts)
  end
  while queue[head] do
    local tbl, me = queue[head], head
    head = head + 1
    for k, x in next, tbl do
      local kt, xt = type(k), type(x)
      if kt == "table" then
        if not seen[k] then
          seen[k] = true
          local q = #queue + 1
          queue[q], parent[q], step[q] = k, me, "[<table>]"
        end
      elseif not SCALAR[kt] then
        return path(me, ""), kt .. " (as a key)"
      end
      if xt == "table" then
        if not seen[x] then
          seen[x] = true
          local q = #queue + 1
          queue[q], parent[q], step[q] = x, me, keypath(k)
        end
      elseif not SCALAR[xt] then
        return path(me, keypath(k)), xt
      end
    end
  end
end

-- describe("result"|"item", index, values...): why they cannot travel.
local function describe(what, index, ...)
  local n = select("#", ...)
  for j = 1, n do
    local path, t = find_unsendable((select(j, ...)))
    if path then
      local head
      if index == nil then -- a ReturnProcess
        head = n > 1 and format("result %d", j) or "result"
      elseif what == "item" then
        head = format("parmap: item %d", index)
      elseif n > 1 then
        head = format("result %d of item %d", j, index)
      else
        head = format("result of item %d", index)
      end
      return format("%s: cannot send a %s%s", head, t,
        path ~= "" and (" at " .. path) or "")
    end
  end
  if index == nil then return what .. ": cannot send this value" end
  return format("%s of item %d: cannot send this value", what, index)
end
M._describe = describe -- for tests

---------------------------------------------------------------- options

local OPTIONS = { N = true, star = true, kwstar = true, args = true,
  kwargs = true, chunksize = true, ordered = true, progress = true,
  total = true, exception = true, timeout = true, backend = true }
local BACKEND = { auto = true, fork = true, mpi = true }
local EXCEPTION = { raise = 0, ["return"] = 1, proc = 2 }

local function callable(f)
  if type(f) == "function" then return true end
  local mt = getmetatable(f)
  return type(mt) == "table" and mt.__call ~= nil
end

local function typename(v)
  local mt = getmetatable(v)
  return type(mt) == "table" and type(mt.__name) == "string" and mt.__name
    or type(v)
end

local function bad(level, name, what, got)
  error(format("parmap: bad option '%s' (%s expected, got %s)", name, what,
    got), level + 1)
end

local function posint(v)
  local i = tointeger(v)
  return i and i >= 1 and i or nil
end

-- Check parmap's arguments; return the spec core.start takes.
local function check(level, fn, items, opts)
  level = level + 1
  if not callable(fn) then
    error(format("parmap: bad argument #1 'fn' (function expected, got %s)",
      typename(fn)), level)
  end
  local it = type(items)
  if it ~= "table" and it ~= "function" then
    error(format("parmap: bad argument #2 'items' (table or function expected, got %s)",
      typename(items)), level)
  end
  if opts == nil then opts = {} end
  if type(opts) ~= "table" then
    error(format("parmap: bad argument #3 'opts' (table expected, got %s)",
      typename(opts)), level)
  end
  for k in next, opts do
    if not OPTIONS[k] then
      error(format("parmap: unknown option '%s'", tostring(k)), level)
    end
  end
  local spec = { fn = fn, items = items, from_table = it == "table" and 1 or 0,
    make_error = make_error, describe = describe }

  local N = opts.N
  if N == nil then
    N = core.ncpu()
  elseif not posint(N) then
    bad(level, "N", "positive integer", tostring(N))
  end
  spec.N = posint(N)

  local star = opts.star
  if star == nil or star == false then
    spec.star = 0
  elseif star == true then
    spec.star = 1
  elseif star == M.None then
    spec.star = 2
  else
    bad(level, "star", "true, false or parmap.None", tostring(star))
  end
  local kwstar = opts.kwstar
  if kwstar ~= nil and type(kwstar) ~= "boolean" then
    bad(level, "kwstar", "boolean", typename(kwstar))
  end
  spec.kwstar = kwstar and 1 or 0

  local args = opts.args
  if args == nil then
    args = {}
  elseif type(args) ~= "table" then
    bad(level, "args", "table", typename(args))
  end
  local nargs = args.n
  if nargs == nil then
    nargs = #args
  elseif not tointeger(nargs) or nargs < 0 then
    bad(level, "args.n", "non-negative integer", tostring(nargs))
  end
  spec.args, spec.nargs = args, tointeger(nargs)

  local kwargs = opts.kwargs
  if kwargs ~= nil and type(kwargs) ~= "table" then
    bad(level, "kwargs", "table", typename(kwargs))
  end
  spec.kwargs = kwargs
  spec.has_kw = (kwargs ~= nil or kwstar) and 1 or 0

  local total = opts.total
  if total ~= nil then
    total = tointeger(total)
    if not total or total < 0 then
      bad(level, "total", "non-negative integer", tostring(opts.total))
    end
  end
  if it == "table" then
    local n = items.n
    if n ~= nil then
      n = tointeger(n)
      if not n or n < 0 then
        error(format("parmap: bad argument #2 'items' (items.n must be a non-negative integer, got %s)",
          tostring(items.n)), level)
      end
    else
      n = #items
    end
    total = n
  end
  spec.total = total

  local chunksize = opts.chunksize
  if chunksize ~= nil then
    if chunksize == -1 then
      if not total then
        error("parmap: chunksize = -1 needs a known total (a table, or the 'total' option)",
          level)
      end
      chunksize = (total + spec.N - 1) // spec.N
      if chunksize < 1 then chunksize = 1 end
    elseif not posint(chunksize) then
      bad(level, "chunksize", "positive integer or -1", tostring(chunksize))
    end
    spec.chunksize = posint(chunksize)
  end

  local ordered = opts.ordered
  if ordered ~= nil and type(ordered) ~= "boolean" then
    bad(level, "ordered", "boolean", typename(ordered))
  end
  spec.ordered = ordered == false and 0 or 1

  local exception = opts.exception
  if exception == nil then
    exception = spec.N > 1 and "raise" or "proc"
  elseif not EXCEPTION[exception] then
    bad(level, "exception", "'raise', 'return' or 'proc'", tostring(exception))
  end
  spec.exception, spec.exception_name = EXCEPTION[exception], exception

  local progress = opts.progress
  if progress == true or type(progress) == "string" then
    spec.bar = Progress.bar(progress ~= true and progress or nil)
    spec.progress = spec.bar.fn
  elseif callable(progress) then
    spec.progress = Progress.callback(progress)
  elseif progress ~= nil and progress ~= false then
    bad(level, "progress", "boolean, string or function", typename(progress))
  end

  local timeout = opts.timeout
  if timeout ~= nil then
    if type(timeout) ~= "number" or not (timeout > 0) then
      bad(level, "timeout", "positive number of seconds", tostring(timeout))
    end
    spec.timeout = timeout -- with N = 1 too: then one worker process runs
  end

  local backend = opts.backend
  if backend == nil then backend = "auto" end
  if not BACKEND[backend] then
    bad(level, "backend", "'auto', 'fork' or 'mpi'", tostring(backend))
  end
  spec.backend, spec.user_N = backend, opts.N
  return spec
end

---------------------------------------------------------------- serial

-- The to-be-closed value a serial map returns, so that every map has the
-- same four-value protocol.
local Serial = { __name = "parmap.SerialMap" }
Serial.__index = Serial
function Serial.__close(s) s.closed = true end
Serial.close = Serial.__close

local call = core.call

-- N = 1: a plain loop in this process, no fork.
local function serial(spec)
  local fn, items, from_table = spec.fn, spec.items, spec.from_table == 1
  local star, kwstar, args, nargs = spec.star, spec.kwstar == 1, spec.args,
    spec.nargs
  local has_kw, kwargs, total = spec.has_kw == 1, spec.kwargs, spec.total
  local exception, progress = spec.exception_name, spec.progress
  local state = setmetatable({ closed = false }, Serial)
  local i, ended = 0, false

  local function finish(...)
    if progress then progress(i, total, false) end
    return i, ...
  end

  local function outcome(status, ...)
    if status == "ok" then return finish(...) end
    if status == "shape" then error((...), 0) end
    local err, message, traceback = ...
    local e = make_error(i, "error", err, message, traceback, core.pid())
    if exception == "raise" then
      e.where = where(1)
      error(e, 0)
    end
    return finish(e)
  end

  local function step()
    if ended or state.closed then return nil end
    local item
    if from_table then
      if i < total then item = items[i + 1] end
    else
      item = items()
    end
    if (from_table and i >= total) or (not from_table and item == nil) then
      ended = true
      if progress then progress(i, total, true) end
      return nil
    end
    i = i + 1
    if exception == "proc" then
      return finish(call(fn, item, i, star, kwstar, args, nargs, has_kw,
        kwargs, false))
    end
    return outcome(call(fn, item, i, star, kwstar, args, nargs, has_kw,
      kwargs, true))
  end
  return step, nil, nil, state
end

---------------------------------------------------------------- the API

-- Upstream stages: parmap.values(...) registers the iterator it returns
-- with the to-be-closed value of the stage it reads, so that closing a map
-- that reads it closes that stage too (see lua/parmap/process.lua).
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

local function start(level, fn, items, opts)
  local spec = check(level + 1, fn, items, opts)
  if spec.exception_name == "raise" then spec.make_error = make_raised_error end
  local f, s, c, closer
  local mpi = spec.backend ~= "fork" and package.loaded["parmap.mpi"]
  if spec.backend == "mpi" and not mpi then
    error("parmap: backend 'mpi' needs the script to run under parmap-mpi "
      .. "(mpirun -n K parmap-mpi script.lua)", level + 1)
  end
  if mpi and (spec.backend == "mpi" or (mpi.size() > 1 and not mpi.busy())) then
    -- issue 13: fn travels by value to the node agents (lua/../src/fnenc.c)
    local f0 = fn
    if type(f0) ~= "function" then f0 = function(...) return fn(...) end end
    local ok, rec = pcall(core.dumpfn, f0)
    if not ok then error("parmap: " .. tostring(rec), level + 1) end
    local box = false -- a table with nil items: boxed, as nil ends an iterator
    if spec.from_table == 1 then
      for i = 1, spec.total do
        if items[i] == nil then box = true; break end
      end
    end
    local m = mpi.start(spec, rec, { N = spec.user_N, star = spec.star,
      kwstar = spec.kwstar, args = spec.args, nargs = spec.nargs,
      has_kw = spec.has_kw, kwargs = spec.kwargs, timeout = spec.timeout,
      box = box })
    f, s, c, closer = mpi.next, m, nil, m
  elseif spec.N == 1 and not spec.timeout then
    f, s, c, closer = serial(spec)
  else
    local m = core.start(spec)
    f, s, c, closer = core.next, m, nil, m
  end
  local up = upstream[items]
  if up ~= nil then closer = setmetatable({ closer, up }, Chain) end
  -- closed early, the map ends its bar's line
  if spec.bar then closer = setmetatable({ spec.bar, closer }, Chain) end
  return f, s, c, closer
end

--- for i, r1, r2, ... in parmap.parmap(fn, items, opts) do ... end
function M.parmap(fn, items, opts)
  return start(2, fn, items, opts)
end
M.parmapper = M.parmap
M.imap = M.parmap

--- results, n = parmap.map(fn, items, opts): the first value of each item.
function M.map(fn, items, opts)
  local f, s, c, closer <close> = start(2, fn, items, opts)
  if f == core.next then -- parallel: collected in C, no Lua loop per item
    return core.collect(s)
  end
  local out, n = {}, 0
  for i, r in f, s, c do
    out[i] = r
    if i > n then n = i end
  end
  return out, n
end

--- The number of CPUs this process may run on (the default N).
M.ncpu = core.ncpu
--- Monotonic time in seconds, for timing maps.
M.now = core.now
--- print's values on stdout, above the progress bar when one is drawn.
M.print = Progress.print

-- ReturnProcess, ParEval and pipelines live in their own file.
require("parmap.process")(M, core, {
  make_error = make_error, describe = describe, check = check,
  callable = callable, typename = typename, Error = Error,
  upstream = upstream, close_value = close_value,
})
if getinfo then OWN[getinfo(M.values, "S").source] = true end

return setmetatable(M, {
  __call = function(_, fn, items, opts) return start(2, fn, items, opts) end,
})
