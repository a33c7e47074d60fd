-- Hardening: user code that runs inside a step (progress, the items
-- iterator, finalizers, hooks) and stops or steps its own map; errors of
-- the items iterator; timeouts from hand-over; huge timeouts; interrupts.
-- Cases that used to crash the caller run in a child lua5.4 (F.run), so
-- that a crash fails the spec instead of the suite.
local parmap = require "parmap"
local H = require "helpers"
local F = require "faults_helpers"

local PRE = [[
  local parmap = require "parmap"
  local H = require "helpers"
  local function id(x) return x end
]]

-- Run src in a child; it must print "OK" as its last line and exit 0.
local function run_ok(src, limit)
  local out, code = F.run(PRE .. src, limit or 60)
  assert.equal(0, code, out)
  assert.matches("OK\n$", out)
  return out
end

describe("re-entry: a map's own callbacks", function()
  it("a progress callback that closes the map (a cancel button) ends the loop cleanly", function()
    run_ok([[
      for _, N in ipairs({ 2, 3 }) do
        local f, s, c, closer
        -- items that sleep: the parent waits for them, and reports progress
        local T = require "parmap_testhelper"
        f, s, c, closer = parmap.parmap(function(x) T.sleep(0.001) return x end,
          H.range(5000), { N = N,
          progress = function(done) if done >= 100 then closer:close() end end })
        local n = 0
        for _ in f, s, c, closer do n = n + 1 end
        assert(n < 5000, n)
        assert(#H.children() == 0, "workers left")
        assert(f(s) == nil) -- over: no error, no crash
      end
      print("OK")
    ]])
  end)
  it("an items iterator that closes the map it feeds ends the loop cleanly", function()
    run_ok([[
      for _, ordered in ipairs({ true, false }) do
        local k, closer = 0, nil
        local f, s, c
        f, s, c, closer = parmap.parmap(id, function()
          k = k + 1
          if k == 500 then closer:close() end
          if k <= 100000 then return k end
        end, { N = 2, ordered = ordered })
        local n = 0
        for _ in f, s, c, closer do n = n + 1 end
        assert(n < 100000, n)
        assert(#H.children() == 0, "workers left")
      end
      print("OK")
    ]])
  end)
  it("a progress callback that steps its own map gets 'map is busy'; the map goes on", function()
    run_ok([[
      local f, s, c, closer
      local errs = {}
      f, s, c, closer = parmap.parmap(id, H.range(20000), { N = 2,
        progress = function()
          local ok, e = pcall(f, s)
          assert(not ok)
          errs[#errs + 1] = e
        end })
      local seen = {}
      for i, r in f, s, c, closer do assert(i == r); seen[#seen + 1] = i end
      assert(#seen == 20000, #seen)
      for i = 1, 20000 do assert(seen[i] == i) end
      assert(#errs > 0)
      assert(errs[1]:match("parmap: map is busy"), errs[1])
      assert(#H.children() == 0)
      print("OK")
    ]])
  end)
  it("parmap.map whose items iterator steps the map's own collect gets 'map is busy'", function()
    run_ok([[
      local core = require "parmap.core"
      local got
      local k = 0
      local m
      local items = function()
        k = k + 1
        if k == 500 then got = select(2, pcall(core.next, m)) end
        if k <= 1000 then return k end
      end
      local f, s, c, closer = parmap.parmap(id, items, { N = 2 })
      m = s
      local n = 0
      for _ in f, s, c, closer do n = n + 1 end
      assert(n == 1000, n)
      assert(tostring(got):match("map is busy"), tostring(got))
      print("OK")
    ]])
  end)
  it("finalizers that close or step the map during its steps never crash it", function()
    run_ok([[
      for round = 1, 20 do
        local f, s, c, closer = parmap.parmap(function(x) return { x, tostring(x) } end,
          H.range(5000), { N = 2 })
        local mt = { __gc = function()
          pcall(f, s)
          if round % 2 == 0 then closer:close() end
        end }
        local ok, e = pcall(function()
          for i in f, s, c, closer do
            setmetatable({}, mt) -- garbage with a finalizer, collected at any allocation
          end
        end)
        assert(ok or tostring(e):match("the map was stopped"), e)
        closer:close()
        collectgarbage()
        assert(#H.children() == 0)
      end
      print("OK")
    ]])
  end)
  it("a debug hook that steps and closes the map never crashes it", function()
    run_ok([[
      local f, s, c, closer = parmap.parmap(id, H.range(50000), { N = 2 })
      local calls = 0
      debug.sethook(function()
        calls = calls + 1
        pcall(f, s)
        if calls == 200 then closer:close() end
      end, "", 1000)
      local n = 0
      local ok, e = pcall(function() for _ in f, s, c, closer do n = n + 1 end end)
      debug.sethook()
      assert(ok or tostring(e):match("the map was stopped"), e)
      assert(#H.children() == 0)
      print("OK")
    ]])
  end)
end)

describe("items iterator errors come after the items pulled before", function()
  local function iter(err)
    local i = 0
    return function()
      i = i + 1
      if i == 1000 then error(err, 0) end
      return i
    end
  end
  for _, N in ipairs({ 1, 2, 3 }) do
    for _, ordered in ipairs({ true, false }) do
      local how = ("N = %d, ordered = %s"):format(N, tostring(ordered))
      it("in a parmap loop: 999 results, then the error value unchanged (" .. how .. ")", function()
        for _, E in ipairs({ "iterator broke", { "a table error" } }) do
          local seen = {}
          local ok, e = pcall(function()
            for i, r in parmap.parmap(function(x) return x * 2 end, iter(E),
              { N = N, ordered = ordered }) do
              assert.equal(2 * i, r)
              seen[#seen + 1] = i
            end
          end)
          assert.is_false(ok)
          assert.is_true(rawequal(E, e))
          assert.equal(999, #seen)
          table.sort(seen)
          for i = 1, 999 do assert.equal(i, seen[i]) end
          assert.same({}, H.children())
        end
      end)
      it("in parmap.map: the error value unchanged (" .. how .. ")", function()
        local E = { "a table error" }
        local ok, e = pcall(parmap.map, function(x) return x end, iter(E),
          { N = N, ordered = ordered })
        assert.is_false(ok)
        assert.is_true(rawequal(E, e))
        assert.same({}, H.children())
      end)
    end
  end
  it("in a pipeline stage (parmap.values): 999 results, then the error", function()
    local E = { "upstream" }
    local seen = 0
    local ok, e = pcall(function()
      for _ in parmap.parmap(function(x) return x end,
        parmap.values(parmap.parmap(function(x) return x end, iter(E), { N = 2 })),
        { N = 2 }) do
        seen = seen + 1
      end
    end)
    assert.is_false(ok)
    assert.is_true(rawequal(E, e))
    assert.equal(999, seen)
    assert.same({}, H.children())
  end)
end)

describe("timeouts", function()
  it("a worker stopped (SIGSTOP) while idle and then handed work is killed, its item timed out", function()
    local out = run_ok([[
      local core = require "parmap.core"
      local path = os.tmpname()
      local k = 0
      local items = function()
        k = k + 1
        if k == 2 then
          -- item 1 ran: wait for its worker's pid, let it go idle, stop it
          local pid
          for _ = 1, 2000 do
            local fh = io.open(path)
            pid = fh and tonumber(fh:read("a"))
            if fh then fh:close() end
            if pid then break end
            os.execute("sleep 0.01")
          end
          os.execute("sleep 0.5; kill -STOP " .. pid)
        end
        if k <= 2 then return k end
      end
      local got = {}
      for i, r in parmap.parmap(function(x)
        if x == 1 then
          local fh = io.open(path, "w"); fh:write(core.pid()); fh:close()
        end
        return x
      end, items, { N = 1, timeout = 1, exception = "return", chunksize = 1 }) do
        got[i] = r
      end
      os.remove(path)
      assert(got[1] == 1, tostring(got[1]))
      assert(parmap.iserror(got[2]) and got[2].kind == "timeout", tostring(got[2]))
      print(got[2].message)
      print("OK")
    ]], 30)
    assert.matches("item 2 timed out", out)
  end)
  for _, t in ipairs({ "math.huge", "1e300", "1e12" }) do
    it("timeout = " .. t .. " means no timeout", function()
      -- items that take a while: a deadline computed wrong kills them
      local r, n = parmap.map(function(x) os.execute("sleep 0.05") return x end,
        H.range(4), { N = 2, timeout = load("return " .. t)(), exception = "return" })
      assert.equal(4, n)
      assert.same(H.range(4), r)
    end)
  end
end)

describe("interrupts", function()
  it("SIGINT to the parent alone stops parmap.map while results stream in: 'interrupted!' once, no child left", function()
    -- without hooks run while collecting, the map would run its 1e9 items
    -- to the end first (F.run's limit fails it)
    local out = run_ok([[
      local core = require "parmap.core"
      os.execute(string.format("(sleep 1; kill -INT %d) >/dev/null 2>&1 &", core.pid()))
      local ok, e = pcall(parmap.map, id, { n = 1e9 }, { N = 2 })
      assert(not ok)
      print(e)
      assert(#H.children() == 0, "workers left")
      print("OK")
    ]], 60)
    local _, count = out:gsub("interrupted!", "")
    assert.equal(1, count, out)
  end)
  it("SIGINT while the parent runs the items iterator stops the map at once, not after the items it pulled", function()
    -- An iterator error waits for the items pulled before it; Ctrl-C must
    -- not: those items sleep 600 s each, so waiting for them would run
    -- into F.run's limit. The iterator spins, so the hook lands in it.
    local out = run_ok([[
      local core = require "parmap.core"
      local T = require "parmap_testhelper"
      local k = 0
      local function items()
        local t = os.clock() + 0.05
        while os.clock() < t do end
        k = k + 1
        return k
      end
      os.execute(string.format("(sleep 1; kill -INT %d) >/dev/null 2>&1 &", core.pid()))
      local ok, e = pcall(parmap.map, function(x) T.sleep(600) return x end, items, { N = 2 })
      assert(not ok)
      print(e)
      assert(tostring(e):match("interrupted!$"), tostring(e))
      assert(#H.children() == 0, "workers left")
      print("OK")
    ]], F.bound(20))
    local _, count = out:gsub("interrupted!", "")
    assert.equal(1, count, out)
  end)
  it("Ctrl-C on a terminal during back-to-back maps: one 'interrupted!', not one per respawned worker", function()
    for _ = 1, 5 do
      local h = F.pty([[
        local parmap = require "parmap"
        local H = require "helpers"
        local f, s, c, cl = parmap.parmap(function(x) return x end, { n = 10 }, { N = 2 })
        for i in f, s, c, cl do
          if i == 3 then io.write("WORKERS ", table.concat(H.children(), " "), "\n") io.flush() end
        end
        while true do parmap.map(function(x) return x end, { n = 1e6 }, { N = 2 }) end
      ]])
      local ok, why = pcall(function()
        assert.is_true(h.read_until("WORKERS[%d ]*\r?\n", F.bound(10)), h.out)
        F.T.sleep(0.5)
        assert(F.T.write(h.fd, "\3"))
        local how, code = h.wait(F.bound(10))
        h.drain()
        assert.equal("exit", how, h.out)
        assert.equal(1, code, h.out)
        local _, count = h.out:gsub("interrupted!", "")
        assert.equal(1, count, h.out)
      end)
      h.close()
      if not ok then error(why, 0) end
    end
  end)
end)

describe("re-entry: the serial map (N = 1)", function()
  it("fn, progress or the items iterator that steps the map gets 'map is busy'", function()
    local f, s
    local errs = {}
    local function try() local ok, e = pcall(f, s); errs[#errs + 1] = not ok and e end
    local k = 0
    local items = function() k = k + 1; if k == 2 then try() end; if k <= 3 then return k end end
    local got = {}
    local c, closer
    f, s, c, closer = parmap.parmap(function(x) if x == 3 then try() end return x end,
      items, { N = 1, progress = function(done) if done == 1 then try() end end })
    for i, r in f, s, c, closer do got[i] = r end
    assert.same({ 1, 2, 3 }, got)
    assert.equal(3, #errs)
    for _, e in ipairs(errs) do assert.matches("parmap: map is busy", e) end
  end)
  it("fn or the items iterator that closes the map ends the loop after the current item", function()
    local closer
    local f, s, c
    f, s, c, closer = parmap.parmap(function(x) if x == 2 then closer:close() end return x end,
      H.range(10), { N = 1 })
    local got = {}
    for i, r in f, s, c, closer do got[i] = r end
    assert.same({ 1, 2 }, got)
    local k = 0
    f, s, c, closer = parmap.parmap(function(x) return x end,
      function() k = k + 1; if k == 3 then closer:close() end; return k end, { N = 1 })
    got = {}
    for i, r in f, s, c, closer do got[i] = r end
    assert.same({ 1, 2, 3 }, got)
  end)
end)

describe("re-entry: ReturnProcess", function()
  it("a hook that closes the process while join waits: join reports it killed, nothing crashes", function()
    run_ok([[
      local p = parmap.ReturnProcess(function() os.execute("sleep 30") return 1 end):start()
      local n = 0
      debug.sethook(function()
        n = n + 1
        if n == 3 then p:close() end
      end, "c")
      local ok, e = pcall(p.join, p)
      debug.sethook()
      assert(not ok and tostring(e):match("killed"), tostring(e))
      assert(#H.children() == 0)
      print("OK")
    ]])
  end)
  it("finalizers that close the process while join decodes its result: the whole result", function()
    run_ok([[
      collectgarbage("incremental", 10, 1000) -- finalizers early and often
      for round = 1, 20 do
        local p = parmap.ReturnProcess(function()
          local t = {}
          for i = 1, 3000 do t[i] = { i, tostring(i) } end
          return t -- fits in the socket's buffer: the child exits at once
        end):start()
        -- wait until the child has exited (a zombie: not reaped yet)
        for _ = 1, 2000 do
          local fh = io.open("/proc/" .. p:pid() .. "/stat")
          local st = fh and fh:read("a"):match("^%d+ %b() (%a)")
          if fh then fh:close() end
          if st == "Z" then break end
          os.execute("sleep 0.01")
        end
        local mt = { __gc = function() p:close() end }
        for _ = 1, 200 do setmetatable({}, mt) end
        local ok, t = pcall(p.join, p)
        assert(ok, tostring(t))
        assert(#t == 3000 and t[3000][2] == "3000")
        assert(#H.children() == 0)
      end
      print("OK")
    ]])
  end)
end)

describe("user numbers in C arithmetic", function()
  it("a huge chunksize with iterator input runs (or is refused), it never corrupts memory", function()
    for _, cs in ipairs({ 1 << 61, math.maxinteger }) do
      local k = 0
      local ok, r = pcall(parmap.map, function(x) return x end,
        function() k = k + 1; if k <= 3 then return k end end, { N = 2, chunksize = cs })
      if ok then
        assert.same({ 1, 2, 3 }, r)
      else
        assert.matches("chunksize", r)
      end
      assert.same({}, H.children())
    end
  end)
end)

describe("respawns are bounded", function()
  it("a worker killed by SIGINT is not replaced: the map fails", function()
    local core = require "parmap.core"
    local ok, e = pcall(parmap.map, function(x)
      if x == 3 then F.T.kill(core.pid(), F.T.SIGINT) F.T.sleep(5) end
      return x
    end, H.range(20), { N = 2, exception = "return", chunksize = 1 })
    assert.is_false(ok)
    assert.matches("interrupted %(SIGINT%)", tostring(e))
    assert.same({}, H.children())
  end)
  it("workers that die before running any item are not forked again and again", function()
    local out = run_ok([[
      local core = require "parmap.core"
      local parent = core.pid()
      local forks = 0
      -- a hook every worker inherits, that ends it at its first call
      debug.sethook(function()
        if core.pid() ~= parent then os.exit(3) end
      end, "c")
      local ok, e = pcall(parmap.map, id, H.range(500), { N = 2, exception = "return" })
      debug.sethook()
      assert(not ok, "no error")
      print(e)
      assert(#H.children() == 0)
      print("OK")
    ]])
    assert.matches("workers in a row died before running any item", out)
  end)
end)

describe("timeouts: huge values for ReturnProcess", function()
  for _, t in ipairs({ "math.huge", "1e300", "1e12" }) do
    it("join(" .. t .. ") and wait(" .. t .. ") wait for the result", function()
      local v = load("return " .. t)()
      local p = parmap.ReturnProcess(function() os.execute("sleep 0.05") return 42 end):start()
      assert.is_true(p:wait(v))
      assert.equal(42, p:join(v))
      p = parmap.ReturnProcess(function() os.execute("sleep 0.05") return 43 end):start()
      assert.equal(43, p:join(v))
      assert.same({}, H.children())
    end)
  end
end)

describe("timeouts: work read off the socket by fn", function()
  it("fn that reads its worker's queued task: the worker owes it, is killed, the item times out", function()
    local out = run_ok([[
      local F = require "faults_helpers"
      local T = F.T
      local core = require "parmap.core"
      local got = {}
      for i, r in parmap.parmap(function(x)
        if x == 1 then
          local sock, t0 = F.my_socket(), core.now()
          repeat T.sleep(0.01) until T.inq(sock) > 0 or core.now() - t0 > 20
          T.read(sock, 100) -- item 2's task: the worker never sees it
        end
        return x
      end, { 1, 2 }, { N = 1, timeout = 1, exception = "return", chunksize = 1 }) do
        got[i] = r
      end
      assert(got[1] == 1, tostring(got[1]))
      assert(parmap.iserror(got[2]) and got[2].kind == "timeout", tostring(got[2]))
      print("OK")
    ]], 30)
  end)
end)
