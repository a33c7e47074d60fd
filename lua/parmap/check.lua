-- parmap/check.lua: the argument and option checks every entry point
-- shares (every message names the argument or option and shows the bad
-- value), and `map_spec`, which checks a map's arguments into the spec
-- core.start takes. Private to parmap: its Lua files require it.

local core = require "parmap.core"
local Progress = require "parmap.progress"
local Errors = require "parmap.errors"
local Cgroup = require "parmap.cgroup"
Errors.own()

local error, type, tostring, tonumber, setmetatable, getmetatable, next =
  error, type, tostring, tonumber, setmetatable, getmetatable, next
local tointeger, floor, huge = math.tointeger, math.floor, math.huge
local io = io
local format = string.format

local C = {}

-- star = parmap.None: the item is counted but not passed. Not a field of
-- this module (C.none() gives it): a closure sent by value (src/fnenc.c)
-- names a module's table by the module it is a field of, and parmap.None
-- must travel as parmap's.
local None = setmetatable({}, {
  __name = "parmap.None",
  __tostring = function() return "parmap.None" end,
  __newindex = function() error("parmap.None is read-only", 2) end,
})
function C.none() return None end

-- The options of a map, one a line (a new option is one more line here
-- and its check in `map_spec` below).
C.OPTIONS = {
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
  init_timeout = true,
  finish_timeout = true,
  buffersize = true,
  backend = true, -- "auto", "fork" or "mpi"
  resilient = true, -- the MPI backend outlives an agent's death
  maxmemory = true, -- bytes (or "2G") of RSS past which a worker is replaced
  stats = true, -- per-item wall, CPU time and peak RSS, m:stats()
  output = true, -- "direct", "lines" or "item": where workers' output goes
  output_prefix = true, -- "lines": each line's prefix (true: "[%d] ")
  retry_if = true, -- retry_if(e): does this failure get the run retries allows?
  retry_delay = true, -- seconds before the 2nd run, doubling per run
  retry_delay_max = true, -- the cap of that doubling (default 30 s)
  journal = true, -- a file of finished items' results: a rerun resumes
}
local OPTIONS = C.OPTIONS

-- What to do with an item's error (errors.lua's `apply` does it).
local EXCEPTION = { raise = true, ["return"] = true, proc = true }
local BACKEND = { auto = true, fork = true, mpi = true }

-- The most extra arguments (args.n) a call may get: they sit on Lua's
-- stack, which holds at most 1,000,000 slots (LUAI_MAXSTACK).
C.MAX_ARGS = 100000
-- retries: an fn that always raises would otherwise run for ever (the
-- fuzz drew retries = 2^40 with one)
C.MAX_RETRIES = 10000
-- retry_delay, retry_delay_max: a day at most (a sleep's nanoseconds then
-- fit any integer type on the way)
C.MAX_RETRY_DELAY = 86400
local MAX_ARGS = C.MAX_ARGS

function C.callable(f)
  if type(f) == "function" then return true end
  local mt = getmetatable(f)
  return type(mt) == "table" and mt.__call ~= nil
end
local callable = C.callable

function C.typename(v)
  local mt = getmetatable(v)
  return type(mt) == "table" and type(mt.__name) == "string" and mt.__name
    or type(v)
end
local typename = C.typename

-- A bad value as a message shows it: a number as it is, a string quoted
-- with its type (so that 4 and "4" differ), anything else by its type.
function C.shown(v)
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
local shown = C.shown

-- v as an integer when it is an integer-valued number (3 and 3.0, never
-- the string "3"), else nil.
function C.integer(v)
  if type(v) ~= "number" then return nil end
  return tointeger(v)
end
local integer = C.integer

-- "parmap: bad option 'name' (what expected, got v)", raised at level.
function C.bad(level, name, what, v, who)
  error(format("%s: bad option '%s' (%s expected, got %s)", who or "parmap",
    name, what, shown(v)), level + 1)
end
local bad = C.bad

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
function C.unknown(k, known, ...)
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
local unknown = C.unknown

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

-- ipairs' iterator: items = ipairs(t) passes it, t and 0.
local ipairs_aux = ipairs({})

-- Raise "who: bad argument #argno 'name' (an iterator triple ...)" when
-- v is one: ipairs' or pairs' iterator, or a function followed by more
-- arguments (more: true).
function C.no_triple(level, who, argno, name, v, more)
  if v == ipairs_aux or v == next or (more and type(v) == "function") then
    error(format("%s: bad argument #%d '%s' (an iterator triple: pass the table itself (or an items function), not ipairs(t) or pairs(t))",
      who, argno, name), level + 1)
  end
end

-- The length of the table t given as argument #argno 'name' of who: raises
-- on a bad length and on a table with keys but no sequence part ({a = 1},
-- {[2] = x}), whose length is 0: mapping it would silently map nothing.
-- A __len or a t.n says the length on purpose.
function C.sequence(level, who, argno, name, t)
  local n, why = seqlen(t, name)
  if not n then
    error(format("%s: bad argument #%d '%s' (%s)", who, argno, name, why),
      level + 1)
  end
  if n == 0 and t.n == nil and next(t) ~= nil
    and not (getmetatable(t) or {}).__len then
    error(format("%s: bad argument #%d '%s' (not a sequence: #%s is 0 but it has other keys; to map over its keys or values, collect them into a list first)",
      who, argno, name, name), level + 1)
  end
  return n
end

-- opts.args of who: {} and 0 for nil, else the table and its length.
function C.args(level, who, args)
  if args == nil then return {}, 0 end
  if type(args) ~= "table" then bad(level + 1, "args", "table", args, who) end
  local nargs, why = seqlen(args, "args")
  if not nargs then
    if args.n ~= nil then
      bad(level + 1, "args.n", "non-negative integer", args.n, who)
    end
    error(format("%s: bad option 'args' (%s)", who, why), level + 1)
  end
  if nargs > MAX_ARGS then
    error(format("%s: bad option 'args.n' (at most %d arguments, got %d)",
      who, MAX_ARGS, nargs), level + 1)
  end
  return args, nargs
end

-- opts.kwargs of who: nil or a table.
function C.kwargs(level, who, kwargs)
  if kwargs ~= nil and type(kwargs) ~= "table" then
    bad(level + 1, "kwargs", "table", kwargs, who)
  end
  return kwargs
end

-- opts.exception of who: one of EXCEPTION's names, dflt for nil.
function C.exception(level, who, exception, dflt)
  if exception == nil then return dflt end
  if not EXCEPTION[exception] then
    bad(level + 1, "exception", "'raise', 'return' or 'proc'", exception, who)
  end
  return exception
end

-- A constructor's two arguments (f, a function, as argument #1 named
-- fname; opts, a table or nil, as #2), checked for its caller at level:
-- returns opts ({} for nil) and a function raising who's messages there.
function C.constructor(level, who, fname, f, opts)
  if not callable(f) then
    error(format("%s: bad argument #1 '%s' (function expected, got %s)", who,
      fname, typename(f)), level + 1)
  end
  if opts == nil then
    opts = {}
  elseif type(opts) ~= "table" then
    error(format("%s: bad argument #2 'opts' (table expected, got %s)", who,
      typename(opts)), level + 1)
  end
  -- called by the constructor itself, one frame below this one
  return opts, function(msg, ...)
    error(who .. ": " .. format(msg, ...), level + 1)
  end
end

-- A size in bytes: a positive integer, or a string of one with a unit
-- ("512M", "2G", "1.5G", "100k"; K, M, G, T are powers of 1024).
local UNITS = { [""] = 1, K = 1024, M = 1024 ^ 2, G = 1024 ^ 3, T = 1024 ^ 4 }
function C.bytes(level, name, v)
  local n = integer(v)
  if type(v) == "string" then
    local num, unit = v:match("^%s*(%d+%.?%d*)%s*([kKmMgGtT]?)[iI]?[bB]?%s*$")
    local mul = num and UNITS[unit:upper()]
    if mul then n = tointeger(floor(tonumber(num) * mul)) end
  end
  if not n or n < 1 then
    bad(level + 1, name, "positive number of bytes or a size such as \"512M\" or \"2G\"", v)
  end
  return n
end

-- spec[name] = opts[name], a positive integer when given (for map_spec, at
-- its level).
local function positive(level, spec, opts, name)
  local v = opts[name]
  if v == nil then return end
  spec[name] = integer(v)
  if not spec[name] or spec[name] < 1 then
    bad(level + 1, name, "positive integer", v)
  end
end

-- Check a map's arguments; return the spec core.start takes. extra: how
-- many arguments came after opts.
function C.map_spec(level, fn, items, opts, extra)
  level = level + 1
  if not callable(fn) then
    error(format("parmap: bad argument #1 'fn' (function expected, got %s)",
      typename(fn)), level)
  end
  local it = type(items)
  local range = it == "table" and core.isrange(items)
  C.no_triple(level, "parmap", 2, "items", items,
    extra and extra > 0 and type(opts) == "table")
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
  local spec = { fn = fn, items = items, from_table = it == "table",
    describe = Errors.describe }

  local N = opts.N
  if N == nil then
    -- a map inside a worker would otherwise fork N workers per worker
    N = core.worker() and 1 or Cgroup.ncpu()
  else
    N = integer(N)
    if not N or N < 1 then bad(level, "N", "positive integer", opts.N) end
  end
  spec.N = N

  local star = opts.star
  if star == nil or star == false then
    spec.star = "false"
  elseif star == true then
    spec.star = "true"
  elseif star == None then
    spec.star = "none"
  else
    bad(level, "star", "true, false or parmap.None", star)
  end
  local kwstar = opts.kwstar
  if kwstar ~= nil and type(kwstar) ~= "boolean" then
    bad(level, "kwstar", "boolean", kwstar)
  end
  spec.kwstar = kwstar == true
  if range and (star == true or kwstar == true) then
    error(format("parmap: bad argument #2 'items' (a parmap.range's items are numbers: %s needs tables; star = parmap.None calls fn(args...) once per index)",
      star == true and "star = true" or "kwstar = true"), level)
  end
  spec.range = range or nil

  spec.args, spec.nargs = C.args(level, "parmap", opts.args)
  spec.kwargs = C.kwargs(level, "parmap", opts.kwargs)
  spec.has_kw = spec.kwargs ~= nil or kwstar == true

  local total = opts.total
  if total ~= nil then
    total = integer(total)
    if not total or total < 0 then
      bad(level, "total", "non-negative integer", opts.total)
    end
  end
  if it == "table" then total = C.sequence(level, "parmap", 2, "items", items) end
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

  positive(level, spec, opts, "buffersize") -- nil: the engine's default

  local ordered = opts.ordered
  if ordered ~= nil and type(ordered) ~= "boolean" then
    bad(level, "ordered", "boolean", ordered)
  end
  spec.ordered = ordered ~= false

  local exception = C.exception(level, "parmap", opts.exception,
    N > 1 and "raise" or "proc")
  -- workers (N > 1, or one for timeout and seed): a SIGKILL may be the
  -- OOM killer's, which the group's count tells from its growth
  spec.exception, spec.fail = exception, Errors.handler(exception,
    (N > 1 or opts.timeout or opts.seed) and Cgroup.oom_watch() or nil)

  local progress = opts.progress
  if progress == true or type(progress) == "string" then
    spec.bar = Progress.bar(progress ~= true and progress or nil)
    spec.progress = spec.bar.fn
  elseif callable(progress) then
    spec.progress = Progress.callback(progress)
  elseif progress ~= nil and progress ~= false then
    bad(level, "progress", "boolean, string or function", progress)
  end

  -- math.huge is no bound; timeout, init_timeout: with N = 1 too, then
  -- one worker process runs the items. finish_timeout: nil is the
  -- engine's default, so math.huge goes as 2e9 (over 1e9 s: none)
  for _, name in next, { "timeout", "init_timeout", "finish_timeout" } do
    local t = opts[name]
    if t ~= nil then
      if type(t) ~= "number" or not (t > 0) then
        bad(level, name, "positive number of seconds", t)
      end
      spec[name] = t < huge and t or (name == "finish_timeout" and 2e9
        or nil)
    end
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

  positive(level, spec, opts, "maxtasks")
  if opts.maxmemory ~= nil then
    spec.maxmemory = C.bytes(level, "maxmemory", opts.maxmemory)
  end

  local retries = opts.retries
  if retries ~= nil then
    spec.retries = integer(retries)
    if not spec.retries or spec.retries < 0 then
      bad(level, "retries", "non-negative integer", retries)
    elseif spec.retries > C.MAX_RETRIES then
      bad(level, "retries", "integer from 0 to " .. C.MAX_RETRIES, retries)
    end
  end
  -- which failures get the runs retries allows, and after how long
  local retry_if = opts.retry_if
  if retry_if ~= nil then
    if not callable(retry_if) then bad(level, "retry_if", "function", retry_if) end
    spec.retry_if, spec.retry_check = retry_if, Errors.retry_check(retry_if)
  end
  for _, name in next, { "retry_delay", "retry_delay_max" } do
    local t = opts[name]
    if t ~= nil then
      if type(t) ~= "number" or not (t >= 0) or t > C.MAX_RETRY_DELAY then
        bad(level, name, "number of seconds from 0 to " .. C.MAX_RETRY_DELAY, t)
      end
      spec[name] = t > 0 and t or nil
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
  local stats = opts.stats
  if stats ~= nil and type(stats) ~= "boolean" then
    bad(level, "stats", "boolean", stats)
  end
  spec.stats = stats or nil

  -- output: the workers' stdout and stderr straight to the caller's
  -- ("direct"), relayed whole lines ("lines"), or held with each item's
  -- result ("item"); output_prefix: "lines" only, "%d" the worker's number
  local output = opts.output
  if output ~= nil and output ~= "direct" and output ~= "lines"
      and output ~= "item" then
    bad(level, "output", "'direct', 'lines' or 'item'", output)
  end
  spec.output = output
  local prefix = opts.output_prefix
  if prefix ~= nil then
    if output ~= "lines" then
      error("parmap: option 'output_prefix' needs output = 'lines'", level)
    end
    if prefix == true then prefix = "[%d] " end
    if prefix == false then prefix = nil end
    if prefix ~= nil then
      if type(prefix) ~= "string" then
        bad(level, "output_prefix", "boolean or string", prefix)
      end
      local rest = prefix:gsub("%%[d%%]", "")
      if rest:find("%", 1, true) or #prefix > 63 or prefix:find("\0") then
        error("parmap: bad option 'output_prefix' (a string of at most 63 "
          .. "bytes where '%' only comes as '%d' (the worker's number) or "
          .. "'%%', got " .. format("%q", prefix) .. ")", level)
      end
    end
    spec.output_prefix = prefix
  end
  if output == "lines" or output == "item" then
    spec.output_write = Progress.relay
  end
  local journal = opts.journal
  if journal ~= nil and (type(journal) ~= "string" or journal == "") then
    bad(level, "journal", "file name (a non-empty string)", journal)
  end
  spec.journal_path = journal
  return spec
end

return C
