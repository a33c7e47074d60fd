-- The MPI backend: scripts run under
--   timeout 120 mpirun <MPIRUN_FLAGS> -n 3 build/parmap-mpi script.lua
-- Not part of `make test`: `make check-mpi` runs this file (it needs
-- `make mpi`, i.e. an MPI installation). Each script checks itself and
-- prints what the spec compares; each run is bounded by `timeout`.
local H = require "helpers"
local MH = require "mpi_helpers"
local MPIRUN, mpirun, assert_none_left = MH.MPIRUN, MH.mpirun, MH.assert_none_left
local describe_mpi = MH.describer(describe, pending)

describe_mpi("the MPI backend", function()
  it("runs the script once, on rank 0, with arg as lua5.4 sets it", function()
    local out, code = mpirun([[
local parmap = require "parmap"
io.write("\n")
print("script", arg[1], arg[2], select("#", ...), #parmap.map(function(x) return x end, {1, 2, 3}))
]] .. "\n")
    assert.are.equal(0, code, out)
    local n = select(2, out:gsub("\nscript\t", ""))
    assert.are.equal(1, n, out)
    assert.matches("\nscript\tnil\tnil\t0\t3\n", out, 1, true)
  end)

  it("gives the fork backend's results: the call table, both input kinds, "
    .. "ordered and not", function()
    local out, code = mpirun([=[
local parmap = require "parmap"
local function key(t)
  local keys = {}
  for k in pairs(t) do keys[#keys + 1] = k end
  table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
  local s = {}
  for _, k in ipairs(keys) do
    local v = t[k]
    s[#s + 1] = tostring(k) .. "=" .. (type(v) == "table" and key(v) or tostring(v))
  end
  return "{" .. table.concat(s, ",") .. "}"
end
local function run(fn, items, opts, backend)
  local o = {}
  for k, v in pairs(opts) do o[k] = v end
  o.backend = backend
  local src = items
  if type(items) == "function" then src = items() end
  local got = {}
  for i, a, b in parmap(fn, src, o) do got[i] = {a, b} end
  return key(got)
end
local function f(...) return select("#", ...), table.concat({...}, ",") end
local function g(x, kw) return x, key(kw or {}) end
local cases = {
  {f, {1, 2, 3, 4, 5, 6, 7}, {}},
  {f, {{1, 2}, {3, 4, 5}, {n = 2, 6}}, {star = true}},
  {f, {1, 2, 3}, {star = parmap.None, args = {8, 9}}},
  {f, {1, 2, 3}, {args = {n = 2, "a"}}},
  {g, {{1, {s = 3}}, {2, {}}}, {kwstar = true, kwargs = {s = 2, t = 1}}},
  {g, {{s = 3}, {u = 4}}, {star = parmap.None, kwstar = true}},
  {f, {1, 2, 3, n = 5}, {}},
  {f, {}, {}},
}
local bad = 0
for ci, c in ipairs(cases) do
  for _, ordered in ipairs {true, false} do
    for _, kind in ipairs {"table", "iterator"} do
      local items = c[2]
      if kind == "iterator" and items.n == nil then
        items = function()
          local i = 0
          return function() i = i + 1; return c[2][i] end
        end
      end
      local opts = {ordered = ordered}
      for k, v in pairs(c[3]) do opts[k] = v end
      local a = run(c[1], items, opts, "fork")
      local b = run(c[1], items, opts, "mpi")
      if a ~= b then bad = bad + 1; print("case", ci, kind, ordered, a, b) end
    end
  end
end
local big = {}
for i = 1, 20000 do big[i] = i end
local s1 = parmap.map(function(x) return x * 3 end, big)
local s2 = parmap.map(function(x) return x * 3 end, big, {backend = "fork"})
for i = 1, 20000 do if s1[i] ~= s2[i] then bad = bad + 1 end end
print("mismatches", bad)
]=])
    assert.are.equal(0, code, out)
    assert.matches("mismatches\t0\n", out, 1, true)
  end)

  it("sends closures by value: upvalues, shared upvalues, globals, modules",
    function()
      local out, code = mpirun([[
local parmap = require "parmap"
local fmt = string.format
local t = {base = 10}
local n = 0
local function bump() n = n + 1; return n end
local function fact(k) return k <= 1 and 1 or k * fact(k - 1) end
SCALE = 3
function twice(x) return 2 * x end
local r = parmap.map(function(x)
  local a = bump(); local b = bump()
  return fmt("%d:%d:%d:%d", t.base + x, fact(x), twice(x) * SCALE, b - a)
end, {1, 2, 3, 4, 5})
print(table.concat(r, " "))
]])
      assert.are.equal(0, code, out)
      assert.matches("11:1:6:1 12:2:12:1 13:6:18:1 14:24:24:1 15:120:30:1",
        out, 1, true)
    end)

  it("refuses a closure over an open file, naming the upvalue", function()
    local out, code = mpirun([[
local parmap = require "parmap"
local fh = io.stdout
local ok, err = pcall(parmap.map, function(x) fh:write(x) end, {1, 2})
print(ok, err)
]])
    assert.are.equal(0, code, out)
    assert.matches("false\tparmap: upvalue 'fh' of fn: cannot send a FILE*; "
      .. "open it in init", out, 1, true)
  end)

  it("error objects name the host and the rank", function()
    local out, code = mpirun([[
local parmap = require "parmap"
-- the host of the agent that ran it (across hosts, not rank 0's)
local hosts = require("parmap.mpi").hosts()
for i, r in parmap(function(x) if x == 2 then error("boom") end return x end,
    {1, 2, 3}, {exception = "return"}) do
  if parmap.iserror(r) then
    print("error", i, r.kind, r.host == hosts[r.rank].host, r.rank >= 1 and r.rank <= 2)
    print(tostring(r):match("^[^\n]*"))
  end
end
]])
    assert.are.equal(0, code, out)
    assert.matches("error\t2\terror\ttrue\ttrue\n", out, 1, true)
    assert.matches("parmap: item 2 failed in worker %d+ on [^ ]+ %(rank %d%): "
      .. "[^\n]*boom", out)
  end)

  it("exception = 'raise' raises the error object after every earlier result",
    function()
      local out, code = mpirun([[
local parmap = require "parmap"
local items = {}
for i = 1, 1000 do items[i] = i end
local last = 0
local ok, e = pcall(function()
  for i, r in parmap(function(x) if x == 500 then error({code = 7}) end return x end, items) do
    last = i
  end
end)
print(ok, parmap.iserror(e), e.index, e.err.code, last, e.where ~= nil)
print("next map", #parmap.map(function(x) return x end, {1, 2, 3}))
]])
      assert.are.equal(0, code, out)
      assert.matches("false\ttrue\t500\t7\t499\ttrue\nnext map\t3\n", out, 1, true)
    end)

  it("a worker killed inside an agent fails its item; the map goes on",
    function()
      local out, code = mpirun([[
local parmap = require "parmap"
local core = require "parmap.core"
local n, died = 0, nil
for i, r in parmap(function(x)
  if x == 7 then os.execute("kill -9 " .. core.pid()) end
  return x
end, {1, 2, 3, 4, 5, 6, 7, 8, 9, 10}, {exception = "return"}) do
  if parmap.iserror(r) then died = r.kind .. " " .. i .. " " .. r.message else n = n + 1 end
end
print("ok", n, died)
]])
      assert.are.equal(0, code, out)
      -- the message counts the map's items, not the agent's
      assert.matches("ok\t9\tdied 7 worker %d+ killed by signal 9 %(Killed%) "
        .. "while running item 7\n", out)
    end)

  it("an agent killed ends the job with a message naming its rank; no "
    .. "process is left", function()
    local out, code, path = mpirun([[
local parmap = require "parmap"
local items = {}
for i = 1, 40 do items[i] = i end
parmap.map(function(x)
  if x == 20 then os.execute("kill -9 $(ps -o ppid= -p $PPID)") end
  os.execute("sleep 0.05")
  return x
end, items)
print("finished")
]])
    assert.are_not.equal(0, code)
    -- the job ended by itself, not by the bound (timeout's status is 124)
    assert.are_not.equal(124, code, out)
    assert.not_matches("finished", out)
    -- the launcher's message: Open MPI names the rank and the node,
    -- MPICH's hydra the pid and the node, srun the node and the task
    assert.is_truthy(out:match("rank [12] with PID %d+ on node")
      or out:match("PID %d+ RUNNING AT")
      or out:match("srun: error: %S+: task [12]: Killed"), out)
    assert_none_left(path)
  end)

  it("leaving a map early stops it on every agent; the next map is right",
    function()
      local out, code = mpirun([[
local parmap = require "parmap"
local items = {}
for i = 1, 100000 do items[i] = i end
for round = 1, 5 do
  for i in parmap(function(x) return x end, items) do if i == 10 * round then break end end
end
local s = 0
for _, v in ipairs(parmap.map(function(x) return x end, items)) do s = s + v end
print("sum", s)
]])
      assert.are.equal(0, code, out)
      assert.matches("sum\t5000050000\n", out, 1, true)
    end)

  it("a callback that steps its own map gets 'map is busy'; the map stops "
    .. "and the next one runs", function()
    local out, code = mpirun([[
local parmap = require "parmap"
local f, s, c, cl
f, s, c, cl = parmap.parmap(function(x) return x end, {1, 2, 3, 4, 5, 6},
  { progress = function() if s then f(s) end end })
local ok, e = pcall(function() for _ in f, s, c do end end)
print("reentry", ok, (tostring(e):match("map is busy")))
print("open", require("parmap.mpi").busy())
print("next", #parmap.map(function(x) return x end, {1, 2, 3}))
]])
    assert.are.equal(0, code, out)
    assert.matches("reentry\tfalse\tmap is busy\n", out, 1, true)
    assert.matches("open\tfalse\n", out, 1, true)
    assert.matches("next\t3\n", out, 1, true)
  end)

  it("an items iterator's error comes after the items pulled before it, "
    .. "and an item that cannot travel fails at its turn, as on the fork "
    .. "backend", function()
    local out, code = mpirun([[
local parmap = require "parmap"
local function run(backend, items)
  local got, k = {}, 0
  local it = type(items) == "function" and items or function() k = k + 1; return items[k] end
  local ok, e = pcall(function()
    for i, r in parmap.parmap(function(x) return x end, it, { backend = backend, N = 2 }) do
      got[#got + 1] = i .. "=" .. tostring(r)
    end
  end)
  return table.concat(got, ",") .. " | " .. tostring(e)
end
local function boom()
  local n = 0
  return function()
    n = n + 1
    if n == 6 then error("boom at 6", 0) end
    if n <= 10 then return n end
  end
end
local co = coroutine.create(print)
for _, b in ipairs { "fork", "mpi" } do
  print(b, "iterator", run(b, boom()))
  print(b, "shape", run(b, { 1, 2, co, 4 }))
  print(b, "first", run(b, { co, 2 }))
end
print("open", require("parmap.mpi").busy())
]])
    assert.are.equal(0, code, out)
    assert.matches("fork\titerator\t1=1,2=2,3=3,4=4,5=5 | boom at 6\n", out, 1, true)
    for _, case in ipairs { "iterator", "shape", "first" } do
      local fork = ("\n" .. out):match("\nfork\t" .. case .. "\t([^\n]*)\n")
      assert.is_truthy(fork, out)
      assert.matches("\nmpi\t" .. case .. "\t" .. fork, out, 1, true)
    end
    assert.matches("shape\t1=1,2=2 | parmap: item 3: cannot send a thread\n", out, 1, true)
    assert.matches("open\tfalse\n", out, 1, true)
  end)

  it("leaving a map early stops the items running on the agents: the next "
    .. "map does not wait for them", function()
    local mark = H.tmpname() -- seen by every host
    os.remove(mark)
    assert.is_true(os.execute("mkdir " .. mark))
    local out, code = mpirun(string.format([[
local parmap = require "parmap"
local MARK = %q
-- item 1 returns at once; the others run 30 s, then leave a file
for i in parmap(function(x)
  if x == 1 then return x end
  local t = os.time() + 30
  while os.time() < t do end
  io.open(MARK .. "/" .. x, "w"):close()
  return x
end, { 1, 2, 3, 4, 5, 6, 7, 8 }, { N = 2 }) do break end
print("next", #parmap.map(function(x) return x end, { 1, 2, 3, 4 }))
local left = io.popen("ls " .. MARK):read("a")
print("finished items", left == "" and "none" or left)
]], mark))
    os.execute("rm -rf " .. mark)
    assert.are.equal(0, code, out)
    assert.matches("next\t4\nfinished items\tnone\n", out, 1, true)
  end)

  it("the argument fuzz (spec/fuzz_run.lua) finds nothing under parmap-mpi, "
    .. "where maps go to the agents", function()
    -- a new seed each run explores; CI uses a fixed one (as fuzz_spec)
    local seed = tonumber(os.getenv("PARMAP_FUZZ_SEED") or "")
      or (os.getenv("CI") and 20261129) or os.time()
    local out, code = mpirun(string.format([[
local mpi = require "parmap.mpi"
local n, start = 0, mpi.start
mpi.start = function(...) n = n + 1; return start(...) end
local fails = require("fuzz_run")(%d, 1, 2000, 60)
print("mpi maps", n)
os.exit(fails == 0 and 0 or 1)
]], seed))
    local report = {}
    for line in out:gmatch("[^\n]+") do
      if line:match("^FUZZ%-FAIL") and #report < 10 then report[#report + 1] = line end
    end
    assert.are.equal(0, code, string.format("seed %d (replay: PARMAP_FUZZ_SEED=%d)\n%s\n%s",
      seed, seed, table.concat(report, "\n"), out:sub(-1500)))
    assert.matches("FUZZ%-DONE[^\n]* fails=0", out)
    -- most valid maps went to the agents
    assert.is_true(tonumber(out:match("mpi maps\t(%d+)")) > 100, out:sub(-500))
  end)

  it("streams many tiny items from an iterator without deadlock", function()
    local out, code = mpirun([[
local parmap = require "parmap"
local i = 0
local n, s = 0, 0
for k, r in parmap(function(x) return x + 1 end, function() i = i + 1; if i <= 300000 then return i end end) do
  n = n + 1; s = s + r
  if k ~= n then error("out of order") end
end
print("items", n, s)
]])
    assert.are.equal(0, code, out)
    assert.matches("items\t300000\t45000450000\n", out, 1, true)
  end)

  it("splits a message over the size limit into parts (limit 100 bytes here)",
    function()
      local out, code = mpirun([[
local parmap = require "parmap"
local items = {}
for i = 1, 200 do items[i] = string.rep(string.char(65 + i % 26), 1000 + i) end
local r = parmap.map(function(s) return s .. s:lower(), #s end, items)
local ok = 0
for i = 1, 200 do if r[i] == items[i] .. items[i]:lower() then ok = ok + 1 end end
print("ok", ok)
]], 3, nil, "env PARMAP_MPI_MAXMSG=100")
      assert.are.equal(0, code, out)
      assert.matches("ok\t200\n", out, 1, true)
    end)

  it("timeout kills a hung worker inside an agent; its item fails with "
    .. "kind 'timeout'", function()
    local out, code = mpirun([[
local parmap = require "parmap"
local kinds = {}
for i, r in parmap(function(x)
  if x == 3 then os.execute("sleep 30") end
  return x
end, {1, 2, 3, 4}, {exception = "return", timeout = 1}) do
  kinds[#kinds + 1] = parmap.iserror(r) and (r.kind .. "@" .. r.index) or tostring(r)
end
print("kinds", table.concat(kinds, " "))
]])
    assert.are.equal(0, code, out)
    assert.matches("kinds\t1 2 timeout@3 4\n", out, 1, true)
  end)

  it("an init that raises gives the fork backend's error object (kind "
    .. "'init', worker, where), with host and rank", function()
    local out, code = mpirun([[
local parmap = require "parmap"
local function try(backend)
  local ok, e = pcall(parmap.map, function(x) return x end, { 1, 2, 3 },
    { backend = backend, N = 2, init = function(id) error("no db " .. id, 0) end })
  print(backend, ok, parmap.iserror(e), e.kind, type(e.worker), e.err:match("^no db %d$") ~= nil,
    e.where and e.where:match(":3$") ~= nil, e.rank, e.host ~= nil)
  print(backend .. " text", (tostring(e):gsub("\n.*", "")))
end
try("fork")
try("mpi")
print("open", require("parmap.mpi").busy())
]])
    assert.are.equal(0, code, out)
    assert.matches("fork\tfalse\ttrue\tinit\tnumber\ttrue\ttrue\tnil\tfalse\n", out, 1, true)
    assert.matches("mpi\tfalse\ttrue\tinit\tnumber\ttrue\ttrue\t[12]\ttrue\n", out)
    assert.matches("mpi text\tparmap: init failed in worker %d %(pid %d+%) on %S+ %(rank [12]%): no db %d\n", out)
    assert.matches("open\tfalse\n", out, 1, true)
  end)

  it("numbers workers across the job (rank 1: 1-2, rank 2: 3-4 of 4 with "
    .. "N = 2); init gets that number, and an upvalue init sets is the one "
    .. "fn reads", function()
    local out, code = mpirun([[
local parmap = require "parmap"
local ID -- set by init, read by fn: one variable, as in a local worker
local items = {}
for i = 1, 100 do items[i] = i end
local bad, n = {}, 0
for _, id, total, rank, initid in parmap(function(x)
    local id, total = parmap.worker()
    return id, total, tonumber(os.getenv("OMPI_COMM_WORLD_RANK") or os.getenv("PMI_RANK")), ID
  end, items, { N = 2, init = function(id) ID = id end }) do
  n = n + 1
  local lo = (rank - 1) * 2
  if not (total == 4 and id > lo and id <= lo + 2 and initid == id) then
    bad[#bad + 1] = string.format("%s/%s rank %s init %s", id, total, rank, tostring(initid))
  end
end
print("items", n, "bad", #bad, table.concat(bad, ", "))
local w = parmap.map(function() return (parmap.worker()) end, { 1, 2 }, { backend = "fork", N = 2 })
print("fork", w[1] <= 2 and w[2] <= 2)
]])
    assert.are.equal(0, code, out)
    assert.matches("items\t100\tbad\t0\t\n", out, 1, true)
    assert.matches("fork\ttrue\n", out, 1, true)
  end)

  it("init and finish travel too; seed gives the fork backend's numbers",
    function()
      local out, code = mpirun([[
local parmap = require "parmap"
local tag = "T"
local r = parmap.map(function(x) return STATE .. x end, {1, 2, 3},
  {init = function(id) STATE = tag .. (id > 0 and "+" or "-") end,
   finish = function() end})
print("init", table.concat(r, " "))
local a = parmap.map(function() return math.random(1000000) end, {1, 2, 3, 4, 5, 6}, {seed = 42})
local b = parmap.map(function() return math.random(1000000) end, {1, 2, 3, 4, 5, 6}, {seed = 42, backend = "fork"})
print("seed", table.concat(a, ",") == table.concat(b, ","))
]])
      assert.are.equal(0, code, out)
      assert.matches("init\tT+1 T+2 T+3\nseed\ttrue\n", out, 1, true)
    end)

  it("retries run inside the agents; the error says attempts", function()
    local dir = H.tmpname() -- seen by every host
    assert(os.execute("mkdir " .. dir))
    local out, code = mpirun(string.format("local dir = %q\n", dir) .. [[
local parmap = require "parmap"
local function bump(x) -- runs of item x, counted in a file (workers are processes)
  local f = io.open(dir .. "/" .. x)
  local n = f and #f:read("a") or 0
  if f then f:close() end
  f = assert(io.open(dir .. "/" .. x, "a"))
  f:write("x")
  f:close()
  return n + 1
end
local r = parmap.map(function(x)
  if bump(x) == 1 then error("first") end
  return x * 10
end, {1, 2, 3, 4}, {retries = 1})
print("retried", table.concat(r, " "))
local got = {}
for i, e in parmap(function(x) bump("e" .. x); error("always") end, {1, 2},
  {retries = 2, exception = "return"}) do
  got[#got + 1] = e.kind .. "@" .. e.attempts
end
print("attempts", table.concat(got, " "))
os.execute("rm -rf " .. dir)
]])
    assert.are.equal(0, code, out)
    assert.matches("retried\t10 20 30 40\nattempts\terror@3 error@3\n", out, 1, true)
  end)

  it("calls progress with the final count", function()
    local out, code = mpirun([[
local parmap = require "parmap"
local last
parmap.map(function(x) return x end, {1, 2, 3, 4, 5}, {progress = function(d, t) last = d .. "/" .. tostring(t) end})
print("progress", last)
]])
    assert.are.equal(0, code, out)
    assert.matches("progress\t5/5\n", out, 1, true)
  end)

  it("leaves no process behind", function()
    local out, code, path = mpirun([[
local parmap = require "parmap"
parmap.map(function(x) return x end, {1, 2, 3, 4})
]])
    assert.are.equal(0, code, out)
    assert_none_left(path)
  end)

  -- The launcher's flags that keep the job alive after a death:
  -- MPIRUN_RESILIENT_FLAGS, by default --enable-recovery with Open MPI's
  -- mpirun. MPICH's mpirun (hydra) ends the job even with
  -- -disable-auto-cleanup; srun keeps it with --mpi=pmi2 (MPICH) and
  -- --kill-on-bad-exit=0, never with --mpi=pmix (its plugin kills the step).
  local keep = MH.resilient_flags()
  -- srun exits with the status of its worst task: 137 for the killed one
  local srun = MPIRUN:match("srun$") ~= nil
  local it_resilient = keep and it or pending

  it_resilient("resilient = true finishes every item when an "
    .. "agent dies (" .. (keep or "MPIRUN_RESILIENT_FLAGS") .. ")", function()
    local out, code, path = mpirun([[
local parmap = require "parmap"
local items = {}
for i = 1, 40 do items[i] = i end
local r = parmap.map(function(x)
  -- rank 1's agent dies at its first item from 3 on (rank 2 gets it again)
  local rank = os.getenv("OMPI_COMM_WORLD_RANK") or os.getenv("PMI_RANK")
  if rank == "1" and x >= 3 then
    os.execute("kill -9 $(ps -o ppid= -p $PPID)")
  end
  os.execute("sleep 0.05")
  return x * 2
end, items, {resilient = true})
local ok = 0
for i = 1, 40 do if r[i] == 2 * i then ok = ok + 1 end end
print("resilient", ok)
print("next map", #parmap.map(function(x) return x end, items))
]], 3, nil, "env PARMAP_MPI_DEAD_AFTER=2", keep)
    if srun then assert.are.equal(137, code, out) else assert.are.equal(0, code, out) end
    assert.matches("given up", out)
    assert.matches("resilient\t40\nnext map\t40\n", out, 1, true)
    assert_none_left(path)
  end)

  it("a script that plain lua5.4 runs in an MPI job gets a clear error",
    function()
      -- lua5.4 gets the LD_PRELOAD mpirun does not (check-asan's libasan,
      -- which its parmap/core.so needs)
      local out = mpirun([[local parmap = require "parmap"; print("ran")]], 2,
        string.format("env LD_PRELOAD=%q LUA_PATH=%q LUA_CPATH=%q lua5.4",
          os.getenv("LD_PRELOAD") or "", package.path, package.cpath))
      assert.matches("start it through parmap%-mpi", out)
      assert.not_matches("ran", out)
    end)
end)
