-- Worker identity and per-worker state: parmap.worker(), the init and
-- finish options, maxtasks (recycling), and the default N of a nested map.
local parmap = require "parmap"
local core = require "parmap.core"
local H = require "helpers"
local F = require "faults_helpers"
local T = F.T

-- A fresh empty directory (H.tmpdir); files(dir) lists {name = contents}.
local tmpdir = H.tmpdir

local function files(dir)
  local out, n = {}, 0
  local p = io.popen("ls " .. dir)
  for name in p:lines() do
    local f = assert(io.open(dir .. "/" .. name))
    out[name] = f:read("a")
    f:close()
    n = n + 1
  end
  p:close()
  return out, n
end

local rmdir = H.rmdir

local function write(path, s)
  local f = assert(io.open(path, "w"))
  f:write(s)
  f:close()
end

-- Wait (sleeping) until a file exists; false after 30 s.
local function await_file(path)
  return F.within(30, function()
    local f = io.open(path)
    if f then f:close() end
    return f ~= nil
  end)
end

-- Each item's results: {id, n, pid} of the process that ran it.
local function whoami() return { parmap.worker() } end

describe("parmap.worker()", function()
  it("is nil in the caller", function()
    assert.is_nil(parmap.worker())
    assert.equal(0, select("#", parmap.worker()) - 1)
  end)
  it("is the worker's number (1..N) and N inside a worker", function()
    local seen = {} -- pid -> id
    for _, id, n, pid in parmap(function()
      local id, n = parmap.worker()
      return id, n, core.pid()
    end, H.range(40), { N = 2, chunksize = 1 }) do
      assert.equal(2, n)
      assert.is_true(id == 1 or id == 2)
      assert.is_true(seen[pid] == nil or seen[pid] == id) -- one number a process
      seen[pid] = id
    end
    local ids = {}
    for pid, id in pairs(seen) do
      assert.is_nil(ids[id]) -- and one process a number (no worker was replaced)
      ids[id] = pid
    end
  end)
  it("is 1 and 1 in the one worker of N = 1 with a timeout", function()
    local got = parmap.map(function() return { parmap.worker() } end, { 1, 2 },
      { N = 1, timeout = 60 })
    assert.same({ { 1, 1 }, { 1, 1 } }, got)
  end)
  it("is nil on the serial path (N = 1 runs in the caller)", function()
    local got = parmap.map(function() return parmap.worker() or "none" end, { 1, 2 }, { N = 1 })
    assert.same({ "none", "none" }, got)
  end)
  it("is nil in a ReturnProcess child, even one started in a worker", function()
    assert.is_nil(parmap.ReturnProcess(parmap.worker):start():join())
    local got = parmap.map(function()
      local outer = parmap.worker()
      local p = parmap.ReturnProcess(function() return parmap.worker() or "none" end):start()
      return { outer, p:join() }
    end, { 1, 2 }, { N = 2 })
    for i = 1, 2 do
      assert.is_number(got[i][1])
      assert.equal("none", got[i][2])
    end
  end)
  it("in a nested map's worker is the inner number; back in the outer fn, the outer one", function()
    local got = parmap.map(function()
      local outer, on = parmap.worker()
      local inner = parmap.map(whoami, { 1, 2, 3, 4 }, { N = 2, chunksize = 1 })
      local after, an = parmap.worker()
      return { outer = { outer, on }, inner = inner, after = { after, an } }
    end, { 1, 2 }, { N = 2, chunksize = 1 })
    for i = 1, 2 do
      assert.same(got[i].outer, got[i].after)
      for k = 1, 4 do
        local id, n = got[i].inner[k][1], got[i].inner[k][2]
        assert.equal(2, n)
        assert.is_true(id == 1 or id == 2)
      end
    end
  end)
  it("a worker replaced after a death takes the number of the dead one", function()
    -- chunksize = 1: worker 1 gets item 1 and worker 2 item 2 (then 3 and 4
    -- queue behind them). Item 1 dies; item 2 waits until item 3 has run,
    -- so item 3 must run in the replacement of the dead worker.
    local dir = tmpdir()
    local got = H.collect(parmap.parmap(function(x)
      if x == 1 then
        write(dir .. "/dead", tostring(parmap.worker()))
        os.exit(3)
      elseif x == 2 then
        assert(await_file(dir .. "/three"), "item 3 never ran")
      elseif x == 3 then
        write(dir .. "/three", "")
      end
      return parmap.worker(), core.pid()
    end, H.range(4), { N = 2, chunksize = 1, exception = "return" }))
    local dead = tonumber(files(dir).dead)
    rmdir(dir)
    assert.equal("died", got[1][1].kind)
    assert.equal(dead, got[3][1])
    assert.not_equal(dead, got[2][1])
    assert.not_equal(got[2][2], got[3][2])
  end)
end)

describe("the init option", function()
  it("runs once in each worker process, before its first item, with its number", function()
    local state -- set by init in each worker
    local got = parmap.map(function()
      return { state.id, state.pid, state.runs, parmap.worker(), core.pid() }
    end, H.range(30), {
      N = 2, chunksize = 1,
      init = function(id)
        state = { id = id, pid = core.pid(), runs = (state and state.runs or 0) + 1 }
      end,
    })
    assert.is_nil(state) -- not in the caller
    for i = 1, 30 do
      local id, pid, runs, wid, wpid = table.unpack(got[i], 1, 5)
      assert.equal(wid, id)
      assert.equal(wpid, pid)
      assert.equal(1, runs)
    end
  end)
  it("on the serial path runs once in the caller, as worker 1, before the first item", function()
    local log = {}
    local got = parmap.map(function(x) log[#log + 1] = "item" .. x; return x end, { 1, 2 },
      { N = 1, init = function(id) log[#log + 1] = "init" .. id end })
    assert.same({ 1, 2 }, got)
    assert.same({ "init1", "item1", "item2" }, log)
  end)
  it("does not run when there is no item", function()
    local ran = false
    parmap.map(tostring, {}, { N = 1, init = function() ran = true end })
    assert.is_false(ran)
    parmap.map(tostring, {}, { N = 2, init = function() os.exit(9) end }) -- no worker
  end)
  it("raises an error object of kind \"init\" naming the worker, whatever exception says", function()
    for _, exception in ipairs({ "raise", "return", "proc" }) do
      local before = F.snapshot()
      local ok, e = pcall(function()
        for _ in parmap(function(x) return x end, H.range(10),
          { N = 2, chunksize = 1, exception = exception,
            init = function(id) if id == 2 then error({ code = 7 }) end end }) do
        end
      end)
      assert.is_false(ok)
      assert.is_true(parmap.iserror(e), tostring(e))
      assert.equal("init", e.kind)
      assert.equal(2, e.worker)
      assert.is_nil(e.index)
      assert.same({ code = 7 }, e.err)
      assert.is_number(e.pid)
      assert.not_equal(core.pid(), e.pid)
      assert.matches("^parmap: init failed in worker 2 %(pid %d+%): ", tostring(e))
      F.assert_stopped(before)
    end
  end)
  it("is reported as such while the parent is still sending a large item to that worker", function()
    -- the worker's init fails before it reads its first segment, 8 MB of
    -- items from an iterator: the parent must neither take the unfinished
    -- send for a death nor the early frame for a protocol error
    local before = F.snapshot()
    local big = ("x"):rep(8 << 20)
    local k = 0
    local ok, e = pcall(parmap.map, function(s) return #s end,
      function() k = k + 1; if k <= 4 then return big end end,
      { N = 2, chunksize = 1, exception = "return", init = function() error("init boom") end })
    assert.is_false(ok)
    assert.equal("init", e.kind, tostring(e))
    assert.matches("init boom", e.message)
    F.assert_stopped(before)
  end)
  it("raised on the serial path is the same error object, for worker 1", function()
    local ok, e = pcall(parmap.map, tostring, { 1 },
      { N = 1, init = function() error("no database") end })
    assert.is_false(ok)
    assert.equal("init", e.kind)
    assert.equal(1, e.worker)
    assert.equal(core.pid(), e.pid)
    assert.matches("no database", e.message)
    assert.matches("^parmap: init failed in worker 1 %(pid %d+%): .*no database", tostring(e))
  end)
  it("names the loop it was raised to, with every exception mode and on the serial path too", function()
    -- one policy (lua/parmap/errors.lua) for every path: an init error is
    -- raised to the loop, so it says where that loop is
    for _, exception in ipairs({ "raise", "return", "proc" }) do
      for _, N in ipairs({ 1, 2 }) do
        local ok, e = pcall(function()
          for _ in parmap(tostring, { 1, 2, 3 }, { N = N, exception = exception,
            init = function() error("no database") end }) do
          end
        end)
        assert.is_false(ok)
        assert.equal("init", e.kind)
        assert.matches("^spec/workers_spec%.lua:%d+$", e.where, exception .. ", N = " .. N)
      end
    end
  end)
  it("raised in a worker carries the worker's traceback", function()
    local ok, e = pcall(parmap.map, tostring, { 1, 2 },
      { N = 2, init = function() local function opendb() error("refused") end opendb() end })
    assert.is_false(ok)
    assert.matches("opendb", e.traceback)
    assert.not_matches("worker_loop", e.traceback)
  end)
  it("is checked: a function or a callable", function()
    assert.error_matches(function() parmap.map(tostring, { 1 }, { init = 3 }) end,
      "bad option 'init' %(function expected, got 3%)")
    assert.error_matches(function() parmap.map(tostring, { 1 }, { finish = "x" }) end,
      "bad option 'finish' %(function expected, got string \"x\"%)")
    local callable = setmetatable({}, { __call = function() end })
    assert.same({ "1" }, (parmap.map(tostring, { 1 }, { N = 2, init = callable, finish = callable })))
  end)
end)

describe("the finish option", function()
  it("runs in each worker when the map ends; what it writes is there after the map", function()
    local dir = tmpdir()
    local count = 0
    local got = parmap.map(function(x) count = count + 1; return x * 2 end, H.range(50), {
      N = 2,
      init = function() count = 0 end,
      finish = function(id)
        T.sleep(0.2) -- the map waits for it
        write(string.format("%s/%d.%d", dir, id, core.pid()), tostring(count))
      end,
    })
    assert.equal(100, got[50])
    local out, n = files(dir)
    rmdir(dir)
    assert.is_true(n >= 1 and n <= 2)
    local sum = 0
    for name, c in pairs(out) do
      assert.matches("^[12]%.%d+$", name)
      sum = sum + tonumber(c)
    end
    assert.equal(50, sum) -- every item counted by the finish of the worker that ran it
  end)
  it("on the serial path runs in the caller after the last item", function()
    local log = {}
    for _, x in parmap(function(x) log[#log + 1] = "item" .. x; return x end, { 1, 2 },
      { N = 1, finish = function(id) log[#log + 1] = "finish" .. id end }) do
      log[#log + 1] = "got" .. x
    end
    assert.same({ "item1", "got1", "item2", "got2", "finish1" }, log)
  end)
  it("an error in finish goes to stderr and the results stand", function()
    for _, N in ipairs({ 1, 2 }) do
      local out, code = F.run(string.format([[
        local parmap = require "parmap"
        local got = parmap.map(function(x) return x + 1 end, { 1, 2, 3 },
          { N = %d, finish = function(id) error("cannot flush " .. id) end })
        print("results", got[1], got[2], got[3])
      ]], N), 60)
      assert.equal(0, code, out)
      assert.matches("results\t2\t3\t4", out)
      assert.matches("parmap worker [12] %(pid %d+%): finish failed: [^\n]*cannot flush [12]", out)
    end
  end)
end)

describe("nested maps", function()
  it("default to N = 1 inside a worker (the items run in that worker)", function()
    local got = parmap.map(function()
      local me = core.pid()
      local pids = parmap.map(function() return core.pid() end, H.range(6))
      for _, pid in ipairs(pids) do if pid ~= me then return "forked" end end
      return "in place"
    end, { 1, 2 }, { N = 2 })
    assert.same({ "in place", "in place" }, got)
  end)
  it("use N when it is given", function()
    local got = parmap.map(function()
      local me = core.pid()
      local pids = parmap.map(function() return core.pid() end, H.range(4), { N = 2 })
      for _, pid in ipairs(pids) do if pid == me then return "in place" end end
      return "forked"
    end, { 1, 2 }, { N = 2 })
    assert.same({ "forked", "forked" }, got)
  end)
end)

describe("the maxtasks option", function()
  -- {pid = items run} of the results {pid, ...}
  local function per_pid(got, n)
    local count, npids = {}, 0
    for i = 1, n do
      local pid = got[i][1]
      if not count[pid] then npids = npids + 1 end
      count[pid] = (count[pid] or 0) + 1
    end
    return count, npids
  end
  local function pid_and_id(x) return { core.pid(), parmap.worker(), x } end

  it("replaces a worker by a fresh process after k items", function()
    for _, items in ipairs({ H.range(20), (function()
      local i = 0
      return function() i = i + 1; if i <= 20 then return i end end
    end)() }) do
      for _, ordered in ipairs({ true, false }) do
        if type(items) == "function" and not ordered then break end -- consumed
        local got = parmap.map(pid_and_id, items, { N = 2, maxtasks = 3, ordered = ordered })
        for i = 1, 20 do assert.equal(i, got[i][3]) end
        local count, npids = per_pid(got, 20)
        for _, c in pairs(count) do assert.is_true(c <= 3) end
        assert.is_true(npids >= 7) -- ceil(20 / 3)
      end
    end
  end)
  it("with maxtasks = 1 runs every item in its own process", function()
    local got = parmap.map(pid_and_id, H.range(10), { N = 2, maxtasks = 1, chunksize = 4 })
    local _, npids = per_pid(got, 10)
    assert.equal(10, npids)
  end)
  it("keeps the worker numbers 1..N across replacements", function()
    local got = parmap.map(pid_and_id, H.range(30), { N = 2, maxtasks = 2 })
    local idof = {}
    for i = 1, 30 do
      local pid, id = got[i][1], got[i][2]
      assert.is_true(id == 1 or id == 2)
      assert.is_true(idof[pid] == nil or idof[pid] == id)
      idof[pid] = id
    end
  end)
  it("runs init and finish once in each process, recycled ones too", function()
    local dir = tmpdir()
    local inits = 0
    local got = parmap.map(function() return { core.pid(), inits } end, H.range(24), {
      N = 2, maxtasks = 5,
      init = function() inits = inits + 1 end,
      finish = function(id) write(string.format("%s/%d", dir, core.pid()), tostring(id)) end,
    })
    local out = files(dir)
    rmdir(dir)
    local count, npids = per_pid(got, 24)
    assert.is_true(npids >= 5)
    for i = 1, 24 do assert.equal(1, got[i][2]) end -- init ran once before
    for pid, c in pairs(count) do
      assert.is_true(c <= 5)
      assert.is_not_nil(out[tostring(pid)], "no finish in process " .. pid)
    end
  end)
  it("keeps the other numbers working while one process is still in finish", function()
    -- the finish of the process that ran item 1 waits until item 3 (which
    -- only a later process can run: worker 2's replacement) has run
    local dir = tmpdir()
    local mine
    local got = parmap.map(function(x)
      mine = x
      if x == 3 then write(dir .. "/three", "") end
      return x
    end, H.range(4), {
      N = 2, maxtasks = 1, chunksize = 1,
      finish = function()
        if mine == 1 then
          write(dir .. "/finish1", await_file(dir .. "/three") and "item 3 ran" or "gave up")
        end
      end,
    })
    local out = files(dir)
    rmdir(dir)
    assert.same({ 1, 2, 3, 4 }, got)
    assert.equal("item 3 ran", out.finish1)
  end)
  it("still holds when a worker dies: its replacement starts a fresh count", function()
    local got = H.collect(parmap.parmap(function(x)
      if x == 5 then os.exit(4) end
      return core.pid()
    end, H.range(16), { N = 2, maxtasks = 3, exception = "return" }))
    assert.equal("died", got[5][1].kind)
    local count = {}
    for i = 1, 16 do
      if i ~= 5 then
        local pid = got[i][1]
        count[pid] = (count[pid] or 0) + 1
        assert.is_true(count[pid] <= 3)
      end
    end
  end)
  it("works with timeouts: a killed worker is replaced, the others recycled", function()
    local got = H.collect(parmap.parmap(function(x)
      if x == 4 then T.sleep(60) end
      return core.pid()
    end, H.range(12), { N = 2, maxtasks = 2, timeout = F.slow, exception = "return" }))
    assert.equal("timeout", got[4][1].kind)
    local count = {}
    for i = 1, 12 do
      if i ~= 4 then
        local pid = got[i][1]
        count[pid] = (count[pid] or 0) + 1
        assert.is_true(count[pid] <= 2)
      end
    end
  end)
  it("is checked: a positive integer", function()
    for bad, shown in pairs({ [0] = "0", [-1] = "-1", [1.5] = "1.5",
                              x = 'string "x"', [true] = "boolean", ["3"] = 'string "3"' }) do
      assert.error_matches(function() parmap.map(tostring, { 1 }, { maxtasks = bad }) end,
        "bad option 'maxtasks' %(positive integer expected, got "
          .. shown:gsub("%p", "%%%0") .. "%)")
    end
  end)
  it("leaves nothing behind", function()
    local before = F.snapshot()
    parmap.map(tostring, H.range(50), { N = 2, maxtasks = 4, finish = function() end })
    F.assert_stopped(before)
  end)
  it("break stops every worker at once, recycled ones still in finish too", function()
    local before = F.snapshot()
    local t0 = core.now()
    for i in parmap(tostring, H.range(50), { N = 2, maxtasks = 1, chunksize = 1,
      finish = function() T.sleep(60) end }) do
      -- items 1 and 2 are in: both processes are in finish, and their
      -- replacements wait for them to be reaped
      if i == 2 then break end
    end
    F.assert_stopped(before)
    assert.is_true(core.now() - t0 < 50, "waited for a finish") -- not 60 s
  end)
end)
