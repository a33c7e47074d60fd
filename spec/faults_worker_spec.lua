-- Fault injection, worker side: fn raises, the worker exits, is killed,
-- crashes or runs out of memory, dies while the parent writes to it, hangs;
-- and what workers do to the caller's output, finalizers and <close>s.
-- "Stopped" always means: every worker reaped, no zombie, no fd leaked.
local parmap = require "parmap"
local core = require "parmap.core"
local H = require "helpers"
local F = require "faults_helpers"
local T = F.T

-- Run a loop over parmap.parmap(fn, items, opts) under pcall: the results
-- yielded before it stopped, the error (if any), how long it took.
local function drive(fn, items, opts)
  local seen, t0 = {}, core.now()
  local ok, err = pcall(function()
    for i, r in parmap.parmap(fn, items, opts) do seen[#seen + 1] = { i, r } end
  end)
  return seen, (not ok) and err or nil, core.now() - t0
end

---------------------------------------------------------------- case 1

describe("faults: fn raises (case 1)", function()
  local E_TABLE = { code = 7, tags = { "a", "b" } }
  local OBJ_MT = { __tostring = function(o) return "object " .. o.id end }
  local raisers = {
    string = function(x) if x == 3 then error("boom " .. x) end return x end,
    table = function(x) if x == 3 then error(E_TABLE) end return x end,
    tostring = function(x)
      if x == 3 then error(setmetatable({ id = x }, OBJ_MT)) end
      return x
    end,
    ["nil"] = function(x) if x == 3 then error(nil) end return x end,
  }
  local messages = {
    string = "boom 3$", table = "^%(error object is a table value%)$",
    tostring = "^object 3$", ["nil"] = "^%(error object is a nil value%)$",
  }
  local function check_err(kind, e)
    assert.is_true(parmap.iserror(e))
    assert.equal(3, e.index)
    assert.equal("error", e.kind)
    assert.matches(messages[kind], e.message)
    if kind == "string" then assert.matches("boom 3$", e.err) end
    if kind == "table" then assert.same(E_TABLE, e.err) end
    if kind == "tostring" then assert.same({ id = 3 }, e.err) end -- no metatable
    if kind == "nil" then assert.is_nil(e.err) end
    assert.matches("^stack traceback:", e.traceback)
    assert.matches("faults_worker_spec.lua:%d+", e.traceback)
    assert.are_not.equal(core.pid(), e.pid)
    assert.matches("^parmap: item 3 failed in worker " .. e.pid .. ": ", tostring(e))
  end

  for _, kind in ipairs({ "string", "table", "tostring", "nil" }) do
    it(kind .. " error, exception = 'raise': raised at item 3's turn after 1 and 2", function()
      local before = F.snapshot()
      local seen, e = drive(raisers[kind], H.range(10), { N = 2, chunksize = 1 })
      assert.same({ { 1, 1 }, { 2, 2 } }, seen)
      check_err(kind, e)
      F.assert_stopped(before)
    end)
    it(kind .. " error, exception = 'return': yielded, and the map goes on", function()
      local before = F.snapshot()
      local got = H.collect(parmap.parmap(raisers[kind], H.range(10),
        { N = 2, exception = "return" }))
      for i = 1, 10 do
        if i == 3 then check_err(kind, got[3][1]) else assert.same({ n = 1, i }, got[i]) end
      end
      F.assert_stopped(before)
    end)
    it(kind .. " error, exception = 'proc': the original value is raised", function()
      local before = F.snapshot()
      local seen, e = drive(raisers[kind], H.range(10), { N = 2, chunksize = 1, exception = "proc" })
      assert.same({ { 1, 1 }, { 2, 2 } }, seen)
      if kind == "string" then assert.matches("faults_worker_spec.lua:%d+: boom 3$", e) end
      if kind == "table" then assert.same(E_TABLE, e) end
      if kind == "tostring" then assert.same({ id = 3 }, e) end
      if kind == "nil" then assert.is_nil(e) end
      F.assert_stopped(before)
    end)
  end

  it("parmap.map with exception = 'return' keeps the error objects", function()
    for _, kind in ipairs({ "string", "table", "tostring" }) do
      local out, n = parmap.map(raisers[kind], H.range(5), { N = 2, exception = "return" })
      assert.equal(5, n)
      check_err(kind, out[3])
      assert.same({ 1, 2, nil, 4, 5 }, { out[1], out[2], nil, out[4], out[5] })
    end
    local out = parmap.map(function(x) if x == 2 then os.exit(1) end return x end, H.range(3),
      { N = 2, exception = "return" })
    assert.is_true(parmap.iserror(out[2]))
    assert.equal("died", out[2].kind)
  end)
  it("a table error that cannot travel arrives as its string form", function()
    local got = H.collect(parmap.parmap(function() error({ f = print }) end, { 1 },
      { N = 2, exception = "return" }))
    assert.equal("(error object is a table value)", got[1][1].err)
  end)
  it("an error whose __tostring raises does not kill the worker", function()
    local got = H.collect(parmap.parmap(function(x)
      if x == 1 then error(setmetatable({}, { __tostring = function() error("nested") end })) end
      return x
    end, { 1, 2 }, { N = 2, exception = "return" }))
    assert.is_true(parmap.iserror(got[1][1]))
    assert.equal(1, got[1][1].index)
    assert.same({ n = 1, 2 }, got[2])
  end)
  it("every item failing still ends, with one error each", function()
    local got = H.collect(parmap.parmap(function(x) error("no " .. x) end, H.range(200),
      { N = 2, exception = "return" }))
    for i = 1, 200 do assert.matches("no " .. i .. "$", got[i][1].err) end
    assert.same({}, H.children())
  end)
end)

---------------------------------------------------------------- case 2

describe("faults: the worker exits, is killed or crashes (case 2)", function()
  -- The dying worker writes the time of its death here (core.now() is
  -- CLOCK_MONOTONIC, the same clock in every process): "within a second"
  -- is measured from the death, not from the start of the map.
  local death_file = "/tmp/parmap-faults-death-" .. core.pid()
  local function mark_death()
    local f = assert(io.open(death_file, "w"))
    f:write(string.format("%.6f", core.now()))
    f:close()
  end
  local function death_time()
    local f = io.open(death_file)
    if not f then return nil end
    local t = tonumber(f:read("a"))
    f:close()
    os.remove(death_file)
    return t
  end
  -- How item 4 ends its worker, and what the message must say.
  local sig = function(n) return "killed by signal " .. n end
  local ways = {
    { "os.exit(3)", function() os.exit(3) end, "exited with status 3" },
    { "os.exit(true)", function() os.exit(true) end, "exited with status 0" },
    { "os.exit(false)", function() os.exit(false) end, "exited with status 1" },
    { "SIGKILL from outside", function() os.execute("kill -KILL " .. core.pid()) F.spin(5) end, sig(9) },
    { "SIGTERM from outside", function() os.execute("kill -TERM " .. core.pid()) F.spin(5) end, sig(15) },
    { "SIGSEGV", function() T.segfault() end, sig(11) },
    { "abort()", function() T.abort() end, sig(6) },
  }
  for _, w in ipairs(ways) do
    local name, die, status = w[1], w[2], w[3]
    it(name .. ": raises naming the item and how, within a second, after the results before it", function()
      local before = F.snapshot()
      os.remove(death_file)
      local seen, e = drive(function(x)
        if x == 4 then mark_death() die() end
        return x
      end, H.range(8), { N = 2, chunksize = 1 })
      local raised = core.now()
      local died = death_time()
      assert.same({ { 1, 1 }, { 2, 2 }, { 3, 3 } }, seen)
      assert.is_true(parmap.iserror(e), tostring(e))
      assert.equal(4, e.index)
      assert.equal("died", e.kind)
      assert.matches("^worker " .. e.pid .. " " .. status .. ".* while running item 4$", e.message)
      assert.matches("item 4 failed in worker %d+: worker %d+ " .. status, tostring(e))
      assert.is_not_nil(died, "the worker did not record its death")
      assert.is_true(raised - died < F.bound(1), "raised " .. (raised - died) .. " s after the death")
      F.assert_stopped(before)
    end)
    it(name .. ": with exception = 'return' yields the error and every other result", function()
      local before = F.snapshot()
      local got = H.collect(parmap.parmap(function(x)
        if x % 4 == 0 then die() end
        return x
      end, H.range(12), { N = 2, exception = "return" }))
      for i = 1, 12 do
        if i % 4 == 0 then
          assert.equal("died", got[i][1].kind)
          assert.equal(i, got[i][1].index)
          assert.matches(status .. ".* while running item " .. i .. "$", got[i][1].message)
        else
          assert.same({ n = 1, i }, got[i])
        end
      end
      F.assert_stopped(before)
    end)
  end
  it("with exception = 'proc' each death raises its message, after the results before it", function()
    for _, w in ipairs(ways) do
      local name, die, status = w[1], w[2], w[3]
      local before = F.snapshot()
      local seen, e = drive(function(x)
        if x == 4 then die() end
        return x
      end, H.range(8), { N = 2, chunksize = 1, exception = "proc" })
      assert.same({ { 1, 1 }, { 2, 2 }, { 3, 3 } }, seen, name)
      assert.is_string(e, name)
      assert.matches("^worker %d+ " .. status .. ".* while running item 4$", e, name)
      F.assert_stopped(before)
    end
  end)

  -- Item 2 runs its worker out of memory: Lua raises "not enough memory",
  -- or a worker whose allocator aborts dies; either way item 2 fails.
  local function oom(x)
    if x == 2 then
      assert(T.limit_memory(64 * 1024 * 1024))
      local big = string.rep("x", 512 * 1024 * 1024)
      return #big
    end
    return x
  end
  local function check_oom(e)
    assert.is_true(parmap.iserror(e), tostring(e))
    assert.equal(2, e.index)
    if e.kind == "error" then
      assert.matches("not enough memory", e.message)
    else
      assert.equal("died", e.kind)
      assert.matches("while running item 2", e.message)
    end
  end
  it("out of memory (ulimit -v): raises naming the item, within a second, after the results before it", function()
    local before = F.snapshot()
    local seen, e, took = drive(oom, { 1, 2, 3, 4 }, { N = 2, chunksize = 1 })
    assert.same({ { 1, 1 } }, seen)
    check_oom(e)
    assert.is_true(took < F.bound(1), "took " .. took .. " s")
    F.assert_stopped(before)
  end)
  it("out of memory (ulimit -v), exception = 'return': yields the error and the other results", function()
    local before = F.snapshot()
    local got = H.collect(parmap.parmap(oom, { 1, 2, 3 }, { N = 2, exception = "return" }))
    check_oom(got[2][1])
    assert.same({ n = 1, 1 }, got[1])
    assert.same({ n = 1, 3 }, got[3])
    F.assert_stopped(before)
  end)
  it("out of memory while encoding a result: that item fails, the worker's later results are intact", function()
    -- the result fits in the worker's Lua heap but not in its send buffer:
    -- the encoder runs out of memory half-way through the record, after it
    -- met `shared`, which every later result holds too
    local before = F.snapshot()
    local shared = { "shared" }
    local got = H.collect(parmap.parmap(function(x)
      if x == 2 then
        local s = string.rep("y", 64 * 1024 * 1024)
        assert(T.limit_memory(8 * 1024 * 1024))
        return { shared, s }
      end
      return { shared, x }
    end, H.range(20), { N = 2, chunksize = 1, exception = "return" }))
    local e = got[2][1]
    assert.is_true(parmap.iserror(e), tostring(e))
    assert.equal(2, e.index)
    assert.equal("error", e.kind)
    assert.matches("not enough memory", e.message)
    for i = 1, 20 do
      if i ~= 2 then assert.same({ n = 1, { { "shared" }, i } }, got[i]) end
    end
    F.assert_stopped(before)
  end)
  it("out of memory while reading an item: that item fails, the next ones in its segment are not garbled", function()
    -- items 1-4 go to one worker as one segment: item 1 limits its memory,
    -- item 2 (64 MB) cannot be decoded there; 3 and 4 must still be 3 and 4
    local before = F.snapshot()
    local big = string.rep("z", 64 * 1024 * 1024)
    local k = 0
    local got = H.collect(parmap.parmap(function(x)
      if x == 1 then assert(T.limit_memory(16 * 1024 * 1024)) end
      return type(x) == "string" and #x or x
    end, function()
      k = k + 1
      if k == 2 then return big end
      if k <= 8 then return k end
    end, { N = 1, timeout = 1000, chunksize = 4, exception = "return" }))
    local e = got[2][1]
    assert.is_true(parmap.iserror(e), tostring(e))
    assert.equal(2, e.index)
    if e.kind == "error" then
      assert.matches("not enough memory", e.message)
    else
      assert.equal("died", e.kind)
      assert.matches("while running item 2$", e.message)
    end
    for i = 1, 8 do
      if i ~= 2 then assert.same({ n = 1, i }, got[i]) end
    end
    F.assert_stopped(before)
  end)
  it("a death with queued segments costs only the running item: the rest run again", function()
    local before = F.snapshot()
    local parent = core.pid()
    local got = H.collect(parmap.parmap(function(x)
      if x == 6 then
        -- only the first worker to run item 6 dies; a rerun would succeed
        local f = io.open("/tmp/parmap-faults-" .. parent .. "-6", "r")
        if not f then
          io.open("/tmp/parmap-faults-" .. parent .. "-6", "w"):close()
          os.exit(9)
        end
        f:close()
      end
      return x * 10
    end, H.range(40), { N = 2, chunksize = 4, exception = "return" }))
    os.remove("/tmp/parmap-faults-" .. parent .. "-6")
    for i = 1, 40 do
      if i == 6 then
        assert.equal("died", got[6][1].kind)
        assert.matches("exited with status 9 while running item 6$", got[6][1].message)
      else
        assert.same({ n = 1, i * 10 }, got[i])
      end
    end
    F.assert_stopped(before)
  end)
  it("every worker dying on every item still ends: one error per item", function()
    local before = F.snapshot()
    local got, order = H.collect(parmap.parmap(function(x) os.exit(x % 200) end, H.range(30),
      { N = 2, exception = "return" }))
    assert.equal(30, #order)
    for i = 1, 30 do
      assert.equal("died", got[i][1].kind)
      assert.matches("exited with status " .. i .. " while running item " .. i .. "$", got[i][1].message)
    end
    F.assert_stopped(before)
  end)
  it("a worker killed while it runs nothing costs no item", function()
    local before = F.snapshot()
    local pids = {}
    local got, order = {}, {}
    for i, pid in parmap.parmap(function(x)
      if x > 2 then F.spin(0.05) end
      return core.pid()
    end, H.range(20), { N = 2, chunksize = 1, exception = "return" }) do
      got[i], order[#order + 1] = pid, i
      if i == 1 then
        -- idle or not, kill every worker now; each death costs at most one item
        for _, k in ipairs(H.children()) do pids[#pids + 1] = k; T.kill(k, T.SIGKILL) end
      end
    end
    assert.equal(20, #order)
    local died = 0
    for i = 1, 20 do
      if parmap.iserror(got[i]) then
        died = died + 1
        assert.equal("died", got[i].kind)
      end
    end
    assert.is_true(died <= #pids)
    F.assert_stopped(before)
  end)
  it("a worker whose fn forked a process that keeps its socket open: its death is seen within a second", function()
    -- no end of file will come while the grandchild lives (it sleeps until
    -- killed): waitpid finds the death
    local before = F.snapshot()
    local pidfile = F.marker()
    local got, t0 = {}, core.now()
    local ok, e = pcall(function()
      for i, r in parmap.parmap(function(x)
        if x == 5 then
          local f = assert(io.open(pidfile, "w"))
          f:write(T.fork_sleep(3600))
          f:close()
          os.exit(3)
        end
        return x
      end, H.range(8), { N = 2, chunksize = 1 }) do got[i] = r end
    end)
    local took = core.now() - t0
    local f = assert(io.open(pidfile))
    local grandchild = tonumber(f:read("a"))
    f:close()
    os.remove(pidfile)
    assert.is_true(T.alive(grandchild), "the death was seen only once the grandchild ended")
    T.kill(grandchild, T.SIGKILL)
    assert.is_false(ok)
    assert.equal(5, e.index)
    assert.equal("died", e.kind)
    assert.matches("exited with status 3", e.message)
    for i = 1, 4 do assert.equal(i, got[i]) end
    assert.is_true(took < F.bound(1), "took " .. took)
    F.assert_stopped(before)
  end)
end)

---------------------------------------------------------------- case 3

describe("faults: a worker dies while the parent writes a large item (case 3)", function()
  -- N = 1 with a timeout runs one worker: item 2 (100 MB) is queued to it
  -- while it runs item 1, which waits until item 2's first bytes sit in its
  -- socket (the parent is then part-way through writing it), and dies.
  local function script(die)
    return [[
      local parmap = require "parmap"
      local core = require "parmap.core"
      local H = require "helpers"
      local F = require "faults_helpers"
      local T = F.T
      assert(T.disposition(T.SIGPIPE) == "default", "SIGPIPE must be at its default")
      local big = string.rep("z", 100 * 1024 * 1024)
      local items = { "small", big }
      local k = 0
      local function nfds() local n = 0 for _ in pairs(T.fds()) do n = n + 1 end return n end
      local fds0 = nfds()
      for i, r in parmap.parmap(function(x)
        if x == "small" then
          local sock, t0 = F.my_socket(), core.now()
          repeat T.sleep(0.002) until T.inq(sock) > 0 or core.now() - t0 > 60
          io.stderr:write("WRITING ", T.inq(sock), "\n")
          ]] .. die .. [[

        end
        return #x
      end, function() k = k + 1; return items[k] end,
        { N = 1, timeout = 1000, exception = "return" }) do
        print(i, parmap.iserror(r) and r.message or r)
      end
      print("end", #H.children(), nfds() - fds0)
    ]]
  end
  local function check(out, code, status)
    assert.equal(0, code, out)
    local queued = tonumber(out:match("WRITING (%d+)\n"))
    assert.is_true(queued ~= nil and queued > 0 and queued < 100 * 1024 * 1024, out)
    assert.matches("1\tworker %d+ " .. status .. " while running item 1\n", out)
    assert.matches("\n2\t104857600\n", out)
    assert.matches("end\t0\t0\n$", out) -- no child, no fd left
  end
  it("the worker exits: the parent gets an error record, not SIGPIPE", function()
    local out, code = F.run(script("os.exit(3)"), 120)
    check(out, code, "exited with status 3")
  end)
  it("the worker is killed: the same, and the large item runs again elsewhere", function()
    local out, code = F.run(script("T.kill(core.pid(), T.SIGKILL) T.sleep(3600)"), 120)
    check(out, code, "killed by signal 9 %(Killed%)")
  end)
end)

---------------------------------------------------------------- case 4

describe("faults: a hung worker and option timeout (case 4)", function()
  -- the fast items must never reach the timeout, however loaded the machine
  local TO = F.slow
  local function hang(x)
    if x == 3 then T.sleep(3600) end -- blocked in C, not in Lua
    return x
  end
  it("kills the worker and raises, naming the item, after the results before it", function()
    local before = F.snapshot()
    local seen, e, took = drive(hang, H.range(6), { N = 2, chunksize = 1, timeout = TO })
    assert.same({ { 1, 1 }, { 2, 2 } }, seen)
    assert.is_true(parmap.iserror(e))
    assert.equal(3, e.index)
    assert.equal("timeout", e.kind)
    assert.matches("^item 3 timed out after " .. TO .. " s %(worker %d+ was killed%)$", e.message)
    assert.is_true(took < TO + F.bound(1), "took " .. took)
    F.assert_stopped(before)
  end)
  it("with exception = 'return' yields the error and goes on", function()
    local before = F.snapshot()
    local got = H.collect(parmap.parmap(hang, H.range(6),
      { N = 2, timeout = TO, exception = "return" }))
    assert.equal("timeout", got[3][1].kind)
    assert.equal(3, got[3][1].index)
    for _, i in ipairs({ 1, 2, 4, 5, 6 }) do assert.same({ n = 1, i }, got[i]) end
    F.assert_stopped(before)
  end)
  it("applies per item: a chunk longer than the timeout is fine", function()
    local out = parmap.map(function(x) T.sleep(0.02) return x end, H.range(40),
      { N = 2, chunksize = 20, timeout = 0.3 * F.slow })
    assert.same(H.range(40), out)
  end)
  it("several hung items each get their own error", function()
    local before = F.snapshot()
    local got = H.collect(parmap.parmap(function(x)
      if x % 2 == 0 then T.sleep(3600) end
      return x
    end, H.range(6), { N = 2, timeout = TO, exception = "return" }))
    for i = 1, 6 do
      if i % 2 == 0 then
        assert.equal("timeout", got[i][1].kind)
        assert.equal(i, got[i][1].index)
      else
        assert.same({ n = 1, i }, got[i])
      end
    end
    F.assert_stopped(before)
  end)
  it("a hung worker without a timeout is stopped by break", function()
    local before = F.snapshot()
    local t0 = core.now()
    for i in parmap.parmap(hang, H.range(6), { N = 2, chunksize = 1 }) do
      if i == 2 then break end
    end
    assert.is_true(core.now() - t0 < F.bound(1))
    F.assert_stopped(before)
  end)
end)

---------------------------------------------------------------- case 5

describe("faults: output, finalizers and <close> (case 5)", function()
  it("print in workers appears once per call; the parent's buffers are not written twice", function()
    local file = os.tmpname()
    local out, code = F.run([[
      local parmap = require "parmap"
      io.stdout:setvbuf("full")
      io.write("parent-unflushed;")
      local f = assert(io.open(]] .. string.format("%q", file) .. [[, "w"))
      f:setvbuf("full")
      f:write("file-before;")
      local got = parmap.map(function(x)
        print("call " .. x)
        if x == 7 then os.exit(0) end -- a worker that leaves early flushes too
        if x == 9 then error("boom") end
        return x
      end, { 1, 2, 3, 4, 5, 6, 7, 8, 9, 10 }, { N = 3, chunksize = 1, exception = "return" })
      f:write("file-after")
      f:close()
      io.write("end\n")
    ]], 60)
    assert.equal(0, code, out)
    local f = assert(io.open(file))
    assert.equal("file-before;file-after", f:read("a"))
    f:close()
    os.remove(file)
    local _, n = out:gsub("parent%-unflushed;", "")
    assert.equal(1, n, out)
    for i = 1, 10 do
      local _, c = out:gsub("call " .. i .. "\n", "")
      assert.equal(1, c, "call " .. i .. " in:\n" .. out)
    end
    assert.matches("end\n$", out)
  end)
  it("print in workers that are then killed: every call whose result was yielded printed once", function()
    -- raise, break and a timeout SIGKILL workers: what they printed for the
    -- results the loop already had must be out by then
    local out, code = F.run([[
      local parmap = require "parmap"
      local H = require "helpers"
      local T = require "parmap_testhelper"
      local ok = pcall(function()
        for _ in parmap.parmap(function(x)
          print("raise " .. x)
          if x == 9 then error("boom") end
          if x > 9 then T.sleep(3600) end
          return x
        end, H.range(30), { N = 3, chunksize = 1 }) do end
      end)
      assert(not ok)
      for i in parmap.parmap(function(x) print("break " .. x) return x end, H.range(1000),
        { N = 2, chunksize = 1 }) do
        if i == 5 then break end
      end
      for _ in parmap.parmap(function(x)
        print("timeout " .. x)
        if x == 3 then T.sleep(3600) end
        return x
      end, H.range(6), { N = 2, chunksize = 1, timeout = 0.5, exception = "return" }) do end
      io.write("end\n")
    ]], 60)
    assert.equal(0, code, out)
    assert.matches("end\n$", out)
    local function count(line)
      local _, c = ("\n" .. out):gsub("\n" .. line .. "\n", "\n")
      return c
    end
    for i = 1, 30 do assert.is_true(count("raise " .. i) <= 1, "raise " .. i .. " in:\n" .. out) end
    for i = 1, 9 do assert.equal(1, count("raise " .. i), "raise " .. i .. " in:\n" .. out) end
    for i = 1, 1000 do assert.is_true(count("break " .. i) <= 1, out) end
    for i = 1, 5 do assert.equal(1, count("break " .. i), "break " .. i .. " in:\n" .. out) end
    for i = 1, 6 do assert.equal(1, count("timeout " .. i), "timeout " .. i .. " in:\n" .. out) end
  end)
  it("the parent's __gc finalizers and <close> variables never run in a worker", function()
    local out, code = F.run([[
      local parmap = require "parmap"
      local core = require "parmap.core"
      local parent = core.pid()
      local function note(what)
        return function()
          io.write(what, core.pid() == parent and " in parent\n" or " IN WORKER\n")
        end
      end
      local gc = setmetatable({}, { __gc = note("gc") })
      do
        local c <close> = setmetatable({}, { __close = note("close") })
        for i, r in parmap.parmap(function(x)
          if x == 2 then error("boom") end        -- the worker's pcall unwinds
          if x == 3 then os.exit(1, true) end      -- os.exit(code, close)
          if x == 4 then collectgarbage() end      -- a full collection
          return x
        end, { 1, 2, 3, 4, 5 }, { N = 2, exception = "return" }) do end
      end
      local ok = pcall(function()
        local c2 <close> = setmetatable({}, { __close = note("close2") })
        parmap.map(function(x) if x == 2 then error("x") end return x end, { 1, 2 }, { N = 2 })
      end)
      io.write("ok ", tostring(ok), "\n")
    ]], 60)
    assert.equal(0, code, out)
    assert.equal("close in parent\nclose2 in parent\nok false\ngc in parent\n", out)
  end)
end)
