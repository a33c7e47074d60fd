-- bench/run.lua: parmap's benchmark suite (`make bench`).
--
-- Runs each case of bench/cases.lua in a fresh lua5.4 process, several
-- times, and prints the medians as one table plus one machine-readable
-- line per case:
--   BENCH case=1 name=table_for items=... N=... seconds=... items_per_s=...
--         ratio=... rss_mb=... goal=... PASS|MISS|INFO
-- The peer (case 8, bench/peer_mp.py) runs when python3 is present.
-- Timings are reported, never asserted: a MISS does not fail the run.
--
-- Environment:
--   BENCH_QUICK=1     one run per case, fewer calls: a short run
--   BENCH_MD=1        also print the table as markdown (bench/RESULTS.md)
--   BENCH_CASES=1,5   only these cases (1..8)
--   BENCH_RUNS=n      runs per case (default 5, 3 or 2 by case)
--   BENCH_LUA         the interpreter for the cases (default: this one)
--   BENCH_NOISE=0.15  a run during which other processes used more than this
--                     share of the CPUs is run again (BENCH_RETRIES=3 times
--                     per case at most); the table's "others' CPU" column
--                     shows the worst share kept (not measured for case 8;
--                     CPU time is sampled in 10 ms ticks, so a short case
--                     reads up to ~10% on an idle machine)
local lua = os.getenv("BENCH_LUA") or arg[-1] or "lua5.4"
local here = arg[0]:match("^(.*)/[^/]*$") or "."
local function flag(name)
  local v = os.getenv(name)
  return v ~= nil and v ~= "" and v ~= "0"
end
local QUICK, MD = flag("BENCH_QUICK"), flag("BENCH_MD")
local RUNS = tonumber(os.getenv("BENCH_RUNS") or "")
local ONLY
if flag("BENCH_CASES") then
  ONLY = {}
  for c in os.getenv("BENCH_CASES"):gmatch("%d+") do ONLY[c] = true end
end
local fmt = string.format
local HUGE = "GLIBC_TUNABLES=glibc.malloc.hugetlb=1"

local function q(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

local function slurp(cmd)
  local p = io.popen(cmd)
  if not p then return "" end
  local s = p:read("a") or ""
  p:close()
  return s
end

local function readfile(path)
  local f = io.open(path)
  if not f then return nil end
  local s = f:read("a")
  f:close()
  return s
end

local function loadavg()
  return ((readfile("/proc/loadavg") or "?"):match("^(%S+ %S+ %S+)")) or "?"
end

local function median(t)
  local c = {}
  for i = 1, #t do c[i] = t[i] end
  table.sort(c)
  local n = #c
  if n % 2 == 1 then return c[(n + 1) // 2] end
  return (c[n // 2] + c[n // 2 + 1]) / 2
end

local function parse(line)
  local r = {}
  for k, v in line:gmatch("([%w_]+)=(%S*)") do r[k] = tonumber(v) or v end
  return r
end

local ncpu = tonumber(slurp("nproc 2>/dev/null"):match("%d+")) or 2

-- Busy CPU seconds of the whole machine so far (all CPUs), /proc/stat.
local function machine_busy()
  local s = readfile("/proc/stat") or ""
  local v, i = {}, 0
  for w in (s:match("^cpu%s+([^\n]*)") or ""):gmatch("%d+") do
    i = i + 1
    v[i] = tonumber(w)
  end
  if i < 4 then return nil end
  -- user nice system idle iowait irq softirq steal: all but idle, iowait
  return ((v[1] or 0) + (v[2] or 0) + (v[3] or 0) + (v[6] or 0) + (v[7] or 0)
    + (v[8] or 0)) / 100
end

local now = require("parmap").now
local NOISE = tonumber(os.getenv("BENCH_NOISE") or "") or 0.15
local RETRIES = tonumber(os.getenv("BENCH_RETRIES") or "") or 3

-- Run a case `runs` times; fields are medians over the runs, vm_hwm_kb the
-- highest. A run during which other processes used more than NOISE of the
-- machine's CPU (its own CPU time, workers included, is told apart) is run
-- again, up to RETRIES times per case; `noise` is the worst kept run's.
-- Returns nil and the output of a run that failed.
local function run_case(case, args, env, runs)
  local all, retries, worst = {}, 0, 0
  local i = 1
  while i <= runs do
    local cmd = fmt("%s%s %s %s %s 2>&1", env and (env .. " ") or "", q(lua),
      q(here .. "/cases.lua"), case, args or "")
    -- the window ends when the case reports (and reads its own CPU time),
    -- not when it has freed its heap and exited
    local b0, t0 = machine_busy(), now()
    local b1, t1, line
    local p, lines = io.popen(cmd), {}
    for l in p:lines() do
      lines[#lines + 1] = l
      if not line and l:match("^RESULT ") then
        b1, t1 = machine_busy(), now()
        line = l:sub(8)
      end
    end
    p:close()
    local out = table.concat(lines, "\n")
    if not line then return nil, out end
    local r = parse(line)
    local noise = 0
    if b0 and b1 and r.cpu_s then
      noise = math.max(0, (b1 - b0 - r.cpu_s) / ((t1 - t0) * ncpu))
    end
    if noise > NOISE and retries < RETRIES then
      retries = retries + 1
      io.stderr:write(fmt("bench:   other processes used %.0f%% of the CPUs: run again\n",
        noise * 100))
      os.execute("sleep 2")
    else
      all[i], i = r, i + 1
      worst = math.max(worst, noise)
    end
  end
  local r = { runs = runs, noise = worst, retries = retries }
  for k, v in pairs(all[1]) do
    if type(v) == "number" then
      local vs = {}
      for i = 1, #all do vs[i] = all[i][k] end
      r[k] = median(vs)
      if k == "vm_hwm_kb" then r[k] = math.max(table.unpack(vs)) end
      if k == "seconds" then
        r.min_seconds = math.min(table.unpack(vs))
        r.max_seconds = math.max(table.unpack(vs))
      end
    else
      r[k] = v
    end
  end
  return r
end

---------------------------------------------------------------- the cases

local function runs_of(n) return RUNS or (QUICK and 1 or n) end

local M = 1e6
-- Each row: id (case number), name, what, case + args (+ env), runs, and
-- goal(r) -> true/false (nil: no goal), goal text, ratio(r), detail(r).
local ROWS = {
  { id = "1", name = "table_for", case = "table", args = "variant=for", runs = 5,
    what = "x + 1 over 1M ints from a table, for loop",
    goal_text = "items/s>=5M,ratio>=0.6",
    goal = function(r) return r.items_per_s >= 5 * M and r.ratio >= 0.6 end,
    ratio = function(r) return r.ratio, "x serial" end,
    detail = function(r)
      return fmt("serial for loop %.1f M/s", r.serial_items_per_s / M)
    end },
  { id = "1", name = "table_map", case = "table", args = "variant=map", runs = 5,
    what = "x + 1 over 1M ints from a table, parmap.map",
    goal_text = "items/s>=5M,ratio>=0.6",
    goal = function(r) return r.items_per_s >= 5 * M and r.ratio >= 0.6 end,
    ratio = function(r) return r.ratio, "x serial" end,
    detail = function(r)
      return fmt("serial loop filling a table %.1f M/s", r.serial_items_per_s / M)
    end },
  { id = "2", name = "iterator", case = "iter", runs = 5,
    what = "x + 1 over 1M ints from an iterator",
    goal_text = "items/s>=3M",
    goal = function(r) return r.items_per_s >= 3 * M end,
    ratio = function(r) return r.ratio, "x serial" end,
    detail = function(r)
      return fmt("serial loop %.1f M/s", r.serial_items_per_s / M)
    end },
  { id = "3", name = "cpu_bound", case = "cpu", args = "N=" .. ncpu, runs = 5,
    what = "120 items of ~5 ms",
    goal_text = fmt("speedup>=%.3g", 0.95 * ncpu),
    goal = function(r) return r.ratio >= 0.95 * ncpu end,
    ratio = function(r) return r.ratio, "x N=1" end,
    detail = function(r) return fmt("N=1 %.3f s, %.2f ms/item", r.serial_seconds, r.item_ms) end },
  { id = "4", name = "uneven", case = "uneven", args = "N=" .. ncpu, runs = 5,
    what = "400 items, Pareto costs (mean ~2.4 ms)",
    goal_text = fmt("speedup>=%.3g", 0.9 * ncpu),
    goal = function(r) return r.ratio >= 0.9 * ncpu end,
    ratio = function(r) return r.ratio, "x N=1" end,
    detail = function(r)
      return fmt("N=1 %.3f s; largest item %.0f of %.0f ms; ideal %.2fx",
        r.serial_seconds, r.largest_ms, r.total_ms, r.ideal)
    end },
  { id = "5", name = "latency", case = "latency", runs = 3,
    args = QUICK and "calls=50" or "calls=200",
    what = "map of 2 items, N=2, small heap",
    goal_text = "per_call_ms<1",
    goal = function(r) return r.per_call_ms < 1 end,
    detail = function(r)
      return fmt("median ms from the call: forks done %.2f, fn starts %.2f, first result %.2f, reaped %.2f",
        r.start_ms, r.in_worker_ms, r.first_ms, r.done_ms)
    end },
  { id = "5", name = "latency_1gb", case = "latency", runs = 2,
    args = QUICK and "heap_mb=1024 calls=10" or "heap_mb=1024 calls=30",
    what = "map of 2 items, N=2, 1 GB Lua heap",
    goal_text = "per_call_ms<20",
    goal = function(r) return r.per_call_ms < 20 end,
    detail = function(r)
      return fmt("heap %.0f MB; forks done %.1f, fn starts %.1f, first %.1f, reaped %.1f ms",
        r.heap_mb, r.start_ms, r.in_worker_ms, r.first_ms, r.done_ms)
    end },
  { id = "5", name = "latency_1gb_hugetlb", case = "latency", runs = 2, env = HUGE,
    args = QUICK and "heap_mb=1024 calls=10" or "heap_mb=1024 calls=30",
    what = "same, " .. HUGE,
    goal_text = "per_call_ms<20",
    goal = function(r) return r.per_call_ms < 20 end,
    detail = function(r)
      return fmt("heap %.0f MB; forks done %.1f, fn starts %.1f, first %.1f, reaped %.1f ms",
        r.heap_mb, r.start_ms, r.in_worker_ms, r.first_ms, r.done_ms)
    end },
  { id = "6", name = "bandwidth", case = "bandwidth", runs = 3,
    what = "20 results of 50 MB strings",
    goal_text = "GB/s>=1",
    goal = function(r) return r.gb_per_s >= 1 end,
    ratio = function(r) return r.gb_per_s, " GB/s" end,
    detail = function(r) return fmt("%.2f GB/s to the parent", r.gb_per_s) end },
  { id = "6", name = "bandwidth_hugetlb", case = "bandwidth", runs = 3, env = HUGE,
    what = "same, " .. HUGE,
    goal_text = "GB/s>=1",
    goal = function(r) return r.gb_per_s >= 1 end,
    ratio = function(r) return r.gb_per_s, " GB/s" end,
    detail = function(r) return fmt("%.2f GB/s to the parent", r.gb_per_s) end },
  { id = "7", name = "memory", case = "memory", runs = 3,
    what = "10M ints streamed from an iterator",
    goal_text = "rss_mb<64",
    goal = function(r) return r.vm_hwm_kb / 1024 < 64 end },
}

---------------------------------------------------------------- output

local results = {} -- rows printed, in order

local function num(v)
  if v == nil then return "-" end
  if math.type(v) == "integer" or (v == math.floor(v) and math.abs(v) < 1e15) then
    return fmt("%d", math.floor(v))
  end
  return fmt("%.4g", v)
end

local function rate(v)
  if v == nil then return "-" end
  if v >= 1e6 then return fmt("%.2f M", v / 1e6) end
  if v >= 1e4 then return fmt("%.1f k", v / 1e3) end
  if v >= 100 then return fmt("%.0f", v) end
  return fmt("%.3g", v)
end

local function secs(v)
  if v == nil then return "-" end
  if v < 0.1 then return fmt("%.2f ms", v * 1000) end
  return fmt("%.3f s", v)
end

-- Add a row: rec has id, name, what, items, N, seconds, items_per_s,
-- ratio (+ ratio_unit), rss_mb, goal_text, status, detail, extra.
local function emit(rec)
  results[#results + 1] = rec
  local parts = { "BENCH", "case=" .. rec.id, "name=" .. rec.name,
    "items=" .. num(rec.items), "N=" .. num(rec.N),
    "seconds=" .. (rec.seconds and fmt("%.6g", rec.seconds) or "-"),
    "items_per_s=" .. (rec.items_per_s and fmt("%.6g", rec.items_per_s) or "-"),
    "ratio=" .. (rec.ratio and fmt("%.4g", rec.ratio) or "-"),
    "rss_mb=" .. (rec.rss_mb and fmt("%.1f", rec.rss_mb) or "-") }
  for _, kv in ipairs(rec.extra or {}) do parts[#parts + 1] = kv end
  parts[#parts + 1] = "goal=" .. (rec.goal_text or "-")
  parts[#parts + 1] = rec.status
  print(table.concat(parts, " "))
  io.stdout:flush()
end

local EXTRA = { "runs", "noise", "retries", "min_seconds", "max_seconds", "serial_items_per_s",
  "serial_seconds", "per_call_ms", "start_ms", "in_worker_ms", "first_ms",
  "done_ms", "heap_mb", "gb_per_s", "largest_ms", "total_ms", "ideal",
  "item_ms", "tunables" }

local function row_record(row, r)
  local rec = { id = row.id, name = row.name, what = row.what,
    items = r.items, N = r.N, seconds = r.seconds, items_per_s = r.items_per_s,
    rss_mb = r.vm_hwm_kb and r.vm_hwm_kb / 1024, goal_text = row.goal_text,
    noise = r.noise,
    extra = {} }
  if row.ratio then rec.ratio, rec.ratio_unit = row.ratio(r) end
  if row.name:match("^latency") then rec.items_per_s = 2 / r.seconds end
  if row.goal then
    rec.status = row.goal(r) and "PASS" or "MISS"
  else
    rec.status = "INFO"
  end
  rec.detail = row.detail and row.detail(r) or ""
  for _, k in ipairs(EXTRA) do
    local v = r[k]
    if v ~= nil and v ~= "" then
      rec.extra[#rec.extra + 1] = k .. "=" .. (type(v) == "number" and fmt("%.6g", v) or v)
    end
  end
  return rec
end

---------------------------------------------------------------- main

local t_start = os.time()
local load_start = loadavg()
local cpu = (readfile("/proc/cpuinfo") or ""):match("model name%s*:%s*([^\n]+)") or "?"
local mem = (readfile("/proc/meminfo") or ""):match("MemTotal:%s*(%d+)")
local kernel = slurp("uname -r 2>/dev/null"):gsub("%s+$", "")
local machine = fmt("%s, %d CPUs (nproc), %s GiB RAM, Linux %s", cpu, ncpu,
  mem and fmt("%.0f", tonumber(mem) / 1048576) or "?", kernel)
print(fmt("parmap bench %s: %s", os.date("%Y-%m-%d %H:%M"), machine))
print(fmt("interpreter %s; load average at start %s%s", lua, load_start,
  QUICK and "; BENCH_QUICK=1 (one run per case)" or ""))
if tonumber(load_start:match("^%S+")) and tonumber(load_start:match("^%S+")) > 0.5 then
  print("warning: the machine is busy (load > 0.5): timings are pessimistic")
end

local by_name = {}
for _, row in ipairs(ROWS) do
  if not ONLY or ONLY[row.id] then
    io.stderr:write(fmt("bench: case %s %s ...\n", row.id, row.name))
    local r, out = run_case(row.case, row.args, row.env, runs_of(row.runs))
    if not r then
      emit { id = row.id, name = row.name, what = row.what, status = "FAIL",
        detail = "the case failed", goal_text = row.goal_text }
      io.stderr:write(out, "\n")
    else
      by_name[row.name] = r
      emit(row_record(row, r))
    end
  end
end

-- 8. The peer: Python's multiprocessing.Pool.imap on cases 1, 3 and 5.
local function have_python()
  return slurp("command -v python3 2>/dev/null"):match("%S") ~= nil
end
if (not ONLY or ONLY["8"]) and have_python() then
  io.stderr:write("bench: case 8 python3 multiprocessing.Pool.imap ...\n")
  local out = slurp(fmt("python3 %s %s 2>&1", q(here .. "/peer_mp.py"),
    QUICK and "quick" or ""))
  local peer = {}
  for line in out:gmatch("PEER ([^\n]*)") do
    local r = parse(line)
    peer[tostring(r.case)] = r
  end
  local p1, p3, p5 = peer["1"], peer["3"], peer["5"]
  local lua1, lua3, lua5 = by_name.table_for, by_name.cpu_bound, by_name.latency
  if p1 then
    local ratio = lua1 and lua1.items_per_s / p1.items_per_s
    emit { id = "8", name = "peer_table", what = "Pool.imap: case 1, best chunksize",
      items = p1.items, N = p1.N, seconds = p1.seconds, items_per_s = p1.items_per_s,
      ratio = ratio, ratio_unit = "x parmap/peer", goal_text = "parmap/peer>=2",
      status = ratio and (ratio >= 2 and "PASS" or "MISS") or "INFO",
      detail = fmt("for loop; chunksize %d (M/s by chunksize: %s); sum() instead of a for loop %.2f M/s; pool start excluded",
        p1.chunksize, (tostring(p1.tried):gsub(",", ", ")), (p1.sum_items_per_s or 0) / M),
      extra = { "chunksize=" .. p1.chunksize,
        fmt("peer_sum_items_per_s=%.6g", p1.sum_items_per_s or 0) } }
  end
  if p3 then
    local ratio = lua3 and lua3.ratio / p3.ratio
    emit { id = "8", name = "peer_cpu", what = "Pool.imap: case 3, speed-up over a serial loop",
      items = p3.items, N = p3.N, seconds = p3.seconds, items_per_s = p3.items / p3.seconds,
      ratio = ratio, ratio_unit = "x parmap/peer speed-ups", goal_text = "-",
      status = "INFO",
      detail = fmt("peer speed-up %.2fx (serial %.3f s, %.2f ms/item)", p3.ratio,
        p3.serial_seconds, p3.item_ms),
      extra = { fmt("peer_speedup=%.4g", p3.ratio) } }
  end
  if p5 then
    local ms = lua5 and lua5.per_call_ms
    emit { id = "8", name = "peer_latency_cold", what = "Pool(2) start + imap of 2 items + close/join",
      items = 2, N = 2, seconds = p5.cold_ms / 1000, items_per_s = 2000 / p5.cold_ms,
      ratio = ms and p5.cold_ms / ms, ratio_unit = "x peer/parmap time", goal_text = "-",
      status = "INFO", detail = "like a parmap call: processes started and reaped each time",
      extra = { fmt("cold_ms=%.4g", p5.cold_ms) } }
    emit { id = "8", name = "peer_latency_warm", what = "imap of 2 items on a running Pool(2)",
      items = 2, N = 2, seconds = p5.warm_ms / 1000, items_per_s = 2000 / p5.warm_ms,
      ratio = ms and p5.warm_ms / ms, ratio_unit = "x peer/parmap time", goal_text = "-",
      status = "INFO", detail = "no process start: not what a parmap call does",
      extra = { fmt("warm_ms=%.4g", p5.warm_ms) } }
  end
  if not (p1 or p3 or p5) then
    emit { id = "8", name = "peer", what = "python3 bench/peer_mp.py",
      status = "FAIL", detail = "the peer failed", goal_text = "-" }
    io.stderr:write(out, "\n")
  end
elseif not ONLY or ONLY["8"] then
  print("case 8 skipped: no python3")
end

---------------------------------------------------------------- the table

local function ratio_text(rec)
  if not rec.ratio then return "-" end
  local u = rec.ratio_unit or "x"
  if u:sub(1, 1) == "x" then return fmt("%.2f%s", rec.ratio, u) end
  return fmt("%.2f%s", rec.ratio, u)
end

local HEAD = { "case", "workload", "items", "N", "seconds", "items/s",
  "speed-up / ratio", "peak RSS", "others' CPU", "goal", "result" }
local function cells(rec)
  return { rec.id, rec.what or rec.name, rec.items and num(rec.items) or "-",
    rec.N and num(rec.N) or "-", secs(rec.seconds), rate(rec.items_per_s),
    ratio_text(rec), rec.rss_mb and fmt("%.1f MB", rec.rss_mb) or "-",
    rec.noise and fmt("%.0f%%", rec.noise * 100) or "-",
    rec.goal_text or "-", rec.status }
end

local load_end = loadavg()
print()
local rows = { HEAD }
for _, rec in ipairs(results) do rows[#rows + 1] = cells(rec) end
local width = {}
for _, r in ipairs(rows) do
  for j, c in ipairs(r) do width[j] = math.max(width[j] or 0, utf8.len(c) or #c) end
end
for i, r in ipairs(rows) do
  local out = {}
  for j, c in ipairs(r) do
    local pad = width[j] - (utf8.len(c) or #c)
    out[j] = (j <= 2 or j >= 10) and (c .. (" "):rep(pad)) or ((" "):rep(pad) .. c)
  end
  print((table.concat(out, "  "):gsub("%s+$", "")))
  if i == 1 then
    local dash = {}
    for j = 1, #width do dash[j] = ("-"):rep(width[j]) end
    print(table.concat(dash, "  "))
  end
end
print()
for _, rec in ipairs(results) do
  if rec.detail and rec.detail ~= "" then
    print(fmt("  %s %-20s %s", rec.id, rec.name, rec.detail))
  end
end
print(fmt("\nBENCH_ENV date=%s nproc=%d load_start=%s load_end=%s wall_s=%d quick=%d",
  os.date("%Y-%m-%d"), ncpu, load_start:gsub(" ", ","), load_end:gsub(" ", ","),
  os.time() - t_start, QUICK and 1 or 0))

if MD then
  print()
  print("| " .. table.concat(HEAD, " | ") .. " | notes |")
  print("|" .. ("---|"):rep(#HEAD + 1))
  for _, rec in ipairs(results) do
    local c = cells(rec)
    c[#c + 1] = rec.detail or ""
    for j = 1, #c do c[j] = c[j]:gsub("|", "\\|") end
    print("| " .. table.concat(c, " | ") .. " |")
  end
  print()
  print(fmt("Measured %s on %s; load average %s at the start, %s at the end; `%s`.",
    os.date("%Y-%m-%d"), machine, load_start, load_end,
    (QUICK and "BENCH_QUICK=1 " or "") .. "BENCH_MD=1 make bench"))
end
