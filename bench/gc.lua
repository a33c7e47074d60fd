-- bench/gc.lua: a forked child's collector, measured (printed, never asserted).
--
--   LUA_PATH='lua/?.lua;;' LUA_CPATH='build/?.so;;' lua5.4 bench/gc.lua [case...]
--
-- Cases (all by default):
--   churn   one item making ~300 MB of short-lived tables: peak RSS and time
--           serially, in a ReturnProcess child and in a map worker
--   trees   the Benchmarks Game's binary-trees, depth 16, the same three ways
--   tables  one item making 2e7 short-lived tables (GC_TABLES=n to change)
--   lines   a map over 63 MB of lines held in a table against the same lines
--           streamed from io.lines: CPU (caller + workers) against the serial
--           loop, and minor page faults of the caller and of the workers;
--           the table also for an incremental caller, and with holes
-- Each case runs in its own lua5.4 process, so peaks do not mix.
--
-- Measured on the 2-core dev VM (peak RSS; worker / ReturnProcess / serial):
--   churn   3.5 / 3.5 / 2.9 MB    (before the allocator check: 322 / 21 / 2.9)
--   trees   47 / 46 / 48 MB       (before: 1258 / 47 / 43)
--   tables  3.3 / 3.3 / 2.9 MB    (before: 1223 / 23 / 2.9)
--   lines   N=2, CPU against serial: table 1.18-1.27x, io.lines 1.14-1.19x;
--           page faults: table, workers ~100,000 (caller ~100); io.lines,
--           workers ~1,000 (caller ~600): the table's cost is each worker's
--           one walk of its 100 MB inherited heap and a first collection's
--           worth of fresh pages, not the caller. Since then, in lua5.4's
--           generational mode (the table made old before the fork,
--           workers' young collections kept to ~1 MiB): 806-863 faults,
--           0.95-1.00x serial; still ~100,000 for an incremental caller, and
--           83,747 with a freed temporary between lines (glibc reuses those
--           holes: each write copies a page of the caller's).
local fmt = string.format

local function readfile(path)
  local f = io.open(path)
  if not f then return nil end
  local s = f:read("a")
  f:close()
  return s
end

-- fields of /proc/self/stat after the command name (3 = state)
local function stat()
  local rest = readfile("/proc/self/stat"):match("%) (.*)$")
  local t, k = {}, 2
  for v in rest:gmatch("%S+") do
    k = k + 1
    t[k] = tonumber(v)
  end
  return t
end

local TICK = 100 -- USER_HZ on Linux
-- CPU seconds and minor faults of this process and of its reaped children
local function usage()
  local s = stat()
  return { cpu = (s[14] + s[15]) / TICK, ccpu = (s[16] + s[17]) / TICK,
           sys = s[15] / TICK, csys = s[17] / TICK, flt = s[10], cflt = s[11] }
end

local function hwm_mb()
  return tonumber(readfile("/proc/self/status"):match("VmHWM:%s*(%d+)")) / 1024
end

local case = arg[1] == "--case" and arg[2]
if not case then
  -- the driver: each case in a fresh interpreter
  local lua = arg[-1] or "lua5.4"
  local names = #arg > 0 and arg or { "churn", "trees", "tables", "lines" }
  for _, name in ipairs(names) do
    local p = io.popen(fmt("%q %q --case %s 2>&1", lua, arg[0], name))
    io.write(p:read("a"))
    io.flush()
    p:close()
  end
  return
end

local parmap = require "parmap"
local core = require "parmap.core"
local clock = core.now or os.clock

-- fn three ways: serially, in a ReturnProcess child, in a map worker (the
-- first of two items; the other is trivial). Each returns its peak RSS.
local function three(label, fn, arg1)
  local function measured(x)
    local t0 = os.clock()
    fn(x)
    return hwm_mb(), os.clock() - t0
  end
  local rows = {}
  -- the worker and the child first: the caller's own peak would show in
  -- theirs (VmHWM is inherited by fork)
  local r = parmap.map(function(x)
    if x == 0 then return {} end
    return { measured(x) }
  end, { arg1, 0 }, { N = 2 })
  rows[#rows + 1] = { "map worker", r[1][1], r[1][2] }
  local p = parmap.ReturnProcess(measured, { args = { arg1 } }):start()
  local pk, pt = p:join()
  rows[#rows + 1] = { "ReturnProcess", pk, pt }
  local sk, st = measured(arg1)
  rows[#rows + 1] = { "serial", sk, st }
  for _, row in ipairs(rows) do
    io.write(fmt("%-8s %-14s peak %8.1f MB  cpu %6.2f s\n", label, row[1], row[2], row[3] or 0))
  end
end

if case == "churn" then
  three("churn", function(n)
    local keep
    for i = 1, n do keep = { i, i + 1 } end
    return keep[1]
  end, 3000000)
elseif case == "tables" then
  three("tables", function(n)
    local keep
    for i = 1, n do keep = {} end
    return keep
  end, tonumber(os.getenv("GC_TABLES") or "") or 20000000)
elseif case == "trees" then
  -- binary-trees (the Benchmarks Game's Lua #2), depth 16
  local function bottom_up(d)
    if d == 0 then return {} end
    d = d - 1
    return { bottom_up(d), bottom_up(d) }
  end
  local function check(t)
    if t[1] then return 1 + check(t[1]) + check(t[2]) end
    return 1
  end
  local function trees(n)
    local mindepth, maxdepth = 4, math.max(6, n)
    local sum = check(bottom_up(maxdepth + 1))
    local long = bottom_up(maxdepth)
    for d = mindepth, maxdepth, 2 do
      local iters = 2 ^ (maxdepth - d + mindepth)
      for _ = 1, iters do sum = sum + check(bottom_up(d)) end
    end
    return sum + check(long)
  end
  three("trees", trees, 16)
elseif case == "lines" then
  local path = os.tmpname()
  do -- 63 MB of lines: 1,000,000 lines of 62 characters and a newline
    local f = assert(io.open(path, "w"))
    local words = { "alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta" }
    local buf = {}
    for i = 1, 1000000 do
      local parts, len = {}, 0
      local k = i
      while len < 50 do
        local w = words[k % #words + 1]
        k = k // 3 + i
        parts[#parts + 1] = w
        len = len + #w + 1
      end
      buf[#buf + 1] = (table.concat(parts, " ") .. string.rep("x", 62)):sub(1, 62)
      if #buf == 10000 then
        f:write(table.concat(buf, "\n"), "\n")
        buf = {}
      end
    end
    f:close()
  end
  local function fn(l)
    local n = 0
    for _ in l:gmatch("%a+") do n = n + 1 end
    return n
  end
  local N = tonumber(os.getenv("GC_N") or "") or 2
  local function run(label, items)
    collectgarbage()
    local u0, t0 = usage(), clock()
    local s = 0
    for _, r in parmap.parmap(fn, items, { N = N }) do s = s + r end
    local u1, t1 = usage(), clock()
    return { label = label, sum = s, wall = t1 - t0, cpu = u1.cpu - u0.cpu,
             ccpu = u1.ccpu - u0.ccpu, sys = u1.sys - u0.sys + u1.csys - u0.csys, flt = u1.flt - u0.flt, cflt = u1.cflt - u0.cflt }
  end
  local serial
  do
    collectgarbage()
    local u0 = usage()
    local s = 0
    for l in io.lines(path) do s = s + fn(l) end
    serial = usage().cpu - u0.cpu
    io.write(fmt("lines    serial io.lines       cpu %6.2f s (sum %d)\n", serial, s))
  end
  local rows = { run("stream io.lines", io.lines(path)) }
  local t = {}
  for l in io.lines(path) do t[#t + 1] = l end
  -- lua5.4 runs in generational mode: parmap ends the fallback to full
  -- collections that building the table left, so the lines are old and a
  -- worker's young collections never write them
  rows[#rows + 1] = run("table", t)
  -- an incremental caller: each worker's first cycle marks every line
  collectgarbage("incremental")
  rows[#rows + 1] = run("table, incremental", t)
  collectgarbage("generational")
  -- the same, with a freed temporary between lines: the worker's
  -- allocations reuse those holes, copying the lines' pages
  t = nil
  collectgarbage("incremental")
  collectgarbage()
  local h = {}
  for l in io.lines(path) do
    local tmp = l:upper()
    h[#h + 1] = l
    if #tmp < 0 then h[#h] = tmp end
  end
  collectgarbage("generational")
  rows[#rows + 1] = run("holes, generational", h)
  collectgarbage("incremental")
  for _, r in ipairs(rows) do
    io.write(fmt("lines    %-21s N=%d wall %5.2f s  cpu %5.2f s = caller %5.2f + workers %5.2f"
      .. " (%.2fx serial; system %4.2f s)  faults caller %7d workers %7d\n",
      r.label, N, r.wall, r.cpu + r.ccpu, r.cpu, r.ccpu, (r.cpu + r.ccpu) / serial, r.sys, r.flt, r.cflt))
  end
  os.remove(path)
else
  error("unknown case " .. case)
end
