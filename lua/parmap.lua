-- parmap: a parallel map for Lua 5.4 on forked worker processes.
--
-- This is the friendly front: it checks arguments (every message names the
-- argument), gives the call semantics of Python's parmapper, draws progress
-- and builds error objects. The C half (parmap.core) runs the workers.
-- When the module is compiled into a C host, the core table is passed in.

local core = ...
if type(core) ~= "table" then core = require "parmap.core" end

-- No accidental SPMD: in an MPI job of several processes that
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
  -- parmap-mpi itself, started K times by a launcher whose process
  -- management its MPI does not speak (srun --mpi=none or pmix with MPICH):
  -- each process is a job of one (a singleton), rank 0, and runs the script.
  local mpi = package.loaded["parmap.mpi"]
  if size > 1 and mpi and mpi.size() == 1 then
    error(string.format("parmap: parmap-mpi runs as one of %d processes, but "
      .. "MPI sees a job of 1: the launcher did not connect them, so each "
      .. "would run all of the script; with srun name the MPI's plugin: "
      .. "srun --mpi=pmix for Open MPI, --mpi=pmi2 for MPICH (srun "
      .. "--mpi=list)", size), 2)
  end
end
local Check = require "parmap.check"
local Errors = require "parmap.errors"
local Pipeline = require "parmap.pipeline"
local Progress = require "parmap.progress"
Errors.own()

local error, select, setmetatable, type, tostring, pcall, next =
  error, select, setmetatable, type, tostring, pcall, next
-- the library's own globals, read once: a script (or, on the MPI agents,
-- the globals a map's fn reads from rank 0) may replace them
local io, package, string = io, package, string
local format = string.format
local getmetatable = getmetatable
local function index(t, k) return t[k] end

local M = {}
M._VERSION = "0.1.0"

-- star = parmap.None: the item is counted but not passed.
M.None = Check.none()
M.MAX_ARGS = Check.MAX_ARGS
M.MAX_RETRIES = Check.MAX_RETRIES
M._describe = Errors.describe -- for tests

--- Is v an error object of parmap?
M.iserror = Errors.iserror

---------------------------------------------------------------- serial

-- The to-be-closed value a serial map returns, so that every map has the
-- same four-value protocol.
local Serial = { __name = "parmap.SerialMap" }
Serial.__index = Serial
function Serial.__close(s) s.closed = true end
Serial.close = Serial.__close

local caller = core.caller

-- init and finish of a serial map, run in the caller as worker 1, with the
-- same outcomes as in a worker: init's error is raised as an error object
-- of kind "init"; finish's is written to stderr.
local function serial_init(init, fail)
  local status, err, message, traceback = caller({ fn = init })(1, 0, true)
  if status ~= "ok" then
    fail(nil, "init", err, message, traceback, core.pid(), nil, { worker = 1 })
  end
end

local function serial_finish(fin)
  local status, _, message, traceback = caller({ fn = fin })(1, 0, true)
  if status ~= "ok" then
    io.stderr:write(format("parmap worker 1 (pid %d): finish failed: %s\n%s\n",
      core.pid(), message, traceback))
  end
end

-- N = 1: a plain loop in this process, no fork.
local function serial(spec)
  local items, from_table, total = spec.items, spec.from_table, spec.total
  -- one item's run, retries, failure record (to the map's handler: the
  -- one policy) and progress, in C: the loop's values are fn's results
  -- where they came, never copied (fn may return as many as a worker's)
  local call = core.stepper(spec)
  local progress = spec.progress
  local fail = spec.fail
  local proc = spec.exception == "proc"
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

  local function step()
    if busy then
      error("parmap: map is busy (stepped from inside its own step: fn, a "
        .. "progress callback or the items iterator)", 2)
    end
    if ended or state.closed then return nil end
    busy = true
    local _ <close> = guard
    -- a table's item is read inside the call, where its errors (a
    -- raising __index) are the item's, as in a worker; an iterator's
    -- error ends the map, as the fork engine's does
    local item = items
    if not from_table then item = items() end
    if (from_table and i >= total) or (not from_table and item == nil) then
      ended = true
      if started and fin then serial_finish(fin) end
      if progress then progress(i, total, true) end
      return nil
    end
    if not started then -- the one worker is this process, number 1
      started = true
      if init then serial_init(init, fail) end
    end
    i = i + 1
    -- "proc" without retries: the policy raises err as raised, so no need
    -- to catch it
    return call(item, i, not proc or retries > 0)
  end
  return step, nil, nil, state
end

---------------------------------------------------------------- the API

-- A map on the MPI backend. fn (and init, finish) travel by
-- value to the node agents (src/fnenc.c); the agents run the call table.
local function mpi_start(level, spec)
  local mpi, fn, items = package.loaded["parmap.mpi"], spec.fn, spec.items
  -- refused here, at the caller's line (mpi.start's would be ours)
  if mpi.size() < 2 then
    error("parmap: backend 'mpi' needs 2 ranks or more", level + 1)
  elseif mpi.busy() then
    error("parmap: backend 'mpi' runs one map at a time (close the other "
      .. "map first)", level + 1)
  end
  local f0 = fn
  if type(f0) ~= "function" then f0 = function(...) return fn(...) end end
  local ok, rec = pcall(core.dumpfn, f0)
  if not ok then error("parmap: " .. tostring(rec), level + 1) end
  -- items go boxed with their index when a table has nil items (nil
  -- ends an iterator) or for seed (which needs the map's index)
  local box = spec.seed ~= nil or spec.retry_if ~= nil -- retry_if: e.index
  if spec.from_table and not box and not spec.range then -- no nil there
    if getmetatable(items) == nil then
      for i = 1, spec.total do
        if items[i] == nil then box = true; break end
      end
    else -- an __index that raises fails its item at its turn, not here
      for i = 1, spec.total do
        local ok, v = pcall(index, items, i)
        if ok and v == nil then box = true; break end
      end
    end
  end
  local o = { N = spec.user_N, star = spec.star, kwstar = spec.kwstar,
    args = spec.args, nargs = spec.nargs, has_kw = spec.has_kw,
    kwargs = spec.kwargs, timeout = spec.timeout, box = box,
    seed = spec.seed, maxtasks = spec.maxtasks, retries = spec.retries,
    maxmemory = spec.maxmemory,
    buffersize = spec.buffersize, init_timeout = spec.init_timeout,
    finish_timeout = spec.finish_timeout, retry_delay = spec.retry_delay,
    retry_delay_max = spec.retry_delay_max,
    chunksize = spec.chunksize }
  local hooks = {}
  for _, name in next, { "init", "finish", "retry_if" } do -- they travel as fn does
    local h = spec[name]
    if h ~= nil then
      if type(h) ~= "function" then
        local h0 = h
        h = function(...) return h0(...) end
      end
      -- alone first, so that a refusal names init, finish or retry_if
      local ok2, r2 = pcall(core.dumpfn, h, name)
      if not ok2 then error("parmap: " .. tostring(r2), level + 1) end
      hooks[name] = h
    end
  end
  if hooks.init or hooks.finish or hooks.retry_if then
    -- then with fn in one record: an upvalue that init sets and fn reads
    -- (a connection) stays one variable on the agents, as in a worker
    local init, finish, retry_if = hooks.init, hooks.finish, hooks.retry_if
    rec = core.dumpfn(function() return f0, init, finish, retry_if end)
    o.bundle = true
  end
  local m, what = mpi.start(spec, rec, o)
  if m == nil then -- args or kwargs holds what cannot travel: where?
    local function data(v, place)
      local path, t = Errors.find_unsendable(v)
      if path then
        error(string.format("parmap: bad option '%s' (cannot send a %s at "
          .. "%s%s to the MPI agents: args and kwargs hold only nil, "
          .. "booleans, numbers, strings and tables of them)",
          place:match("^%a+"), t, place, path), level + 2)
      end
    end
    for i = 1, spec.nargs do data(spec.args[i], "args[" .. i .. "]") end
    for k, v in next, spec.kwargs or {} do
      data(k, "kwargs key")
      data(v, "kwargs" .. Errors.keypath(k))
    end
    error("parmap: options 'args' and 'kwargs' must hold only values that "
      .. "travel (found a " .. tostring(what) .. ")", level + 1)
  end
  return mpi.next, m, nil, m
end

-- What names fn in its journal: its bytecode without debug information
-- (so an edit of a comment keeps it); a C function by its module's name;
-- a callable table or userdata by its __call.
local function fingerprint(fn, seen)
  if type(fn) == "function" then
    local ok, dump = pcall(string.dump, fn, true)
    if ok then return "lua " .. dump end
    local names = {}
    for mname, mod in next, package.loaded do
      if type(mod) == "table" then
        for k, v in next, mod do
          if v == fn and type(k) == "string" then
            names[#names + 1] = tostring(mname) .. "." .. k
          end
        end
      end
    end
    if #names == 0 then
      return nil, "fn is a C function that no loaded module holds"
    end
    table.sort(names) -- the same name whatever the table order
    return "C " .. names[1]
  end
  local mt = getmetatable(fn)
  local call = type(mt) == "table" and rawget(mt, "__call")
  if call ~= nil and not seen then
    local fp, why = fingerprint(call, true)
    if fp then return "call " .. fp end
    return nil, why
  end
  return nil, "fn is a " .. type(fn) .. " without a Lua __call"
end

-- option journal: the file opened (locked, checked against fn and the
-- item count, a torn end cut off) before the map starts.
local function open_journal(level, spec)
  local fp, why = fingerprint(spec.fn)
  if not fp then
    error("parmap: bad option 'journal' (a journal needs to know fn again in "
      .. "a later run: " .. why .. ")", level + 1)
  end
  local ok, j = pcall(core.journal, spec.journal_path, fp, spec.total or -1)
  if not ok then error(tostring(j), level + 1) end
  spec.journal = j
end

-- level: where the entry point's caller is, seen from the entry point (2
-- for a plain function). extra: how many arguments came after opts.
local function start(level, fn, items, opts, extra)
  local spec = Check.map_spec(level + 1, fn, items, opts, extra)
  if spec.journal_path then open_journal(level + 1, spec) end
  local f, s, c, closer
  local mpi = spec.backend ~= "fork" and package.loaded["parmap.mpi"]
  if spec.backend == "mpi" and not mpi then
    error("parmap: backend 'mpi' needs the script to run under parmap-mpi "
      .. "(mpirun -n K parmap-mpi script.lua)", level + 1)
  end
  if mpi and (spec.backend == "mpi" or (mpi.size() > 1 and not mpi.busy())) then
    if spec.stats then
      error("parmap: option 'stats' needs the fork backend (backend = 'fork')",
        level + 1)
    end
    if spec.output and spec.output ~= "direct" then
      error("parmap: option 'output' = '" .. spec.output .. "' needs the "
        .. "fork backend (backend = 'fork'); under parmap-mpi the workers "
        .. "write to mpirun's streams", level + 1)
    end
    f, s, c, closer = mpi_start(level + 1, spec)
  -- timeout, init_timeout, seed, stats, output, journal: with N = 1 too,
  -- the items run in one worker process (a loop cannot stop itself; seeding
  -- must not touch the caller's stream; stats measure a worker; output is
  -- a worker's streams; the journal keeps a worker's result records)
  elseif spec.N == 1 and not spec.timeout and not spec.seed
      and not spec.init_timeout and not spec.stats and not spec.journal
      and (spec.output or "direct") == "direct" then
    f, s, c, closer = serial(spec)
  else
    local m = core.start(spec)
    f, s, c, closer = core.next, m, nil, m
  end
  closer = Pipeline.closer(items, closer)
  -- closed early, the map ends its bar's line
  if spec.bar then closer = Pipeline.chain(spec.bar, closer) end
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

--- m = parmap.start(fn, items, opts): the map object itself, on worker
--- processes whatever N is (so an event loop never runs fn): m:poll(),
--- m:fd(), m:timeout(), m:next(), m:collect(), m:stats(), m:close().
function M.start(fn, items, opts, ...)
  local spec = Check.map_spec(2, fn, items, opts, select("#", ...))
  if spec.backend == "mpi" then
    error("parmap.start: the map object needs the fork backend "
      .. "(backend = 'fork' or 'auto')", 2)
  end
  if spec.journal_path then open_journal(2, spec) end
  local m = core.start(spec)
  return m
end

--- results, n = parmap.map(fn, items, opts): the first value of each item.
function M.map(fn, items, opts, ...)
  local f, s, c, closer <close> = start(2, fn, items, opts, select("#", ...))
  if f == core.next then -- parallel: collected in C, no Lua loop per item
    return core.collect(s)
  end
  local mpi = package.loaded["parmap.mpi"]
  if mpi and f == mpi.next then return mpi.collect(s) end
  local out, n = {}, 0
  for i, r in f, s, c do
    out[i] = r
    if i > n then n = i end
  end
  return out, n
end

--- The number of CPUs this process may use (the default N): its affinity
--- mask, lowered to its control group's CPU quota. opts.root: read the
--- files under that directory instead of / (for tests).
M.ncpu = require("parmap.cgroup").ncpu
--- parmap.range(n) / parmap.range(first, last[, step]): the values of
--- `for x = first, last, step` as a map's items, none of them stored.
M.range = core.range
--- In a worker of a map: its number (1..N) and N; nil in the caller.
function M.worker() return core.worker() end
--- Monotonic time in seconds, for timing maps.
M.now = core.now
--- print's values on stdout, above the progress bar when one is drawn.
M.print = Progress.print

M.ReturnProcess = require "parmap.returnprocess"
M.ParEval = require "parmap.pareval"(M.parmap)
M.values = Pipeline.values

return setmetatable(M, {
  __call = function(_, fn, items, opts, ...)
    local f, s, c, closer = start(2, fn, items, opts, select("#", ...))
    return f, s, c, closer
  end,
})
