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
  if e.kind == "init" then -- a worker's init raised: no item ran there
    s = format("parmap: init failed in worker %d (pid %d): %s", e.worker,
      e.pid, e.message)
  elseif e.index == nil then -- a ReturnProcess
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
-- worker ended), "timeout" (the item ran past opts.timeout), "init" (the
-- init option raised; the field worker names the worker). index is nil for
-- a ReturnProcess and for "init". attempts: how many times the item ran (1
-- without the retries option).
local function make_error(index, kind, err, message, traceback, pid, attempts)
  return setmetatable({ index = index, kind = kind, err = err,
    message = message, traceback = traceback or "", pid = pid,
    attempts = attempts or 1 }, Error)
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

-- The options of a map, one a line (a new option is one more line here
-- and its check in `check` below).
local OPTIONS = {
  N = true,
  star = true,
  kwstar = true,
  args = true,
  kwargs = true,
  chunksize = true,
  ordered = true,
  progress = true,
  total = true,
  exception = true,
  timeout = true,
  seed = true,
  init = true,
  finish = true,
  maxtasks = true,
  retries = true,
  buffersize = true,
  backend = true, -- issue 13: "auto", "fork" or "mpi"
  resilient = true, -- issue 13: the MPI backend outlives an agent's death
}
local BACKEND = { auto = true, fork = true, mpi = true }
local EXCEPTION = { raise = 0, ["return"] = 1, proc = 2 }
-- The most extra arguments (args.n) a call may get: they sit on Lua's
-- stack, which holds at most 1,000,000 slots (LUAI_MAXSTACK).
local MAX_ARGS = 100000
M.MAX_ARGS = MAX_ARGS

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

-- A bad value as a message shows it: a number as it is, a string quoted
-- with its type (so that 4 and "4" differ), anything else by its type.
local function shown(v)
  local t = type(v)
  if t == "number" then
    if v ~= v then return "nan" end
    return tostring(v)
  elseif t == "string" then
    if #v > 40 then v = v:sub(1, 37) .. "..." end
    return "string " .. format("%q", v):gsub("\\\n", "\\n")
  end
  return typename(v)
end

-- v as an integer when it is an integer-valued number (3 and 3.0, never
-- the string "3"), else nil.
local function integer(v)
  if type(v) ~= "number" then return nil end
  return tointeger(v)
end

local function bad(level, name, what, v)
  error(format("parmap: bad option '%s' (%s expected, got %s)", name, what,
    shown(v)), level + 1)
end

-- The edit distance of two short strings (Levenshtein), for suggestions.
local function distance(a, b)
  local prev = {}
  for j = 0, #b do prev[j] = j end
  for i = 1, #a do
    local cur, ai = { [0] = i }, a:byte(i)
    for j = 1, #b do
      local cost = ai == b:byte(j) and 0 or 1
      local d = prev[j] + 1
      if cur[j - 1] + 1 < d then d = cur[j - 1] + 1 end
      if prev[j - 1] + cost < d then d = prev[j - 1] + cost end
      cur[j] = d
    end
    prev = cur
  end
  return prev[#b]
end

-- "unknown option 'k'", with the closest known name when there is one
-- (same letters in another case, or a typo or two away). known: a set of
-- names, or a list of sets.
local function unknown(k, known, ...)
  if type(k) ~= "string" then
    return format("unknown option %s (options are named, as in {N = 4})",
      type(k) == "number" and tostring(k) or shown(k))
  end
  local lk, limit, best, bestd = k:lower(), #k <= 3 and 1 or 2, nil, nil
  local sets = { known, ... }
  for s = 1, #sets do
    for name in next, sets[s] do
      local d = distance(lk, name:lower())
      if d <= limit and (not best or d < bestd or (d == bestd and name < best)) then
        best, bestd = name, d
      end
    end
  end
  if #k > 60 then k = k:sub(1, 57) .. "..." end
  if best then
    return format("unknown option '%s' (did you mean '%s'?)", k, best)
  end
  return format("unknown option '%s'", k)
end

-- The length of a sequence argument: t.n when given, else #t; either must
-- be a non-negative integer (#t may come from a __len metamethod). On a
-- bad length: nil and why.
local function seqlen(t, name)
  local n = t.n
  if n ~= nil then
    local i = integer(n)
    if not i or i < 0 then
      return nil, format("%s.n must be a non-negative integer, got %s", name,
        shown(n))
    end
    return i
  end
  n = #t
  local i = integer(n)
  if not i or i < 0 then
    return nil, format("#%s returned %s (its __len), not a non-negative integer",
      name, shown(n))
  end
  return i
end

-- Is t a table with keys but no sequence part ({a = 1}, {[2] = x}), whose
-- length n is 0? Mapping it would silently map nothing. A __len or a t.n
-- says the length on purpose.
local function not_sequence(t, n)
  return n == 0 and t.n == nil and next(t) ~= nil
    and not (getmetatable(t) or {}).__len
end

-- ipairs' iterator: items = ipairs(t) passes it, t and 0.
local ipairs_aux = ipairs({})

local NOT_SEQUENCE = "not a sequence: #t is 0 but it has other keys; to map over its keys or values, collect them into a list first"

-- The hint for a call given an iterator triple instead of items.
local TRIPLE = "pass the table itself (or an items function), not ipairs(t) or pairs(t)"

local function check_args(level, who, args)
  if args == nil then return {}, 0 end
  if type(args) ~= "table" then
    error(format("%s: bad option 'args' (table expected, got %s)", who,
      shown(args)), level + 1)
  end
  local nargs, why = seqlen(args, "args")
  if not nargs then
    if args.n ~= nil then
      error(format("%s: bad option 'args.n' (non-negative integer expected, got %s)",
        who, shown(args.n)), level + 1)
    end
    error(format("%s: bad option 'args' (%s)", who, why), level + 1)
  end
  if nargs > MAX_ARGS then
    error(format("%s: bad option 'args.n' (at most %d arguments, got %d)",
      who, MAX_ARGS, nargs), level + 1)
  end
  return args, nargs
end

-- Check parmap's arguments; return the spec core.start takes. extra: how
-- many arguments came after opts.
local function check(level, fn, items, opts, extra)
  level = level + 1
  if not callable(fn) then
    error(format("parmap: bad argument #1 'fn' (function expected, got %s)",
      typename(fn)), level)
  end
  local it = type(items)
  if items == ipairs_aux or items == next
    or (extra and extra > 0 and it == "function" and type(opts) == "table") then
    error("parmap: bad argument #2 'items' (an iterator triple: " .. TRIPLE .. ")",
      level)
  end
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
    if not OPTIONS[k] then error("parmap: " .. unknown(k, OPTIONS), level) end
  end
  local spec = { fn = fn, items = items, from_table = it == "table" and 1 or 0,
    make_error = make_error, describe = describe }

  local N = opts.N
  if N == nil then
    -- a map inside a worker would otherwise fork N workers per worker
    N = core.worker() and 1 or core.ncpu()
  else
    N = integer(N)
    if not N or N < 1 then bad(level, "N", "positive integer", opts.N) end
  end
  spec.N = N

  local star = opts.star
  if star == nil or star == false then
    spec.star = 0
  elseif star == true then
    spec.star = 1
  elseif star == M.None then
    spec.star = 2
  else
    bad(level, "star", "true, false or parmap.None", star)
  end
  local kwstar = opts.kwstar
  if kwstar ~= nil and type(kwstar) ~= "boolean" then
    bad(level, "kwstar", "boolean", kwstar)
  end
  spec.kwstar = kwstar and 1 or 0

  spec.args, spec.nargs = check_args(level, "parmap", opts.args)

  local kwargs = opts.kwargs
  if kwargs ~= nil and type(kwargs) ~= "table" then
    bad(level, "kwargs", "table", kwargs)
  end
  spec.kwargs = kwargs
  spec.has_kw = (kwargs ~= nil or kwstar) and 1 or 0

  local total = opts.total
  if total ~= nil then
    total = integer(total)
    if not total or total < 0 then
      bad(level, "total", "non-negative integer", opts.total)
    end
  end
  if it == "table" then
    local n, why = seqlen(items, "items")
    if not n then
      error(format("parmap: bad argument #2 'items' (%s)", why), level)
    end
    if not_sequence(items, n) then
      error("parmap: bad argument #2 'items' (" .. NOT_SEQUENCE:gsub("#t", "#items") .. ")",
        level)
    end
    total = n
  end
  spec.total = total

  local chunksize = opts.chunksize
  if chunksize ~= nil then
    local c = integer(chunksize)
    if c == -1 then
      if total then
        c = total > 0 and (total - 1) // N + 1 or 1 -- ceil, no overflow
      else
        io.stderr:write("parmap: chunksize = -1 needs a known total; using automatic chunking\n")
        c = nil
      end
    elseif not c or c < 1 then
      bad(level, "chunksize", "positive integer or -1", chunksize)
    end
    spec.chunksize = c
  end

  local buffersize = opts.buffersize
  if buffersize ~= nil then
    spec.buffersize = integer(buffersize)
    if not spec.buffersize or spec.buffersize < 1 then
      bad(level, "buffersize", "positive integer", buffersize)
    end
  end -- nil: the engine's default

  local ordered = opts.ordered
  if ordered ~= nil and type(ordered) ~= "boolean" then
    bad(level, "ordered", "boolean", ordered)
  end
  spec.ordered = ordered == false and 0 or 1

  local exception = opts.exception
  if exception == nil then
    exception = N > 1 and "raise" or "proc"
  elseif not EXCEPTION[exception] then
    bad(level, "exception", "'raise', 'return' or 'proc'", exception)
  end
  spec.exception, spec.exception_name = EXCEPTION[exception], exception

  local progress = opts.progress
  if progress == true or type(progress) == "string" then
    spec.bar = Progress.bar(progress ~= true and progress or nil)
    spec.progress = spec.bar.fn
  elseif callable(progress) then
    spec.progress = Progress.callback(progress)
  elseif progress ~= nil and progress ~= false then
    bad(level, "progress", "boolean, string or function", progress)
  end

  local timeout = opts.timeout
  if timeout ~= nil then
    if type(timeout) ~= "number" or not (timeout > 0) then
      bad(level, "timeout", "positive number of seconds", timeout)
    end
    -- math.huge is no timeout; else with N = 1 too: then one worker
    -- process runs the items
    if timeout < math.huge then spec.timeout = timeout end
  end

  local seed = opts.seed
  if seed ~= nil then
    spec.seed = integer(seed)
    if not spec.seed then bad(level, "seed", "integer", seed) end
  end

  -- per-worker state: init(id) before a worker's first item, finish(id)
  -- when it ends normally
  for _, name in next, { "init", "finish" } do
    local f = opts[name]
    if f ~= nil and not callable(f) then
      bad(level, name, "function", f)
    end
    spec[name] = f
  end

  local maxtasks = opts.maxtasks
  if maxtasks ~= nil then
    spec.maxtasks = integer(maxtasks)
    if not spec.maxtasks or spec.maxtasks < 1 then
      bad(level, "maxtasks", "positive integer", maxtasks)
    end
  end

  local retries = opts.retries
  if retries ~= nil then
    spec.retries = integer(retries)
    if not spec.retries or spec.retries < 0 then
      bad(level, "retries", "non-negative integer", retries)
    end
  end

  local backend = opts.backend
  if backend == nil then backend = "auto" end
  if not BACKEND[backend] then
    bad(level, "backend", "'auto', 'fork' or 'mpi'", backend)
  end
  spec.backend, spec.user_N = backend, opts.N
  local resilient = opts.resilient
  if resilient ~= nil and type(resilient) ~= "boolean" then
    bad(level, "resilient", "boolean", resilient)
  end
  spec.resilient = resilient or nil
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

-- init and finish of a serial map, run in the caller as worker 1, with the
-- same outcomes as in a worker: init's error is raised as an error object
-- of kind "init"; finish's is written to stderr.
local function serial_init(init)
  local status, err, message, traceback = call(init, 1, 0, 0, false, {},
    0, false, nil, true)
  if status ~= "ok" then
    local e = make_error(nil, "init", err, message, traceback, core.pid())
    e.worker = 1
    error(e, 0)
  end
end

local function serial_finish(fin)
  local status, _, message, traceback = call(fin, 1, 0, 0, false, {},
    0, false, nil, true)
  if status ~= "ok" then
    io.stderr:write(format("parmap worker 1 (pid %d): finish failed: %s\n%s\n",
      core.pid(), message, traceback))
  end
end

-- N = 1: a plain loop in this process, no fork.
local function serial(spec)
  local fn, items, from_table = spec.fn, spec.items, spec.from_table == 1
  local star, kwstar, args, nargs = spec.star, spec.kwstar == 1, spec.args,
    spec.nargs
  local has_kw, kwargs, total = spec.has_kw == 1, spec.kwargs, spec.total
  local exception, progress = spec.exception_name, spec.progress
  local state = setmetatable({ closed = false }, Serial)
  local i, ended, busy = 0, false, false
  local init, fin, started = spec.init, spec.finish, false
  local retries = spec.retries or 0
  -- fn, the items iterator and progress run inside a step: stepping the
  -- map again from there is an error ("busy"); an error ends the map
  local guard = setmetatable({}, { __close = function(_, err)
    busy = false
    if err ~= nil then ended = true end
  end })

  local function finish(...)
    if progress then progress(i, total, false) end
    return i, ...
  end

  -- retries: fn runs again while it raises and runs are left; a bad
  -- shape would fail alike, so it is not run again
  local function again(item, runs, status, ...)
    if status ~= "error" or runs > retries then return runs, status, ... end
    return again(item, runs + 1, call(fn, item, i, star, kwstar, args, nargs,
      has_kw, kwargs, true))
  end

  local function outcome(runs, status, ...)
    if status == "ok" then return finish(...) end
    if status == "shape" then error((...), 0) end
    local err, message, traceback = ...
    if exception == "proc" then error(err, 0) end -- with retries only
    local e = make_error(i, "error", err, message, traceback, core.pid(),
      runs)
    if exception == "raise" then
      e.where = where(1)
      error(e, 0)
    end
    return finish(e)
  end

  local function step()
    if busy then
      error("parmap: map is busy (stepped from inside its own step: fn, a "
        .. "progress callback or the items iterator)", 2)
    end
    if ended or state.closed then return nil end
    busy = true
    local _ <close> = guard
    local item
    if from_table then
      if i < total then item = items[i + 1] end
    else
      item = items()
    end
    if (from_table and i >= total) or (not from_table and item == nil) then
      ended = true
      if started and fin then serial_finish(fin) end
      if progress then progress(i, total, true) end
      return nil
    end
    if not started then -- the one worker is this process, number 1
      started = true
      if init then serial_init(init) end
    end
    i = i + 1
    if exception == "proc" and retries == 0 then
      return finish(call(fn, item, i, star, kwstar, args, nargs, has_kw,
        kwargs, false))
    end
    return outcome(again(item, 1, call(fn, item, i, star, kwstar, args, nargs,
      has_kw, kwargs, true)))
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

-- level: where the entry point's caller is, seen from the entry point (2
-- for a plain function). extra: how many arguments came after opts.
local function start(level, fn, items, opts, extra)
  local spec = check(level + 1, fn, items, opts, extra)
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
    -- items go boxed with their index when a table has nil items (nil
    -- ends an iterator) or for seed (which needs the map's index)
    local box = spec.seed ~= nil
    if spec.from_table == 1 and not box then
      for i = 1, spec.total do
        if items[i] == nil then box = true; break end
      end
    end
    local o = { N = spec.user_N, star = spec.star, kwstar = spec.kwstar,
      args = spec.args, nargs = spec.nargs, has_kw = spec.has_kw,
      kwargs = spec.kwargs, timeout = spec.timeout, box = box,
      seed = spec.seed, maxtasks = spec.maxtasks, retries = spec.retries,
      buffersize = spec.buffersize }
    for _, name in next, { "init", "finish" } do -- they travel as fn does
      local h = spec[name]
      if h ~= nil then
        if type(h) ~= "function" then
          local h0 = h
          h = function(...) return h0(...) end
        end
        local ok2, r2 = pcall(core.dumpfn, h, name)
        if not ok2 then error("parmap: " .. tostring(r2), level + 1) end
        o[name] = r2
      end
    end
    local m = mpi.start(spec, rec, o)
    f, s, c, closer = mpi.next, m, nil, m
  -- timeout, seed: with N = 1 too, the items run in one worker process (a
  -- loop cannot stop itself; seeding must not touch the caller's stream)
  elseif spec.N == 1 and not spec.timeout and not spec.seed then
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

-- The entry points call start and return its values without a tail call:
-- a tail call would drop the entry point's frame, and errors would then
-- blame the wrong line.

--- for i, r1, r2, ... in parmap.parmap(fn, items, opts) do ... end
function M.parmap(fn, items, opts, ...)
  local f, s, c, closer = start(2, fn, items, opts, select("#", ...))
  return f, s, c, closer
end
M.parmapper = M.parmap
M.imap = M.parmap

--- results, n = parmap.map(fn, items, opts): the first value of each item.
function M.map(fn, items, opts, ...)
  local f, s, c, closer <close> = start(2, fn, items, opts, select("#", ...))
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
--- In a worker of a map: its number (1..N) and N; nil in the caller.
function M.worker() return core.worker() end
--- Monotonic time in seconds, for timing maps.
M.now = core.now
--- print's values on stdout, above the progress bar when one is drawn.
M.print = Progress.print

-- ReturnProcess, ParEval and pipelines live in their own file.
require("parmap.process")(M, core, {
  make_error = make_error, describe = describe, check = check,
  callable = callable, typename = typename, Error = Error,
  shown = shown, integer = integer, unknown = unknown, seqlen = seqlen,
  check_args = check_args, OPTIONS = OPTIONS, TRIPLE = TRIPLE,
  ipairs_aux = ipairs_aux, not_sequence = not_sequence,
  NOT_SEQUENCE = NOT_SEQUENCE,
  upstream = upstream, close_value = close_value,
})
if getinfo then OWN[getinfo(M.values, "S").source] = true end

return setmetatable(M, {
  __call = function(_, fn, items, opts, ...)
    local f, s, c, closer = start(2, fn, items, opts, select("#", ...))
    return f, s, c, closer
  end,
})
