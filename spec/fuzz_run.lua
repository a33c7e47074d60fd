-- spec/fuzz_run.lua: the argument fuzzer that spec/fuzz_spec.lua runs in
-- a child lua5.4 (a crash there is a failed spec, not a dead suite).
--
--   require("fuzz_run")(seed, first, last, fork_budget)
--
-- Case k is drawn from math.randomseed(seed, k) alone, so any case can be
-- replayed by itself: PARMAP_FUZZ_SEED=<seed> PARMAP_FUZZ_CASE=<k>.
-- Each case calls one entry point (a parmap loop, parmap(...), parmap.map,
-- ReturnProcess and its methods, ParEval and its call, parmap.values) with
-- values of every type at every argument and option. An oracle, written
-- from the README's contract, says which arguments are bad; then:
--   bad arguments  -> an error "<this file>:<line>: parmap...: ..." that
--                     names one of the bad arguments or options
--   good arguments -> the right number of results (or failures of items,
--                     kind "error": star/kwstar on a number)
-- and after every case no child process is left. Prints one line per
-- failure and a last line "FUZZ-DONE ...".
local parmap = require "parmap"
local core = require "parmap.core"
local H = require "helpers"

local mtype, maxint, minint = math.type, math.maxinteger, math.mininteger
local random = math.random
local format = string.format
local MAX_ARGS = parmap.MAX_ARGS
-- PARMAP_FUZZ_TRACE=1 prints each call before it is made
local TRACE = os.getenv("PARMAP_FUZZ_TRACE") == "1"
local function trace(desc) if TRACE then io.write("> ", desc, "\n"); io.flush() end end

-- Values the C core is known to mishandle: left out of the draw while listed
-- here, each with its reproducer. Empty: every find of the first runs (huge
-- chunksize, total and lengths; join/wait's timeout message) is fixed.
-- Entries: { where = "option name" | "join/wait" | "length", test = function(v),
-- message = pattern, why = "reproducer" }
local KNOWN_C_BUG = {}

-- PARMAP_FUZZ_ALL=1 draws the listed values too (to check a C fix).
if os.getenv("PARMAP_FUZZ_ALL") == "1" then KNOWN_C_BUG = {} end

local function known_message(where, msg)
  for _, b in ipairs(KNOWN_C_BUG) do
    if b.where == where and b.message and tostring(msg):match(b.message) then return true end
  end
  return false
end

local function known_bug(where, v)
  for _, b in ipairs(KNOWN_C_BUG) do
    if b.where == where and b.test and b.test(v) then
      return true
    end
  end
  return false
end

---------------------------------------------------------------- values

local function cheap(x) return x end
local callable_tbl = setmetatable({}, { __call = function(_, x) return x end })
local function len_mt(v) return setmetatable({}, { __len = function() return v end }) end

-- name -> constructor: fresh values for each case (iterators are used up)
local POOL = {
  { "nil", function() return nil end },
  { "true", function() return true end },
  { "false", function() return false end },
  { "0", function() return 0 end },
  { "1", function() return 1 end },
  { "2", function() return 2 end },
  { "3", function() return 3 end },
  { "-1", function() return -1 end },
  { "minint", function() return minint end },
  { "maxint", function() return maxint end },
  { "2^31", function() return 1 << 31 end },
  { "2^31 (float)", function() return 2.0 ^ 31 end },
  { "2^32+1", function() return (1 << 32) + 1 end },
  { "2^53 (float)", function() return 2.0 ^ 53 end },
  { "2^40", function() return 1 << 40 end },
  { "2^61", function() return 1 << 61 end },
  { "3.0", function() return 3.0 end },
  { "0.5", function() return 0.5 end },
  { "2.5", function() return 2.5 end },
  { "-0.0", function() return -0.0 end },
  { "nan", function() return 0 / 0 end },
  { "inf", function() return math.huge end },
  { "-inf", function() return -math.huge end },
  { "1e300", function() return 1e300 end },
  { "1e-300", function() return 1e-300 end },
  { '"4"', function() return "4" end },
  { '"-1"', function() return "-1" end },
  { '""', function() return "" end },
  { '"x"', function() return "x" end },
  { '"raise"', function() return "raise" end },
  { '"return"', function() return "return" end },
  { '"proc"', function() return "proc" end },
  { "{}", function() return {} end },
  { "{1, 2}", function() return { 1, 2 } end },
  { "{n = 2}", function() return { n = 2 } end },
  { "{n = 2.5}", function() return { n = 2.5 } end },
  { "{n = -1}", function() return { n = -1 } end },
  { '{n = "2"}', function() return { n = "2" } end },
  { "{n = maxint}", function() return { n = maxint } end },
  { "{n = 1e6}", function() return { n = 1000000 } end },
  { "{a = 1}", function() return { a = 1 } end },
  { "{[2] = 1}", function() return { [2] = 1 } end },
  { "__len 2.5", function() return len_mt(2.5) end },
  { "__len nil", function() return len_mt(nil) end },
  { "__len -1", function() return len_mt(-1) end },
  { '__len "2"', function() return len_mt("2") end },
  { "__len 2", function() return len_mt(2) end },
  { "__len maxint", function() return len_mt(maxint) end },
  { "__index", function() return setmetatable({}, { __index = function(_, k) return k end }) end },
  { "callable table", function() return callable_tbl end },
  { "function", function() return cheap end },
  { "iterator(2)", function()
    local i = 0
    return function() i = i + 1; if i <= 2 then return i end end
  end },
  { "ipairs aux", function() return (ipairs({})) end },
  { "next", function() return next end },
  { "coroutine", function() return coroutine.create(cheap) end },
  { "io.stdout", function() return io.stdout end },
  { "parmap.None", function() return parmap.None end },
}

local function any()
  local e = POOL[random(#POOL)]
  return e[2](), e[1]
end

-- The numbers of POOL, and "4": drawn more often for numeric options.
local NUMBERS = {}
for _, e in ipairs(POOL) do
  if type(e[2]()) == "number" or e[1] == '"4"' then NUMBERS[#NUMBERS + 1] = e end
end
local NUMERIC = { N = true, chunksize = true, total = true, timeout = true,
  n_chunks = true, n_eval = true, n_min = true, seed = true, buffersize = true,
  maxtasks = true, retries = true, init_timeout = true, finish_timeout = true,
  maxmemory = true, retry_delay = true, retry_delay_max = true }

-- Good values of each option (the draws mix these with any()).
local function iter(n)
  return function()
    local i = 0
    return function() i = i + 1; if i <= n then return i end end
  end
end
local GOOD = {
  N = { { "1", 1 }, { "2", 2 }, { "2.0", 2.0 }, { "3", 3 } },
  star = { { "false", false }, { "true", true }, { "None", parmap.None } },
  kwstar = { { "false", false }, { "true", true } },
  args = { { "{}", {} }, { "{7}", { 7 } }, { "{n = 2}", { n = 2 } } },
  kwargs = { { "{}", {} }, { "{a = 1}", { a = 1 } } },
  chunksize = { { "1", 1 }, { "2", 2 }, { "-1", -1 } },
  ordered = { { "true", true }, { "false", false } },
  progress = { { "false", false }, { "fn", function() end } },
  total = { { "0", 0 }, { "3", 3 } },
  exception = { { '"raise"', "raise" }, { '"return"', "return" }, { '"proc"', "proc" } },
  timeout = { { "30", 30 }, { "inf", math.huge }, { "1e300", 1e300 } },
  n_chunks = { { "1", 1 }, { "2", 2 } },
  n_eval = { { "1", 1 }, { "2", 2 } },
  n_min = { { "0", 0 }, { "1", 1 } },
  seed = { { "0", 0 }, { "-7", -7 }, { "maxint", math.maxinteger } },
  buffersize = { { "1", 1 }, { "2", 2 }, { "5000", 5000 } },
  maxtasks = { { "1", 1 }, { "2", 2 } },
  retries = { { "0", 0 }, { "1", 1 }, { "2", 2 } },
  init = { { "fn", function() end } },
  finish = { { "fn", function() end } },
  backend = { { '"auto"', "auto" }, { '"fork"', "fork" } },
  init_timeout = { { "30", 30 }, { "inf", math.huge } },
  finish_timeout = { { "30", 30 }, { "inf", math.huge }, { "1e-300", 1e-300 } },
  maxmemory = { { '"2G"', "2G" }, { "2^30", 1 << 30 }, { '" 512 MiB "', " 512 MiB " },
    { '"1.5k"', "1.5k" } },
  stats = { { "true", true }, { "false", false } },
  retry_if = { { "died only", function(e) return e.kind == "died" end },
    { "never", function() return false end },
    { "raises", function() error("retry_if raised") end } },
  retry_delay = { { "0", 0 }, { "0.01", 0.01 } },
  retry_delay_max = { { "0", 0 }, { "0.01", 0.01 }, { "30", 30 } },
}
local MAP_OPTIONS = { "N", "star", "kwstar", "args", "kwargs", "chunksize",
  "ordered", "progress", "total", "exception", "timeout", "seed", "buffersize",
  "maxtasks", "retries", "init", "finish", "backend", "init_timeout",
  "finish_timeout", "maxmemory", "stats", "retry_if", "retry_delay",
  "retry_delay_max" }
local RP_OPTIONS = { "args", "kwargs", "exception" }
local PE_OPTIONS = { "n_chunks", "n_eval", "n_min", "N", "ordered",
  "exception", "timeout", "args", "kwargs", "chunksize" }
local TYPOS = { "n", "progres", "Chunksize", "chunk_size", "nn", "time_out",
  "arg", "n_chunk", "neval", "exceptions", "", "retry_dely", "retryif",
  "max_memory", "stat" }

local function pick(list) return list[random(#list)] end

-- A value for option k: often a good one, else anything.
local function option_value(k)
  local g = GOOD[k]
  if g and random() < 0.55 then
    local e = pick(g)
    local v = e[2]
    if type(v) == "table" and v ~= parmap.None then -- fresh copy
      local c = {}
      for kk, vv in pairs(v) do c[kk] = vv end
      v = c
    end
    return v, e[1]
  end
  if NUMERIC[k] and random() < 0.6 then
    local e = NUMBERS[random(#NUMBERS)]
    return e[2](), e[1]
  end
  return any()
end

local function items_value()
  local r = random()
  if r < 0.45 then
    local n = random(0, 3)
    local t = {}
    for i = 1, n do t[i] = i end
    return t, format("{1..%d}", n)
  elseif r < 0.6 then
    local n = random(0, 3)
    return iter(n)(), format("iterator(%d)", n)
  elseif r < 0.65 then -- only a loop that breaks may take it as it is
    return function() return 1 end, "forever"
  elseif r < 0.72 then -- a range: a table with __len, nothing stored
    local a, b, step = random(-2, 2), random(-2, 4), pick { 1, 2, -1 }
    local n = 0
    for _ in function(_, x) x = x + step; if (step > 0 and x <= b) or (step < 0 and x >= b) then return x end end, nil, a - step do
      n = n + 1
    end
    return parmap.range(a, b, step), format("range(%d, %d, %d) (%d)", a, b, step, n)
  end
  return any()
end

---------------------------------------------------------------- oracle

local function int(v)
  return mtype(v) == "integer" and v or (mtype(v) == "float" and math.tointeger(v)) or nil
end
local function callable(f)
  if type(f) == "function" then return true end
  local mt = getmetatable(f)
  return type(mt) == "table" and mt.__call ~= nil
end
local ipairs_aux = ipairs({})

-- The length a sequence argument declares: n, or nil when bad.
local function seq_len(t)
  if t.n ~= nil then
    local n = int(t.n)
    return n and n >= 0 and n or nil
  end
  local ok, n = pcall(function() return #t end)
  n = ok and int(n) or nil
  return n and n >= 0 and n or nil
end

-- Why a map option value is bad (the name an error must show), or nil.
local function bad_option(k, v)
  if v == nil then return nil end
  local i = int(v)
  if k == "N" then
    return not (i and i >= 1) and "'N'" or nil
  elseif k == "star" then
    return not (v == true or v == false or v == parmap.None) and "'star'" or nil
  elseif k == "kwstar" or k == "ordered" then
    return type(v) ~= "boolean" and ("'" .. k .. "'") or nil
  elseif k == "args" then
    if type(v) ~= "table" then return "'args'" end
    local n = seq_len(v)
    if not n then return v.n ~= nil and "'args.n'" or "'args'" end
    return n > MAX_ARGS and "'args.n'" or nil
  elseif k == "kwargs" then
    return type(v) ~= "table" and "'kwargs'" or nil
  elseif k == "chunksize" then
    return not (i and (i >= 1 or i == -1)) and "'chunksize'" or nil
  elseif k == "progress" then
    return not (type(v) == "boolean" or type(v) == "string" or callable(v))
      and "'progress'" or nil
  elseif k == "total" then
    return not (i and i >= 0) and "'total'" or nil
  elseif k == "exception" then
    return not (v == "raise" or v == "return" or v == "proc") and "'exception'" or nil
  elseif k == "timeout" or k == "init_timeout" or k == "finish_timeout" then
    return not (type(v) == "number" and v > 0) and ("'" .. k .. "'") or nil
  elseif k == "maxmemory" then
    local n = i
    if type(v) == "string" then -- a size: digits, a unit K M G T, iB or B
      local num, unit = v:match("^%s*(%d+%.?%d*)%s*([kKmMgGtT]?)[iI]?[bB]?%s*$")
      local mul = num and ({ [""] = 1, K = 1 << 10, M = 1 << 20, G = 1 << 30,
        T = 1 << 40 })[unit:upper()]
      n = mul and math.tointeger(math.floor(tonumber(num) * mul)) or nil
    end
    return not (n and n >= 1) and "'maxmemory'" or nil
  elseif k == "stats" then
    return type(v) ~= "boolean" and "'stats'" or nil
  elseif k == "retry_if" then
    return not callable(v) and "'retry_if'" or nil
  elseif k == "retry_delay" or k == "retry_delay_max" then
    return not (type(v) == "number" and v >= 0 and v <= 86400) and ("'" .. k .. "'")
      or nil
  elseif k == "n_chunks" or k == "n_eval" then
    return not (i and i >= 1) and ("'" .. k .. "'") or nil
  elseif k == "n_min" then
    return not (i and i >= 0) and ("'" .. k .. "'") or nil
  elseif k == "retries" then
    return not (i and i >= 0 and i <= parmap.MAX_RETRIES) and "'retries'" or nil
  elseif k == "seed" then
    return not i and "'seed'" or nil
  elseif k == "buffersize" or k == "maxtasks" then
    return not (i and i >= 1) and ("'" .. k .. "'") or nil
  elseif k == "init" or k == "finish" then
    return not callable(v) and ("'" .. k .. "'") or nil
  elseif k == "backend" then
    -- "mpi" outside parmap-mpi is refused too, naming the backend
    return not (v == "auto" or v == "fork") and "backend" or nil
  end
  return "unknown option"
end

---------------------------------------------------------------- printing

local function repr_opts(names, opts)
  if names == nil then return "nil" end
  if type(names) == "string" then return names end
  local parts = {}
  for _, e in ipairs(names) do parts[#parts + 1] = format("[%q] = %s", e[1], e[2]) end
  return "{" .. table.concat(parts, ", ") .. "}"
end

---------------------------------------------------------------- one case

local fails, forks, budget = {}, 0, 0
local first_case, last_case = 1, 1

-- May this case fork? At most `budget` forks in a batch, spread over it.
local function may_fork(k)
  if forks >= budget * (k - first_case + 1) / (last_case - first_case + 1) + 1 then
    return false
  end
  forks = forks + 1
  return true
end
local stats = { arg_errors = 0, ok = 0, item_errors = 0 }

local function fail(k, seed, desc, why)
  fails[#fails + 1] = format("FUZZ-FAIL seed=%d case=%d: %s :: %s", seed, k, desc,
    tostring(why):gsub("\n", "\\n"):sub(1, 400))
  io.write(fails[#fails], "\n")
  io.flush()
end

-- Is err an argument error of this call, raised at this file's call line,
-- naming one of the expected tokens?
local function arg_error_ok(err, tokens, prefix)
  if type(err) ~= "string" then return false, "error is a " .. type(err) end
  if not err:match("^[^\n]-fuzz_run%.lua:%d+: " .. prefix) then
    return false, "not '<fuzz_run.lua:line>: " .. prefix .. "...'"
  end
  for _, t in ipairs(tokens) do
    if err:find(t, 1, true) then return true end
  end
  return false, "names none of " .. table.concat(tokens, " ")
end

-- Under parmap-mpi (maps go to the node agents), fn, init and finish
-- travel by value: a C function in no loaded module (ipairs' iterator, a
-- fuzz value) is refused naming which one, as the README says.
local mpi = package.loaded["parmap.mpi"]
local MPI = mpi ~= nil and mpi.size() > 1
local function mpi_refusal(err)
  return MPI and tostring(err):match("^[^\n]-: parmap: [%w_' ]-: cannot send a ") ~= nil
end

local function item_error_ok(err)
  local s = tostring(err)
  return parmap.iserror(err) or s:match("^parmap: item %d+") ~= nil
    or s:match("^[^\n]-: parmap: item %d+") ~= nil
    -- exception = "proc" raises the engine's own message of a timeout or
    -- a death as it is (a tiny timeout such as 1e-300 times items out)
    or s:match("^item %d+ timed out after ") ~= nil
    or s:match("^worker %d+ .- while running item %d+") ~= nil
end

-- The tokens an error must show for these options (one of them), by the
-- README's contract. kind: "map", "process" or "pareval".
local SETS = {}
for _, e in ipairs({ { "map", MAP_OPTIONS }, { "process", RP_OPTIONS } }) do
  local set = {}
  for _, k in ipairs(e[2]) do set[k] = true end
  SETS[e[1]] = set
end
local function opts_bad(opts, kind)
  if opts == nil then return {} end
  if type(opts) ~= "table" then return { "'opts'" } end
  local bad = {}
  if kind == "pareval" then -- ParEval reads the keys opts has (next)
    for k, v in next, opts do
      if k == "chunksize" or k == "total" then
        bad[#bad + 1] = "set by ParEval"
      elseif k == "n_chunks" or k == "n_eval" or k == "n_min" or SETS.map[k] then
        local b = bad_option(k, v)
        if b then bad[#bad + 1] = b end
      else
        bad[#bad + 1] = "unknown option"
      end
    end
    if rawget(opts, "n_chunks") ~= nil and rawget(opts, "n_eval") ~= nil then
      bad[#bad + 1] = "n_chunks or n_eval"
    end
    return bad
  end
  local set = SETS[kind]
  for k in next, opts do
    if not set[k] then bad[#bad + 1] = "unknown option" end
  end
  for k in next, set do -- read as the checks read them (__index too)
    local b = bad_option(k, opts[k])
    if b then bad[#bad + 1] = b end
  end
  return bad
end

-- Random options for a map, ReturnProcess or ParEval: opts and their names
-- for printing.
local function draw_opts(known, extra_names)
  local r = random()
  if r < 0.08 then return any() end
  local opts, names = {}, {}
  for _ = 1, random(0, 4) do
    local k = pick(known)
    if opts[k] == nil then
      local v, name = option_value(k)
      if not known_bug(k, v) then
        opts[k] = v
        names[#names + 1] = { k, name }
      end
    end
  end
  if random() < 0.08 then
    local k = random() < 0.8 and pick(extra_names) or random(1, 3)
    if opts[k] == nil then
      opts[k] = 1
      names[#names + 1] = { tostring(k), "1" }
    end
  end
  return opts, names
end

-- opts.star (or another key) as the checks read it, nil for no table
local function o_star(opts, key)
  if type(opts) ~= "table" then return nil end
  local ok, v = pcall(function() return opts[key or "star"] end)
  return ok and v or nil
end

local function run_map(k, seed, entry)
  local fn, fn_name = cheap, "fn"
  if random() < 0.1 then fn, fn_name = any() end
  local items, items_name = items_value()
  local opts, onames = draw_opts(MAP_OPTIONS, TYPOS)
  local bad = opts_bad(opts, "map")
  local nextra = random() < 0.06 and random(1, 2) or 0
  if not callable(fn) then bad[#bad + 1] = "'fn'" end
  local it = type(items)
  local count -- items the map should give
  if items == ipairs_aux or items == next
    or (nextra > 0 and it == "function" and type(opts) == "table") then
    bad[#bad + 1] = "'items'"
  elseif items_name:match("^range") and (o_star(opts) == true or o_star(opts, "kwstar") == true) then
    bad[#bad + 1] = "'items'" -- a range's items are numbers: no tables to spread
  elseif it == "table" then
    count = seq_len(items)
    if not count then
      bad[#bad + 1] = "'items'"
    elseif count == 0 and items.n == nil and next(items) ~= nil
      and not (getmetatable(items) or {}).__len then
      bad[#bad + 1] = "'items'"
    end
  elseif it == "function" then
    count = tonumber(items_name:match("^iterator%((%d)%)$"))
      or (items_name == "function" and 0) -- cheap() gives nil at once
      or (items_name == "forever" and math.huge)
    if not count then error("fuzz_run: no count for items " .. items_name) end
  else
    bad[#bad + 1] = "'items'"
  end
  local o = type(opts) == "table" and opts or {}
  local N = int(o.N) or core.ncpu()
  -- N = 1 with a seed, an init_timeout or stats runs in a worker process
  local forking = N > 1 or (type(o.timeout) == "number" and o.timeout < math.huge)
    or (int(o.seed) ~= nil) or o.stats == true
    or (type(o.init_timeout) == "number" and o.init_timeout < math.huge)
  -- under parmap-mpi stats is refused (it needs the fork backend)
  if MPI and o.stats == true and o.backend ~= "fork" then bad[#bad + 1] = "'stats'" end
  if #bad == 0 then
    -- a failing item waits retry_delay between its runs, doubling: a
    -- drawn 30 s would make the batch crawl; the wait itself is the spec's
    if type(o.retry_delay) == "number" and o.retry_delay > 0.02 then
      o.retry_delay = 0.02
      onames[#onames + 1] = { "retry_delay", "0.02 (was more)" }
    end
    -- a valid map must end: unending or huge inputs only where the loop
    -- takes a few results and breaks; forks within the budget
    if count and count ~= math.huge and known_bug("length", count) then
      items, items_name, count = { n = 1 << 31 }, "{n = 2^31} (KNOWN_C_BUG length)", 1 << 31
    end
    -- an endless input with big chunks never sends its first chunk
    local cs = int(o.chunksize)
    if cs == -1 then cs = int(o.total) and (int(o.total) + N - 1) // N or 1 end
    if count == math.huge and cs and cs > 4 then
      items, items_name, count = iter(3)(), "iterator(3) (was forever)", 3
    end
    if count and count > 3 and entry == "map" then
      items, items_name, count = {}, "{} (was " .. items_name .. ")", 0
    end
    if forking and count ~= 0 and not may_fork(k) then
      items, items_name, count = {}, "{} (fork budget)", 0
    end
  end
  local desc = format("%s(%s, %s, %s%s)", entry, fn_name, items_name,
    repr_opts(onames, opts), nextra > 0 and ", <" .. nextra .. " more>" or "")

  trace(desc)
  local ok, err, got
  if entry == "map" then
    ok, err, got = pcall(function()
      local r, n
      if nextra > 0 then
        r, n = parmap.map(fn, items, opts, 0, nil)
      else
        r, n = parmap.map(fn, items, opts)
      end
      return r, n
    end)
  else
    ok, err, got = pcall(function()
      local f, s, c, cl
      if entry == "call" then
        f, s, c, cl = parmap(fn, items, opts, table.unpack({ 0, nil }, 1, nextra))
      else
        f, s, c, cl = parmap.parmap(fn, items, opts, table.unpack({ 0, nil }, 1, nextra))
      end
      local n = 0
      for i in f, s, c, cl do
        n = n + 1
        if i == nil or n >= 4 then break end
      end
      return true, n
    end)
  end
  if #bad > 0 then
    if ok then return fail(k, seed, desc, "no error; expected one naming " .. table.concat(bad, " or ")) end
    local good, why = arg_error_ok(err, bad, "parmap")
    if not good then return fail(k, seed, desc, why .. ": " .. tostring(err)) end
    stats.arg_errors = stats.arg_errors + 1
  elseif not ok then
    -- fn or progress(done, total) may raise anything: next, ipairs' iterator
    local user_raises = (fn ~= cheap and fn ~= callable_tbl)
      or o.progress == next or o.progress == ipairs_aux
    if not item_error_ok(err) and not user_raises and not mpi_refusal(err) then
      return fail(k, seed, desc, "unexpected error: " .. tostring(err))
    end
    stats.item_errors = stats.item_errors + 1
  else
    local want = count
    if entry ~= "map" and want > 4 then want = 4 end
    if got ~= want then
      return fail(k, seed, desc, format("got %s results, expected %s", tostring(got), tostring(want)))
    end
    stats.ok = stats.ok + 1
  end
end

local function run_process(k, seed)
  local target, tname = cheap, "fn"
  if random() < 0.15 then target, tname = any() end
  local opts, onames = draw_opts(RP_OPTIONS, TYPOS)
  local bad = opts_bad(opts, "process")
  if not callable(target) then bad[#bad + 1] = "'target'" end
  local desc = format("ReturnProcess(%s, %s)", tname, repr_opts(onames, opts))
  trace(desc)
  local ok, p = pcall(function()
    local r = parmap.ReturnProcess(target, opts)
    return r
  end)
  if #bad > 0 then
    if ok then return fail(k, seed, desc, "no error; expected one naming " .. table.concat(bad, " or ")) end
    local good, why = arg_error_ok(p, bad, "parmap.ReturnProcess")
    if not good then return fail(k, seed, desc, why .. ": " .. tostring(p)) end
    stats.arg_errors = stats.arg_errors + 1
    return
  end
  if not ok then return fail(k, seed, desc, "unexpected error: " .. tostring(p)) end
  -- a few method calls, timeouts of every kind; a started process is
  -- always joined in the end
  local started = false
  local function calls()
  for _ = 1, random(1, 4) do
    local m = pick({ "start", "join", "wait", "is_alive", "pid" })
    local arg, aname = nil, "nil"
    if m == "join" or m == "wait" then
      if random() < 0.6 then arg, aname = any() else arg, aname = 0, "0" end
      if known_bug(m, arg) then arg, aname = nil, "nil" end
    end
    if m == "start" and not started and not may_fork(k) then goto continue end
    desc = desc .. format(":%s(%s)", m, aname)
    trace(desc)
    do
      local cok, cerr = pcall(function()
        local a, b = p[m](p, arg)
        return a, b
      end)
      if m == "start" then
        if started and cok then return fail(k, seed, desc, "started twice") end
        started = true
      end
      if not cok then
        local s = tostring(cerr)
        if (m == "join" or m == "wait") and known_message("join/wait", s) then goto continue end
        local expected = (m ~= "start" and not started and s:find("before start", 1, true))
          or (m == "start" and s:find("already started", 1, true))
          or ((m == "join" or m == "wait") and s:find("timeout", 1, true))
          or item_error_ok(cerr) or s:find("parmap: process", 1, true)
        if not expected then return fail(k, seed, desc, "unexpected error: " .. s) end
        if not s:match("^[^\n]-fuzz_run%.lua:%d+: parmap") and not parmap.iserror(cerr) then
          return fail(k, seed, desc, "error without the caller's line or 'parmap': " .. s)
        end
      end
    end
    ::continue::
  end
  return true
  end
  local passed = calls()
  if started then pcall(p.join, p) end
  if passed then stats.ok = stats.ok + 1 end
end

local function run_pareval(k, seed)
  local fun, fname = function(t) return t end, "id"
  if random() < 0.1 then fun, fname = any() end
  local opts, onames = draw_opts(PE_OPTIONS, TYPOS)
  local bad = opts_bad(opts, "pareval")
  if not callable(fun) then bad[#bad + 1] = "'fun'" end
  local desc = format("ParEval(%s, %s)", fname, repr_opts(onames, opts))
  local ok, pe = pcall(function()
    local r = parmap.ParEval(fun, opts)
    return r
  end)
  if #bad > 0 then
    if ok then return fail(k, seed, desc, "no error; expected one naming " .. table.concat(bad, " or ")) end
    local good, why = arg_error_ok(pe, bad, "parmap")
    if not good then return fail(k, seed, desc, why .. ": " .. tostring(pe)) end
    stats.arg_errors = stats.arg_errors + 1
    return
  end
  if not ok then return fail(k, seed, desc, "unexpected error: " .. tostring(pe)) end
  -- bounds(n) and the call
  local n, nname = any()
  if random() < 0.5 then n, nname = random(0, 5), "small" end
  local nb = int(n)
  if nb and nb > 1000 then n, nname = 5, "5 (was " .. nname .. ")" end
  nb = int(n)
  local bok, berr = pcall(function() local r = pe:bounds(n); return r end)
  if nb and nb >= 0 and nb <= 1000 then
    if not bok then return fail(k, seed, desc .. ":bounds(" .. tostring(nname) .. ")", berr) end
  elseif not (nb and nb >= 0) then
    if bok then return fail(k, seed, desc .. ":bounds(" .. tostring(nname) .. ")", "no error") end
    local good, why = arg_error_ok(berr, { "'n'" }, "parmap.ParEval")
    if not good then return fail(k, seed, desc .. ":bounds", why .. ": " .. tostring(berr)) end
  end
  local X, xname = items_value()
  local xbad = false
  local xn
  if type(X) ~= "table" then
    xbad = true
  else
    xn = seq_len(X)
    xbad = not xn or (xn == 0 and X.n == nil and next(X) ~= nil
      and not (getmetatable(X) or {}).__len)
  end
  if not xbad and xn > 3 then X, xname, xn = {}, "{} (was " .. xname .. ")", 0 end
  local o = type(opts) == "table" and opts or {}
  local N = int(o.N) or core.ncpu()
  if not xbad and xn > 0 and (N > 1 or (type(o.timeout) == "number" and o.timeout < math.huge)) then
    if not may_fork(k) then X, xname, xn = {}, "{} (fork budget)", 0 end
  end
  desc = desc .. "(" .. xname .. ")"
  trace(desc)
  local cok, r = pcall(function() local y = pe(X); return y end)
  if xbad then
    if cok then return fail(k, seed, desc, "no error for a bad X") end
    local good, why = arg_error_ok(r, { "'X'" }, "parmap.ParEval")
    if not good then return fail(k, seed, desc, why .. ": " .. tostring(r)) end
    stats.arg_errors = stats.arg_errors + 1
  elseif not cok then
    if not item_error_ok(r) and fname == "id" then -- another fun may raise anything
      return fail(k, seed, desc, "unexpected error: " .. tostring(r))
    end
    stats.item_errors = stats.item_errors + 1
  else
    if type(r) ~= "table" then return fail(k, seed, desc, "result is a " .. type(r)) end
    stats.ok = stats.ok + 1
  end
end

local function run_values(k, seed)
  local f, fname = any()
  if random() < 0.4 then f, fname = ipairs({ 1, 2 }), "ipairs aux" end
  local s, c = any(), any()
  local desc = format("values(%s, ...)", fname)
  local ok, g = pcall(function() local r = parmap.values(f, s, c); return r end)
  if not callable(f) then
    if ok then return fail(k, seed, desc, "no error for a bad iterator") end
    local good, why = arg_error_ok(g, { "#1" }, "parmap.values")
    if not good then return fail(k, seed, desc, why .. ": " .. tostring(g)) end
    stats.arg_errors = stats.arg_errors + 1
    return
  end
  if not ok then return fail(k, seed, desc, "unexpected error: " .. tostring(g)) end
  -- pull a few values: the iterator's own errors are the user's
  pcall(function() for _ = 1, 3 do if g() == nil then break end end end)
  stats.ok = stats.ok + 1
end

local ENTRIES = { "loop", "call", "map", "map", "process", "pareval", "values" }

local function one(seed, k)
  io.write("case ", k, "\n") -- the last one names a case that crashed
  io.flush()
  math.randomseed(seed, k)
  local entry = pick(ENTRIES)
  if entry == "process" then
    run_process(k, seed)
  elseif entry == "pareval" then
    run_pareval(k, seed)
  elseif entry == "values" then
    run_values(k, seed)
  else
    run_map(k, seed, entry)
  end
  local kids = H.children()
  if #kids > 0 then
    fail(k, seed, entry, "child processes left: " .. table.concat(kids, " "))
    for _, pid in ipairs(kids) do os.execute("kill -9 " .. pid .. " 2>/dev/null") end
  end
end

return function(seed, first, last, fork_budget)
  budget = fork_budget or 40
  first_case, last_case = first, last
  for k = first, last do one(seed, k) end
  io.write(format("FUZZ-DONE seed=%d cases=%d..%d forks=%d arg_errors=%d ok=%d item_errors=%d fails=%d\n",
    seed, first, last, forks, stats.arg_errors, stats.ok, stats.item_errors, #fails))
  return #fails
end
