-- bench/cases.lua: one benchmark case, run in a fresh lua5.4 process by
-- bench/run.lua (so the parent's peak RSS is this case's own).
--
--   lua5.4 bench/cases.lua CASE [key=value ...]
--
-- Prints one line `RESULT key=value ...` (seconds, rates, vm_hwm_kb = this
-- process's peak RSS read from /proc/self/status at the end). Timings are
-- only printed, never asserted; a wrong result is an error.
local parmap = require "parmap"
local now = parmap.now

local name = arg[1] or error("usage: cases.lua CASE [key=value ...]")
local opt = {}
for i = 2, #arg do
  local k, v = arg[i]:match("^([%w_]+)=(.*)$")
  if not k then error("bad argument " .. arg[i]) end
  opt[k] = tonumber(v) or v
end

local function vm_hwm_kb()
  local f = io.open("/proc/self/status")
  if not f then return 0 end
  local s = f:read("a")
  f:close()
  return tonumber(s:match("VmHWM:%s*(%d+)")) or 0
end

local function median(t)
  local c = {}
  for i = 1, #t do c[i] = t[i] end
  table.sort(c)
  local n = #c
  if n == 0 then return 0 end
  if n % 2 == 1 then return c[(n + 1) // 2] end
  return (c[n // 2] + c[n // 2 + 1]) / 2
end

-- CPU seconds of this process and its reaped children (the workers), from
-- /proc/self/stat (clock ticks of 1/100 s): the driver compares them with
-- the whole machine's to see what else ran meanwhile.
local function cpu_seconds()
  local f = io.open("/proc/self/stat")
  if not f then return 0 end
  local s = f:read("a")
  f:close()
  local v, i = {}, 0
  for w in s:match("%) (.*)"):gmatch("%S+") do
    i = i + 1
    v[i] = tonumber(w)
  end
  return ((v[12] or 0) + (v[13] or 0) + (v[14] or 0) + (v[15] or 0)) / 100
end

local function report(t)
  t.vm_hwm_kb = vm_hwm_kb()
  t.cpu_s = cpu_seconds()
  local keys = {}
  for k in pairs(t) do keys[#keys + 1] = k end
  table.sort(keys)
  local parts = { "RESULT" }
  for _, k in ipairs(keys) do
    local v = t[k]
    if math.type(v) == "float" then v = string.format("%.6g", v) end
    parts[#parts + 1] = k .. "=" .. tostring(v)
  end
  print(table.concat(parts, " "))
  io.stdout:flush() -- the driver's window closes when this line arrives
end

local function inc(x) return x + 1 end

-- A busy loop of k steps; its cost is calibrated to milliseconds below.
local function spin(k)
  local x = 0
  for j = 1, k do x = x + j % 7 end
  return x
end

-- Steps of spin per millisecond on this machine (median of a few tries).
local function calibrate()
  local k, tries = 200000, {}
  spin(k) -- warm up
  for _ = 1, 7 do
    local t0 = now()
    spin(k)
    tries[#tries + 1] = k / ((now() - t0) * 1000)
  end
  return median(tries)
end

local cases = {}

-- 1. Tiny items from a table: x + 1 over 1,000,000 integers, N = 2, against
-- a plain serial loop in the same process. variant=for consumes with a for
-- loop (sum); variant=map collects with parmap.map against a serial loop
-- filling a table.
function cases.table(o)
  local n, N, variant = o.items or 1000000, o.N or 2, o.variant or "for"
  local items = {}
  for i = 1, n do items[i] = i end
  local expect = n * (n + 1) // 2 + n
  local ts, tp
  collectgarbage()
  if variant == "for" then
    local t0 = now()
    local s = 0
    for i = 1, n do s = s + inc(items[i]) end
    ts = now() - t0
    assert(s == expect)
    collectgarbage()
    t0 = now()
    s = 0
    for _, r in parmap.parmap(inc, items, { N = N }) do s = s + r end
    tp = now() - t0
    assert(s == expect, "wrong sum")
  else
    local t0 = now()
    local out = {}
    for i = 1, n do out[i] = inc(items[i]) end
    ts = now() - t0
    assert(out[n] == n + 1)
    out = nil
    collectgarbage()
    t0 = now()
    local res, cnt = parmap.map(inc, items, { N = N })
    tp = now() - t0
    assert(cnt == n and res[1] == 2 and res[n] == n + 1, "wrong results")
  end
  report { items = n, N = N, seconds = tp, serial_seconds = ts,
    items_per_s = n / tp, serial_items_per_s = n / ts, ratio = ts / tp }
end

-- 2. Tiny items from an iterator: every item is serialized to a worker.
function cases.iter(o)
  local n, N = o.items or 1000000, o.N or 2
  local function items()
    local i = 0
    return function()
      i = i + 1
      if i <= n then return i end
    end
  end
  local expect = n * (n + 1) // 2 + n
  local t0 = now()
  local s = 0
  for x in items() do s = s + inc(x) end
  local ts = now() - t0
  assert(s == expect)
  collectgarbage()
  t0 = now()
  s = 0
  for _, r in parmap.parmap(inc, items(), { N = N, buffersize = o.buffersize }) do
    s = s + r
  end
  local tp = now() - t0
  assert(s == expect, "wrong sum")
  report { items = n, N = N, seconds = tp, serial_seconds = ts,
    items_per_s = n / tp, serial_items_per_s = n / ts, ratio = ts / tp }
end

-- 3. CPU-bound: 120 items of about 5 ms each, N = 1 (serial, in process)
-- against N = the core count.
function cases.cpu(o)
  local n, ms = o.items or 120, o.ms or 5
  local N = o.N or parmap.ncpu()
  local per_ms = calibrate()
  local k = math.floor(per_ms * ms)
  local items = {}
  for i = 1, n do items[i] = k end
  local t0 = now()
  local r1 = parmap.map(spin, items, { N = 1 })
  local t1 = now() - t0
  t0 = now()
  local r2 = parmap.map(spin, items, { N = N })
  local t2 = now() - t0
  for i = 1, n do assert(r1[i] == r2[i]) end
  report { items = n, N = N, seconds = t2, serial_seconds = t1,
    items_per_s = n / t2, item_ms = t1 * 1000 / n, ratio = t1 / t2 }
end

-- 4. Uneven work: item costs from a Pareto distribution (alpha 1.1, fixed
-- seed, capped at 40 ms), mean ~2.6 ms. `ideal` is the best any schedule
-- could do: total / max(total / N, largest item).
function cases.uneven(o)
  local n, N = o.items or 400, o.N or parmap.ncpu()
  local alpha, xm, cap = o.alpha or 1.1, o.xm or 0.5, o.cap or 40
  local per_ms = calibrate()
  math.randomseed(o.seed or 6)
  local items, total, largest = {}, 0, 0
  for i = 1, n do
    local u = 1 - math.random() -- (0, 1]
    local c = math.min(xm / u ^ (1 / alpha), cap)
    total, largest = total + c, math.max(largest, c)
    items[i] = math.floor(per_ms * c)
  end
  local t0 = now()
  local r1 = parmap.map(spin, items, { N = 1 })
  local t1 = now() - t0
  t0 = now()
  local r2 = parmap.map(spin, items, { N = N })
  local t2 = now() - t0
  for i = 1, n do assert(r1[i] == r2[i]) end
  report { items = n, N = N, seconds = t2, serial_seconds = t1,
    items_per_s = n / t2, ratio = t1 / t2, total_ms = total,
    largest_ms = largest, ideal = total / math.max(total / N, largest) }
end

-- 5. Latency: a map of 2 items with N = 2, per call, after `heap_mb` MB of
-- Lua heap was built in the parent (fork copies its page tables). Also
-- breaks a call down with timestamps (CLOCK_MONOTONIC is shared by the
-- processes): start = core.start returned (both workers forked);
-- in_worker = fn began in the first worker; first = first result in the
-- parent; done = the loop ended (workers closed and reaped).
function cases.latency(o)
  local calls, heap_mb = o.calls or 200, o.heap_mb or 0
  local keep = {}
  if heap_mb > 0 then
    -- tables of 60 integers (~1 KB each, two mallocs), built without
    -- garbage in between: a compact brk heap. (Strings built with
    -- temporaries leave a million small free chunks between them; the first
    -- malloc in each child then consolidates them, COW-faulting every page:
    -- 1.4 s for the first map.)
    local parts = {}
    for j = 1, 60 do parts[j] = "i" end
    local mk = load("local i = ... return {" .. table.concat(parts, ",") .. "}")
    local i = 0
    while collectgarbage("count") < heap_mb * 1024 do
      for _ = 1, 1000 do
        i = i + 1
        keep[i] = mk(i)
      end
    end
  end
  collectgarbage()
  local heap = collectgarbage("count") / 1024
  local function id(x) return x end
  for _ = 1, 3 do parmap.map(id, { 1, 2 }, { N = 2 }) end -- warm up
  local t = {}
  for c = 1, calls do
    local t0 = now()
    local r = parmap.map(id, { 1, 2 }, { N = 2 })
    t[c] = now() - t0
    assert(r[1] == 1 and r[2] == 2)
  end
  local b = { start = {}, in_worker = {}, first = {}, done = {} }
  local stamp = function() return now() end
  for c = 1, math.max(5, calls // 2) do
    local t0 = now()
    local f, s, ctl, closer = parmap.parmap(stamp, { 1, 2 }, { N = 2 })
    local t1, tw, tf = now(), math.huge, nil
    for _, w in f, s, ctl, closer do
      tf = tf or now()
      if w < tw then tw = w end
    end
    local t3 = now()
    b.start[c], b.in_worker[c] = t1 - t0, tw - t0
    b.first[c], b.done[c] = tf - t0, t3 - t0
  end
  local ms = 1000
  report { items = 2, N = 2, calls = calls, heap_mb = heap,
    seconds = median(t), per_call_ms = median(t) * ms,
    min_ms = math.min(table.unpack(t)) * ms,
    start_ms = median(b.start) * ms, in_worker_ms = median(b.in_worker) * ms,
    first_ms = median(b.first) * ms, done_ms = median(b.done) * ms,
    tunables = os.getenv("GLIBC_TUNABLES") or "" }
  keep = nil
end

-- 6. Bandwidth: 20 results of 50 MB strings, workers to parent. The string
-- is built before the map, so workers inherit it and only encode and send
-- it; the parent decodes each into a fresh Lua string (its allocation and
-- page faults are part of the cost).
function cases.bandwidth(o)
  local n, mb, N = o.items or 20, o.mb or 50, o.N or 2
  local size = math.floor(mb * 1000000)
  local big = string.rep("x", size)
  local items = {}
  for i = 1, n do items[i] = i end
  local function fn() return big end
  collectgarbage()
  local t0 = now()
  local bytes = 0
  for _, r in parmap.parmap(fn, items, { N = N }) do bytes = bytes + #r end
  local t = now() - t0
  assert(bytes == n * size)
  report { items = n, N = N, seconds = t, items_per_s = n / t,
    bytes = bytes, gb_per_s = bytes / t / 1e9,
    tunables = os.getenv("GLIBC_TUNABLES") or "" }
end

-- 7. Memory: 10,000,000 items streamed from an iterator through x + 1.
function cases.memory(o)
  local n, N = o.items or 10000000, o.N or 2
  local i = 0
  local function items()
    i = i + 1
    if i <= n then return i end
  end
  local t0 = now()
  local s = 0
  for _, r in parmap.parmap(inc, items, { N = N }) do s = s + r end
  local t = now() - t0
  assert(s == n * (n + 1) // 2 + n, "wrong sum")
  report { items = n, N = N, seconds = t, items_per_s = n / t }
end

local f = cases[name] or error("unknown case " .. name)
f(opt)
