-- Fault injection, parent side: the input iterator, the progress callback
-- and the loop body raise; break, goto and abandoned iterators; Ctrl-C on a
-- terminal; the parent SIGKILLed; two maps at once and nested maps;
-- coroutines. "Stopped": every worker reaped, no zombie, no fd leaked.
local parmap = require "parmap"
local core = require "parmap.core"
local H = require "helpers"
local F = require "faults_helpers"
local T = F.T

local function sq(x) return x * x end

-- An iterator over 1..n that raises `err` when asked for item `at`.
local function failing_iter(n, at, err)
  local i = 0
  return function()
    i = i + 1
    if i == at then error(err, 0) end
    if i <= n then return i end
  end
end

---------------------------------------------------------------- case 6

describe("faults: the input iterator raises (case 6)", function()
  for _, at in ipairs({ 1, 2, 3, 50 }) do
    it("at item " .. at .. ": the error reaches the caller unchanged, workers stopped", function()
      local before = F.snapshot()
      local E = { "the iterator's own error" }
      local ok, e = pcall(function()
        for _ in parmap.parmap(sq, failing_iter(100, at, E), { N = 2 }) do end
      end)
      assert.is_false(ok)
      assert.is_true(rawequal(E, e))
      F.assert_stopped(before)
      -- parmap.map, and a string error with its position
      ok, e = pcall(parmap.map, sq, function() error("iter broke") end, { N = 2 })
      assert.is_false(ok)
      assert.matches("faults_parent_spec.lua:%d+: iter broke$", e)
      F.assert_stopped(before)
    end)
  end
  it("raising on item 3 while core.start hands out the first work: items 1 and 2 first, then the error", function()
    local before = F.snapshot()
    local E = {}
    local got = {}
    local ok, e = pcall(function()
      for i, r in parmap.parmap(sq, failing_iter(100, 3, E), { N = 2 }) do got[i] = r end
    end)
    assert.is_false(ok)
    assert.is_true(rawequal(E, e))
    assert.same({ 1, 4 }, got)
    F.assert_stopped(before)
  end)
  it("an item too big for the parent's memory: an error, then the map stays stopped (no item skipped)", function()
    local out, code = F.run([[
      local parmap = require "parmap"
      local H = require "helpers"
      local T = require "parmap_testhelper"
      local big = string.rep("b", 64 * 1024 * 1024)
      local k = 0
      local f, s, _, closer = parmap.parmap(function(x) return type(x) == "string" and #x or x end,
        function()
          k = k + 1
          if k == 50 then
            -- encoding item 50 for its worker needs a 64 MB buffer
            assert(T.limit_memory(16 * 1024 * 1024))
            return big
          end
          if k <= 100 then return k end
        end, { N = 2, chunksize = 1 })
      local last, ok, e = 0, nil, nil
      while true do
        ok, e = pcall(f, s)
        if not ok or e == nil then break end
        assert(e == last + 1, "item " .. (last + 1) .. " skipped")
        last = e
      end
      print("ERROR", last, e)
      -- the caller goes on: the map must not run on without item 50
      local ok2, e2 = pcall(f, s)
      print("AGAIN", ok2, e2)
      closer:close()
      print("end", #H.children())
    ]], 60)
    assert.equal(0, code, out)
    assert.matches("ERROR\t%d+\t[^\n]*not enough memory", out)
    assert.matches("AGAIN\tfalse\t[^\n]*the map was stopped", out)
    assert.matches("end\t0\n$", out)
  end)
end)

---------------------------------------------------------------- case 7

describe("faults: the loop stops early (case 7)", function()
  local function slow(x) F.spin(0.001) return x end
  it("the progress callback raises: its error reaches the caller, workers stopped", function()
    local before = F.snapshot()
    local E = {}
    local ok, e = pcall(function()
      for _ in parmap.parmap(slow, H.range(2000), { N = 2, progress = function(done)
        if done >= 10 then error(E) end
      end }) do end
    end)
    assert.is_false(ok)
    assert.is_true(rawequal(E, e))
    F.assert_stopped(before)
    ok, e = pcall(parmap.map, slow, H.range(2000), { N = 2, progress = function() error("p!") end })
    assert.is_false(ok)
    assert.matches("p!$", e)
    F.assert_stopped(before)
  end)
  it("the loop body raises", function()
    local before = F.snapshot()
    local ok, e = pcall(function()
      for i in parmap.parmap(slow, H.range(2000), { N = 2 }) do
        if i == 5 then error("body") end
      end
    end)
    assert.is_false(ok)
    assert.matches("body$", e)
    F.assert_stopped(before)
  end)
  it("break", function()
    local before = F.snapshot()
    for i in parmap.parmap(slow, H.range(2000), { N = 2 }) do
      if i == 5 then break end
    end
    F.assert_stopped(before)
  end)
  it("goto out of the loop", function()
    local before = F.snapshot()
    for i in parmap.parmap(slow, H.range(2000), { N = 2 }) do
      if i == 5 then goto out end
    end
    ::out::
    F.assert_stopped(before)
  end)
  it("return from inside the loop", function()
    local before = F.snapshot()
    local function first_big()
      for i, r in parmap.parmap(sq, H.range(2000), { N = 2 }) do
        if r > 100 then return i end
      end
    end
    assert.equal(11, first_big())
    F.assert_stopped(before)
  end)
  it("the iterator abandoned without a loop and collected: __gc stops the workers", function()
    local before = F.snapshot()
    do
      local f, s = parmap.parmap(slow, H.range(2000), { N = 2 })
      assert.equal(1, (f(s)))
      assert.equal(2, (f(s)))
      assert.is_true(#H.children() > 0)
    end
    collectgarbage()
    collectgarbage()
    F.assert_stopped(before)
  end)
  it("a map used after it was closed is a clear error", function()
    local f, s, _, closer = parmap.parmap(sq, H.range(100), { N = 2 })
    f(s)
    closer:close()
    closer:close() -- twice is harmless
    local ok, e = pcall(f, s)
    assert.is_false(ok)
    assert.matches("parmap: the map was stopped", e)
    assert.same({}, H.children())
  end)
end)

---------------------------------------------------------------- case 8

describe("faults: Ctrl-C (case 8)", function()
  local function ctrl_c(fn_src, extra)
    F.ctrl_c([[
      local parmap = require "parmap"
      local H = require "helpers"
      local T = require "parmap_testhelper"
      local n = 0
      for i in parmap.parmap(]] .. fn_src .. [[, function() n = n + 1; return n end,
        { N = 2, chunksize = 1 ]] .. (extra or "") .. [[ }) do
        if i == 3 then
          io.write("WORKERS ", table.concat(H.children(), " "), "\n")
          io.flush()
        end
      end
    ]], "WORKERS")
  end
  it("stops a script waiting on busy workers within a second, workers gone", function()
    ctrl_c("function(x) if x > 2 then local t = os.clock() while os.clock() - t < 0.2 do end end return x end")
  end)
  it("stops a script whose workers sleep in C", function()
    ctrl_c("function(x) if x > 2 then T.sleep(0.2) end return x end")
  end)
  it("stops a script whose workers ignore SIGINT", function()
    ctrl_c("function(x) T.ignore(T.SIGINT) if x > 2 then T.sleep(0.2) end return x end")
  end)
  it("stops a script whose workers ignore SIGINT and never answer: poll() gives up the interrupt", function()
    -- no result, no death, no timeout will ever wake the parent: only the
    -- interrupted poll() can, so a core that retried poll() on EINTR hangs
    ctrl_c("function(x) T.ignore(T.SIGINT) if x > 3 then T.sleep(3600) end return x end")
  end)
end)

---------------------------------------------------------------- case 9

describe("faults: the parent is SIGKILLed (case 9)", function()
  local function parent_killed(fn_src, body)
    local h = F.pty([[
      local parmap = require "parmap"
      local H = require "helpers"
      local T = require "parmap_testhelper"
      for i in parmap.parmap(]] .. fn_src .. [[, H.range(1000), { N = 2, chunksize = 1 }) do
        if i == 1 then
          io.write("WORKERS ", table.concat(H.children(), " "), "\n")
          io.flush()
          ]] .. (body or "") .. [[
        end
      end
    ]])
    local ok, why = pcall(function()
      assert.is_true(h.read_until("WORKERS[%d ]+\r?\n", F.bound(10)), h.out)
      local workers = F.pids(h.out, "WORKERS")
      assert.is_true(#workers >= 1)
      for _, pid in ipairs(workers) do assert.is_true(T.alive(pid)) end
      T.sleep(0.1)
      assert(T.kill(h.pid, T.SIGKILL))
      assert.equal("signal", (h.wait(F.bound(1))))
      for _, pid in ipairs(workers) do
        local gone, took = F.within(F.bound(1), function() return not T.alive(pid) end)
        assert.is_true(gone, "worker " .. pid .. " still runs after " .. took .. " s")
      end
    end)
    h.close()
    if not ok then error(why, 0) end
  end
  it("its busy workers exit within a second (PR_SET_PDEATHSIG)", function()
    parent_killed("function(x) if x > 1 then T.sleep(3600) end return x end")
  end)
  it("its idle workers exit at once (end of file on their socket)", function()
    -- the parent sits in its loop body: its workers wait for work
    -- PR_SET_PDEATHSIG is turned off in them: only the portable path is left
    parent_killed("function(x) T.no_pdeathsig() return x end", "T.sleep(3600)")
  end)
end)

---------------------------------------------------------------- case 10

describe("faults: several maps at once (case 10)", function()
  it("two maps alive at once, consumed interleaved, give correct results", function()
    local before = F.snapshot()
    local fa, sa, _, ca = parmap.parmap(function(x) return x * 2 end, H.range(500), { N = 2 })
    local fb, sb, _, cb = parmap.parmap(function(x) return -x end,
      coroutine.wrap(function() for i = 1, 300 do coroutine.yield(i) end end), { N = 2 })
    local ga, gb = {}, {}
    while true do
      local ia, ra = fa(sa)
      local ib, rb = fb(sb)
      if ia then ga[ia] = ra end
      if ib then gb[ib] = rb end
      if not ia and not ib then break end
    end
    ca:close()
    cb:close()
    for i = 1, 500 do assert.equal(i * 2, ga[i]) end
    for i = 1, 300 do assert.equal(-i, gb[i]) end
    F.assert_stopped(before)
  end)
  it("a worker holds no other socket than its own, whatever map forked it", function()
    local before = F.snapshot()
    local function sockets()
      local n = 0
      for _, target in pairs(T.fds()) do
        if target:match("^socket:") then n = n + 1 end
      end
      return n
    end
    local mine = sockets()
    -- A forks on demand: its later workers are forked after B's sockets exist
    local fa, sa, _, ca = parmap.parmap(function() F.spin(0.002) return sockets() end, H.range(200),
      { N = 2, chunksize = 1 })
    local fb, sb, _, cb = parmap.parmap(function() return sockets() end, H.range(200),
      { N = 2, chunksize = 1 })
    for _ = 1, 200 do
      local _, na = fa(sa)
      local _, nb = fb(sb)
      assert.equal(mine + 1, na)
      assert.equal(mine + 1, nb)
    end
    ca:close()
    cb:close()
    F.assert_stopped(before)
  end)
  it("a map ends while another one's workers are forked after it: no hang", function()
    local before = F.snapshot()
    local out, code = F.run([[
      local parmap = require "parmap"
      local H = require "helpers"
      -- A loses its workers over and over, so it forks new ones while B runs
      local fa, sa, _, ca = parmap.parmap(function(x) if x % 5 == 0 then os.exit(1) end return x end,
        H.range(100), { N = 2, chunksize = 1, exception = "return" })
      local b = {}
      for i, r in parmap.parmap(function(x) return x + 1 end, H.range(100), { N = 2, chunksize = 1 }) do
        b[i] = r
        fa(sa)
      end
      for _ in fa, sa do end
      ca:close()
      print("done", #b, #H.children())
    ]], 30)
    assert.equal(0, code, out)
    assert.equal("done\t100\t0\n", out)
    F.assert_stopped(before)
  end)
  it("a map started inside a worker of another map (nested)", function()
    local before = F.snapshot()
    local got = parmap.map(function(x)
      local inner = parmap.map(function(y) return x * 100 + y end, { 1, 2, 3 }, { N = 2 })
      return table.concat(inner, ",")
    end, H.range(6), { N = 2 })
    for x = 1, 6 do
      assert.equal(string.format("%d,%d,%d", x * 100 + 1, x * 100 + 2, x * 100 + 3), got[x])
    end
    F.assert_stopped(before)
  end)
  it("a nested map's worker dying raises in the outer worker, which reports it", function()
    local before = F.snapshot()
    local got = H.collect(parmap.parmap(function(x)
      return parmap.map(function(y) if y == 2 and x == 1 then os.exit(5) end return y end,
        { 1, 2, 3 }, { N = 2 })[3]
    end, { 1, 2 }, { N = 2, exception = "return" }))
    assert.equal("error", got[1][1].kind)
    assert.matches("exited with status 5 while running item 2", got[1][1].message)
    assert.same({ n = 1, 3 }, got[2])
    F.assert_stopped(before)
  end)
end)

---------------------------------------------------------------- case 11

describe("faults: coroutines (case 11)", function()
  it("a map inside a coroutine, its results yielded one by one", function()
    local before = F.snapshot()
    local co = coroutine.wrap(function()
      for i, r in parmap.parmap(sq, H.range(300), { N = 2 }) do coroutine.yield(i, r) end
      return "end"
    end)
    for i = 1, 300 do
      local j, r = co()
      assert.equal(i, j)
      assert.equal(i * i, r)
    end
    assert.equal("end", co())
    F.assert_stopped(before)
  end)
  it("a coroutine suspended inside the loop and closed stops the map", function()
    local before = F.snapshot()
    local co = coroutine.create(function()
      for i in parmap.parmap(sq, H.range(3000), { N = 2 }) do coroutine.yield(i) end
    end)
    for i = 1, 10 do assert.same({ true, i }, { coroutine.resume(co) }) end
    assert.is_true(#H.children() > 0)
    assert.is_true(coroutine.close(co))
    F.assert_stopped(before)
  end)
  it("one map stepped from several coroutines in turn", function()
    local before = F.snapshot()
    local f, s, _, closer = parmap.parmap(sq, H.range(100), { N = 2 })
    local got = {}
    local cos = {}
    for k = 1, 3 do
      cos[k] = coroutine.create(function()
        while true do
          local i, r = f(s)
          if not i then return end
          got[i] = r
          coroutine.yield()
        end
      end)
    end
    for _ = 1, 40 do
      for k = 1, 3 do
        if coroutine.status(cos[k]) == "suspended" then assert(coroutine.resume(cos[k])) end
      end
    end
    closer:close()
    for i = 1, 100 do assert.equal(i * i, got[i]) end
    F.assert_stopped(before)
  end)
  it("an input iterator that yields across the map is a clear error, workers stopped", function()
    local before = F.snapshot()
    local co = coroutine.create(function()
      local n = 0
      for _ in parmap.parmap(sq, function()
        n = n + 1
        if n == 3 then coroutine.yield("from the iterator") end
        if n < 10 then return n end
      end, { N = 2 }) do end
    end)
    local ok, e = coroutine.resume(co)
    assert.is_false(ok)
    assert.matches("attempt to yield across a C%-call boundary", e)
    coroutine.close(co)
    F.assert_stopped(before)
  end)
end)
