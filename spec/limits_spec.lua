-- Limits: numbers from the user that reach C arithmetic, descriptors 0-2
-- closed, forked copies of parmap objects, os.exit by another name, and
-- random numbers in workers.
local parmap = require "parmap"
local core = require "parmap.core"
local F = require "faults_helpers"

local function items_fn(n)
  local i = 0
  return function()
    i = i + 1
    if i <= n then return i end
  end
end

local function id(x) return x end

describe("limits: counts the user gives never overflow a size in C", function()
  it("a huge chunksize is lowered to the largest chunk, never a heap overflow", function()
    -- run apart: before the fix 2^61 corrupted the heap (ASan: overflow)
    local out, code = F.run([[
      local parmap = require "parmap"
      for _, cs in ipairs { math.maxinteger, 1 << 61, 1 << 32, 1000001 } do
        local i = 0
        local r, n = parmap.map(function(x) return x * 2 end,
          function() i = i + 1; if i <= 2000 then return i end end,
          { N = 2, chunksize = cs })
        assert(n == 2000 and r[1] == 2 and r[2000] == 4000, cs)
      end
      io.write("ok\n")
    ]])
    assert.equal("ok\n", out)
    assert.equal(0, code)
  end)

  it("args.n past the limit is an error naming args.n, never truncated", function()
    for _, n in ipairs { 1 << 31, (1 << 32) + 1, math.maxinteger } do
      local ok, err = pcall(parmap.map, function(x, ...) return select("#", ...) end,
        { 1, 2 }, { N = 2, args = { n = n } })
      assert.is_false(ok)
      assert.matches("bad option 'args.n'", err)
    end
  end)

  it("the core itself checks args.n, N, total, chunksize and timeout", function()
    local function spec(t)
      t.fn, t.items = id, t.items or { 1 }
      if t.from_table == nil then t.from_table = true end
      return t
    end
    local cases = {
      { spec { N = 2, nargs = (1 << 32) + 1 }, "bad option 'args.n' %(too many arguments: 4294967297" },
      { spec { N = 2, nargs = -1 }, "bad option 'args.n'" },
      { spec { N = 0 }, "bad option 'N'" },
      { spec { N = -(1 << 40) }, "bad option 'N'" },
      { spec { N = 2, total = -2, from_table = false, items = items_fn(1) }, "bad option 'total'" },
      { spec { N = 2, chunksize = -1 }, "bad option 'chunksize'" },
      { spec { N = 2, timeout = 0 / 0 }, "bad option 'timeout'" },
      { spec { N = 2, star = 7 }, "star" },
    }
    for _, c in ipairs(cases) do
      local ok, err = pcall(core.start, c[1])
      assert.is_false(ok)
      assert.matches(c[2], err)
    end
    local ok, err = pcall(core.caller, { fn = id, args = {}, nargs = (1 << 32) + 1 })
    assert.is_false(ok)
    assert.matches("args.n", err)
    ok, err = pcall(core.process, { target = id, args = {}, nargs = (1 << 31) })
    assert.is_false(ok)
    assert.matches("bad option 'args.n' %(too many arguments", err)
  end)

  it("the core names a spec field of the wrong type instead of falling back to a default", function()
    local describe_, fail = function() end, function() end
    local function spec(t)
      t.fn, t.items = id, { 1 }
      if t.from_table == nil then t.from_table = true end
      t.describe, t.fail = t.describe or describe_, t.fail or fail
      return t
    end
    local cases = {
      { core.start, spec { N = 2, star = 1 }, "bad spec field 'star' %(string expected, got number%)" },
      { core.start, spec { N = 2, star = "maybe" }, "bad spec field 'star' %(invalid option 'maybe'%)" },
      { core.start, spec { N = 2, kwstar = 1 }, "bad spec field 'kwstar' %(boolean expected, got number%)" },
      { core.start, spec { N = 2, ordered = 0 }, "bad spec field 'ordered' %(boolean expected, got number%)" },
      { core.start, spec { N = 2, has_kw = "yes" }, "bad spec field 'has_kw' %(boolean expected, got string%)" },
      { core.start, spec { N = 2, from_table = 1 }, "bad spec field 'from_table' %(boolean expected" },
      { core.start, spec { N = 2, fail = 0 }, "bad spec field 'fail' %(function expected, got number%)" },
      { core.start, spec { N = 2, args = 5, nargs = 1 }, "bad spec field 'args' %(table expected, got number%)" },
      { core.start, spec { N = "2" }, "bad option 'N' %(positive integer expected, got 2%)" },
      { core.process, { target = id, has_kw = 1 }, "bad spec field 'has_kw' %(boolean expected" },
      { core.process, { target = id, make_error = fail, describe = describe_ },
        "bad spec field 'fail' %(function expected, got nil%)" },
      { core.caller, { fn = id, star = 2 }, "bad spec field 'star' %(string expected, got number%)" },
    }
    for _, c in ipairs(cases) do
      local ok, err = pcall(c[1], c[2])
      assert.is_false(ok, c[3])
      assert.matches(c[3], err)
    end
  end)

  it("ReturnProcess: args.n past the limit is an error, never truncated", function()
    local ok, err = pcall(parmap.ReturnProcess, function(...) return select("#", ...) end,
      { args = { n = (1 << 32) + 1 } })
    assert.is_false(ok)
    assert.matches("args.n", err)
  end)

  it("N far above the item count forks no more workers than items", function()
    local before = F.snapshot()
    local r, n = parmap.map(function(x) return core.pid(), x end, { 1, 2, 3 },
      { N = 10000000 })
    assert.equal(3, n)
    local pids = {}
    for _, pid in ipairs(r) do pids[pid] = true end
    local k = 0
    for _ in pairs(pids) do k = k + 1 end
    assert.is_true(k <= 3)
    F.assert_stopped(before)
  end)

  it("N far above what an iterator gives is capped: no N-sized allocation", function()
    for _, N in ipairs { 1000000, 10000000, math.maxinteger } do
      local r, n = parmap.map(function(x) return x + 1 end, items_fn(3), { N = N })
      assert.equal(3, n)
      assert.same({ 2, 3, 4 }, r)
    end
  end)

  it("a huge total or timeout is fine", function()
    local r, n = parmap.map(id, items_fn(3), { N = 2, total = math.maxinteger })
    assert.equal(3, n)
    r, n = parmap.map(id, items_fn(3), { N = 2, timeout = 1e300 })
    assert.same({ 1, 2, 3 }, r)
    r, n = parmap.map(id, items_fn(3), { N = 2, timeout = 1e8 })
    assert.same({ 1, 2, 3 }, r)
  end)

  it("a star item whose n is huge or negative is an error naming the item", function()
    for _, n in ipairs { 1 << 40, (1 << 32) + 1, -3 } do
      local ok, err = pcall(parmap.map, function(...) return select("#", ...) end,
        { { n = n } }, { N = 2, star = true })
      assert.is_false(ok)
      assert.matches(n < 0 and "item 1: star = true: vals.n must be a non%-negative integer"
        or "item 1: star = true: too many values", tostring(err))
    end
  end)
end)

describe("limits: standard descriptors closed in the caller", function()
  -- The map writes to all three standard streams in its loop body (and
  -- ReturnProcess's target too); with any of them closed, an engine socket
  -- that took its number would receive those writes.
  local src = [[
    local parmap = require "parmap"
    local r = {}
    for i, v in parmap.parmap(function(x)
      io.stderr:write("e", x, "\n"); io.stdout:write("o", x, "\n"); io.stdout:flush()
      return x * 2
    end, { 1, 2, 3, 4, 5, 6 }, { N = 2, chunksize = 1 }) do
      io.stderr:write("loop ", i, "\n")
      r[i] = v
    end
    local p = parmap.ReturnProcess(function() io.stderr:write("rp\n"); return 7 end):start()
    io.stderr:write("waiting\n")
    local seven = p:join()
    local f = assert(io.open(arg[1], "w"))
    f:write(table.concat(r, ","), " ", tostring(seven), "\n")
    f:close()
  ]]
  for _, redir in ipairs { "2>&-", "1>&-", "0<&-", "0<&- 1>&- 2>&-" } do
    it("results are right with " .. redir, function()
      local path, out = F.H.script(src), os.tmpname()
      os.execute(string.format("timeout -k 2 120 sh -c %q >/dev/null 2>&1",
        F.H.lua_cmd(path) .. " " .. out .. " " .. redir))
      local f = assert(io.open(out))
      local got = f:read("a")
      f:close()
      os.remove(path)
      os.remove(out)
      assert.equal("2,4,6,8,10,12 7\n", got)
    end)
  end
end)

describe("limits: forked copies of a ReturnProcess", function()
  it("reads as started in its own child: its pid is the child's, is_alive is true", function()
    local p
    p = parmap.ReturnProcess(function()
      return p:pid() == core.pid(), p:is_alive(), tostring(p):match("running") ~= nil
    end)
    p:start()
    assert.same({ true, true, true }, { p:join() })
  end)

  it("a target that starts its own process gets a clear error, no recursion", function()
    local p
    p = parmap.ReturnProcess(function() p:start(); return "started again" end,
      { exception = "return" })
    p:start()
    local e = p:join()
    assert.is_true(parmap.iserror(e))
    assert.matches("already started", e.message)
  end)

  it("a target cannot join, wait for or signal itself", function()
    for _, how in ipairs { "join", "wait", "kill", "terminate" } do
      local p
      p = parmap.ReturnProcess(function() p[how](p); return "went on" end,
        { exception = "return" })
      p:start()
      local e = p:join()
      assert.is_true(parmap.iserror(e), how)
      assert.matches("cannot " .. how .. " a process from inside itself", e.message)
    end
  end)

  it("a map worker's copy of a running process cannot join it; a settled one gives its values", function()
    local running = parmap.ReturnProcess(function() F.T.sleep(30) end):start()
    local done = parmap.ReturnProcess(function() return 42 end):start()
    assert.equal(42, done:join())
    local r = parmap.map(function(x)
      if x == 1 then return done:join() end
      local ok, err = pcall(running.join, running)
      local ok2, err2 = pcall(running.is_alive, running)
      return (not ok and not ok2) and (err:match("started by another process") and
        err2:match("started by another process")) and "refused" or "joined"
    end, { 1, 2 }, { N = 2 })
    assert.same({ 42, "refused" }, r)
    running:kill()
    assert.is_true(running:wait(F.bound(5)))
    assert.is_false(running:is_alive())
    running:close()
  end)
end)

describe("limits: forked copies of a map", function()
  it("a worker cannot step the map it was forked from (or any other of its caller)", function()
    local f, s = parmap.parmap(function(x) return x end, { 1, 2, 3, 4 }, { N = 2, chunksize = 1 })
    local r = parmap.map(function()
      local ok, err = pcall(function()
        for _ = 1, 10 do f(s) end
      end)
      return not ok and tostring(err):match("cannot be stepped from a worker") ~= nil
    end, { 1 }, { N = 2 })
    assert.same({ true }, r)
    local got = {}
    for i, v in f, s do got[i] = v end
    assert.same({ 1, 2, 3, 4 }, got)
  end)
end)

describe("random numbers in workers", function()
  local BIG = 1 << 53
  local function draw() return math.random(0, BIG) end

  it("every worker has its own stream, not the caller's, and the caller's is untouched", function()
    math.randomseed(42)
    local caller_next = draw()
    math.randomseed(42)
    local r = parmap.map(function() return draw() end, { 1, 2, 3, 4, 5, 6, 7, 8 },
      { N = 2, chunksize = 1 })
    assert.equal(caller_next, draw()) -- as if there had been no map
    local seen = {}
    for i = 1, 8 do
      assert.not_equal(caller_next, r[i]) -- no worker replays the caller's stream
      assert.is_nil(seen[r[i]])           -- nor another worker's
      seen[r[i]] = true
    end
  end)

  it("each map's workers, and each ReturnProcess, draw a different stream", function()
    math.randomseed(7)
    local a = parmap.map(draw, { 1 }, { N = 2 })[1]
    math.randomseed(7)
    local b = parmap.map(draw, { 1 }, { N = 2 })[1]
    math.randomseed(7)
    local p1, p2 = parmap.ReturnProcess(draw):start(), parmap.ReturnProcess(draw):start()
    local c, d = p1:join(), p2:join()
    math.randomseed(7)
    local caller_next = draw()
    local all = { a, b, c, d, caller_next }
    for i = 1, #all do
      for j = i + 1, #all do assert.not_equal(all[i], all[j]) end
    end
  end)

  it("seed = s gives the same results whatever N, ordered and chunksize", function()
    local function f(x) return math.random(1, 1000000) * 10 + x + math.random() end
    local items, ref = {}, nil
    for i = 1, 30 do items[i] = i end
    for _, N in ipairs { 1, 2, 8 } do
      for _, ordered in ipairs { true, false } do
        for _, chunksize in ipairs { 1, 7 } do
          local got = {}
          for i, v in parmap.parmap(f, items, { N = N, ordered = ordered,
            chunksize = chunksize, seed = 12345 }) do
            got[i] = v
          end
          ref = ref or got
          assert.same(ref, got)
        end
      end
    end
    -- item i's stream is math.randomseed(seed, i)'s
    math.randomseed(12345, 3)
    assert.equal(f(3), ref[3])
    local other = parmap.map(f, items, { N = 2, seed = 54321 })
    assert.not_same(ref, other)
  end)

  it("seed leaves the caller's stream alone, with N = 1 too", function()
    for _, N in ipairs { 1, 2 } do
      math.randomseed(99)
      local caller_next = draw()
      math.randomseed(99)
      parmap.map(draw, { 1, 2, 3 }, { N = N, seed = 5 })
      assert.equal(caller_next, draw())
    end
  end)

  it("seed must be an integer", function()
    for _, bad in ipairs { 1.5, "x", true } do
      local ok, err = pcall(parmap.map, draw, { 1 }, { seed = bad })
      assert.is_false(ok)
      assert.matches("bad option 'seed' %(integer expected", err)
    end
  end)
end)

describe("limits: os.exit by a reference taken before the fork", function()
  it("never runs the caller's __close, __gc or atexit handlers in a worker or child", function()
    local out = F.run([[
      local parmap = require "parmap"
      local core = require "parmap.core"
      local T = require "parmap_testhelper"
      io.stdout:setvbuf("no") -- in order with the atexit handler's write()
      local exit = os.exit -- taken before the map: not the worker's os.exit
      local parent = core.pid()
      T.atexit_note()
      local function note(what)
        return function()
          io.write(what, core.pid() == parent and " in parent\n" or " IN CHILD\n")
        end
      end
      local keep = setmetatable({}, { __gc = note("gc") })
      local function try_map(close)
        local ok, e = pcall(parmap.map, function() exit(5, close) end, { 1 }, { N = 2 })
        io.write("map ", tostring(e.kind), " ", e.message:match("exited with status %d+"), "\n")
      end
      local function try_process(code, close)
        local p = parmap.ReturnProcess(function() exit(code, close) end,
          { exception = "return" }):start()
        local e = p:join()
        io.write("process ", e.kind, " ", tostring(p:exitcode()), "\n")
      end
      do
        local c <close> = setmetatable({}, { __close = note("close") })
        try_map(true)
        try_map(false)
        try_process(4, true)
        try_process(3, false)
        coroutine.wrap(function() -- a map stepped from a coroutine
          local c2 <close> = setmetatable({}, { __close = note("close-co") })
          try_map(true)
        end)()
      end
      io.write("end ", parent, "\n")
    ]])
    local parent = out:match("end (%d+)\n")
    assert.truthy(parent, out)
    assert.equal(table.concat({
      "map died exited with status 1",   -- exit(code, true): code out of reach
      "map died exited with status 5",
      "process died 1",
      "process died 3",
      "map died exited with status 1",
      "close-co in parent",
      "close in parent",
      "end " .. parent,
      "gc in parent",
      "atexit in " .. parent,
      "" }, "\n"), out)
  end)
end)
