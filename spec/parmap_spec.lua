-- parmap.parmap / parmap.map: the iteration protocol, inputs, options,
-- ordering, errors and bad arguments.
local parmap = require "parmap"
local core = require "parmap.core"
local H = require "helpers"
local F = require "faults_helpers"

local function sq(x) return x * x end

describe("the module", function()
  it("has the aliases and is callable", function()
    assert.equal(parmap.parmap, parmap.parmapper)
    assert.equal(parmap.parmap, parmap.imap)
    local got = {}
    for i, r in parmap(sq, { 1, 2, 3 }, { N = 2 }) do got[i] = r end
    assert.same({ 1, 4, 9 }, got)
  end)
  it("knows how many CPUs it may use", function()
    assert.is_true(math.type(parmap.ncpu()) == "integer" and parmap.ncpu() >= 1)
  end)
end)

describe("the iteration protocol", function()
  it("yields the index then every value fn returned", function()
    for _, N in ipairs({ 1, 3 }) do
      local got = H.collect(parmap.parmap(function(x) return x, nil, x * 2, nil end,
        { 5, 6 }, { N = N }))
      assert.same({ n = 4, 5, nil, 10, nil }, got[1])
      assert.same({ n = 4, 6, nil, 12, nil }, got[2])
    end
  end)
  it("does not end at a nil result, nor at no result", function()
    for _, N in ipairs({ 1, 2 }) do
      local got, order = H.collect(parmap.parmap(function(x)
        if x == 2 then return nil end
        if x == 3 then return end
        return x
      end, { 1, 2, 3, 4 }, { N = N }))
      assert.same({ 1, 2, 3, 4 }, order)
      assert.same({ n = 1, nil }, got[2])
      assert.same({ n = 0 }, got[3])
    end
  end)
  it("returns a to-be-closed fourth value", function()
    local f, s, c, closer = parmap.parmap(sq, { 1, 2 }, { N = 2 })
    assert.is_function(f)
    assert.is_nil(c)
    assert.is_not_nil(getmetatable(closer).__close)
    local _ <close> = closer
    assert.equal(1, (f(s, c)))
  end)
  it("runs the items in other processes", function()
    local pids = {}
    for _, pid in parmap.parmap(function()
      local t0 = parmap.now()
      while parmap.now() - t0 < 0.01 do end -- long enough for both to start
      return core.pid()
    end, H.range(8), { N = 2, chunksize = 1 }) do
      pids[pid] = true
    end
    local n = 0
    for pid in pairs(pids) do
      assert.are_not.equal(core.pid(), pid)
      n = n + 1
    end
    assert.equal(2, n)
  end)
  it("runs N = 1 in this process", function()
    for _, pid in parmap.parmap(function() return core.pid() end, { 1 }, { N = 1 }) do
      assert.equal(core.pid(), pid)
    end
  end)
  it("gives the workers the caller's upvalues, globals and modules", function()
    local secret = { key = "value" }
    local got = parmap.map(function(x) return secret.key .. x .. string.rep("!", 1) end,
      { 1, 2 }, { N = 2 })
    assert.same({ "value1!", "value2!" }, got)
  end)
  it("stops with break, and the next map works", function()
    local n = 0
    for i in parmap.parmap(sq, H.range(1000), { N = 2 }) do
      n = i
      if i == 10 then break end
    end
    assert.equal(10, n)
    assert.same({ 1, 4 }, (parmap.map(sq, { 1, 2 }, { N = 2 })))
  end)
  it("leaves no child and no fd behind", function()
    local _, fds0 = H.fds()
    for _ = 1, 5 do parmap.map(sq, H.range(100), { N = 3 }) end
    for i in parmap.parmap(sq, H.range(100), { N = 2 }) do if i == 3 then break end end
    local _, fds1 = H.fds()
    assert.equal(fds0, fds1)
    assert.same({}, H.children())
  end)
  it("does not fork more workers than there are items", function()
    local pids = {}
    for _, pid in parmap.parmap(function() return core.pid() end, { 1, 2 }, { N = 8 }) do
      pids[#pids + 1] = pid
    end
    assert.equal(2, #pids)
  end)
  it("handles an empty table without forking", function()
    local n = 0
    for _ in parmap.parmap(sq, {}, { N = 4 }) do n = n + 1 end
    assert.equal(0, n)
    local out, count = parmap.map(sq, {}, { N = 4 })
    assert.same({}, out)
    assert.equal(0, count)
  end)
end)

describe("parmap.map", function()
  it("collects first values, with holes where nil, and the item count", function()
    local out, n = parmap.map(function(x) if x % 2 == 0 then return nil end return x, "extra" end,
      H.range(5), { N = 2 })
    assert.equal(5, n)
    assert.same({ [1] = 1, [3] = 3, [5] = 5 }, out)
  end)
  it("works serially too", function()
    local out, n = parmap.map(sq, { 3, 4 }, { N = 1 })
    assert.same({ 9, 16 }, out)
    assert.equal(2, n)
  end)
end)

describe("inputs", function()
  it("honours items.n over #items", function()
    for _, N in ipairs({ 1, 2 }) do
      local out, n = parmap.map(function(x) return x == nil end, { n = 3, 1 }, { N = N })
      assert.equal(3, n)
      assert.same({ false, true, true }, out)
    end
  end)
  it("takes an iterator function until it returns nil", function()
    for _, N in ipairs({ 1, 2 }) do
      local out, n = parmap.map(function(w) return w:upper() end,
        string.gmatch("alpha beta gamma", "%a+"), { N = N })
      assert.equal(3, n)
      assert.same({ "ALPHA", "BETA", "GAMMA" }, out)
    end
  end)
  it("takes io.lines()", function()
    local path = os.tmpname()
    local f = assert(io.open(path, "w"))
    for i = 1, 50 do f:write("line ", i, "\n") end
    f:close()
    local out, n = parmap.map(function(l) return #l end, io.lines(path), { N = 2 })
    os.remove(path)
    assert.equal(50, n)
    assert.equal(#"line 50", out[50])
  end)
  it("takes coroutine.wrap", function()
    local gen = coroutine.wrap(function()
      for i = 1, 20 do coroutine.yield({ i, tostring(i) }) end
    end)
    local out = parmap.map(function(p) return p[2] .. "=" .. p[1] end, gen, { N = 2 })
    assert.equal("20=20", out[20])
  end)
  it("pulls items lazily: an infinite iterator works with break", function()
    for _, N in ipairs({ 1, 2 }) do
      local made = 0
      local function forever() made = made + 1; return made end
      local last
      for i, r in parmap.parmap(sq, forever, { N = N }) do
        last = r
        if i == 1000 then break end
      end
      assert.equal(1000000, last)
      assert.is_true(made <= 1000 + 8192 * N, "made " .. made .. " items")
    end
  end)
  it("sends iterator items to the workers by value", function()
    local k = 0
    local function gen()
      k = k + 1
      if k <= 3 then return { k = k, nested = { s = ("x"):rep(k) } } end
    end
    local out = parmap.map(function(t) return t.nested.s .. t.k end, gen, { N = 2 })
    assert.same({ "x1", "xx2", "xxx3" }, out)
  end)
  it("says which iterator item cannot travel", function()
    local k = 0
    local function gen()
      k = k + 1
      if k == 1 then return 1 end
      if k == 2 then return { ok = 1, bad = { cb = print } } end
    end
    local ok, err = pcall(parmap.map, sq, gen, { N = 2 })
    assert.is_false(ok)
    assert.matches("item 2: cannot send a function at .bad.cb", err, 1, true)
  end)
end)

describe("read-ahead from an iterator (buffersize)", function()
  -- The loop's k-th step has consumed k items; the iterator may have made
  -- at most buffersize more. The default is 8192 items per worker.
  local function check(N, opts, B, steps)
    local made, k = 0, 0
    local function forever() made = made + 1; return made end
    opts.N = N
    for i, r in parmap.parmap(sq, forever, opts) do
      k = k + 1
      assert.is_true(made <= k + B, ("N = %d, buffersize = %s: %d items made at step %d")
        :format(N, tostring(opts.buffersize), made, k))
      if N == 1 and not opts.timeout then
        assert.equal(k, made) -- the serial loop pulls one item a step
      end
      if opts.ordered ~= false then assert.equal(k, i) end
      assert.equal(i * i, r)
      if k == steps then break end
    end
    assert.equal(steps, k)
    assert.is_true(made <= k + B, "made " .. made .. " at the break")
  end
  it("pulls at most buffersize items ahead of the loop, by default 8192 per worker", function()
    for _, N in ipairs({ 1, 2, 3 }) do check(N, {}, 8192 * N, 30000) end
  end)
  it("pulls at most buffersize items ahead of the loop, for any buffersize", function()
    for _, N in ipairs({ 1, 2, 3 }) do
      for _, B in ipairs({ 1, 2, 3, 5, 100, 5000 }) do
        check(N, { buffersize = B }, B, 2000)
      end
    end
  end)
  it("holds the bound in unordered mode, with chunksize, and with N = 1 and a timeout", function()
    check(2, { buffersize = 50, ordered = false }, 50, 3000)
    check(3, { ordered = false }, 3 * 8192, 30000)
    check(2, { buffersize = 10, chunksize = 1000 }, 10, 500)
    check(2, { buffersize = 1000, chunksize = 7 }, 1000, 3000)
    check(1, { buffersize = 4, timeout = 60 }, 4, 300)
  end)
  it("gives the same results whatever the buffersize, and does not apply to tables", function()
    local want = parmap.map(sq, H.range(3000), { N = 1 })
    for _, B in ipairs({ 1, 2, 64, 100000 }) do
      local k = 0
      local function gen() k = k + 1; if k <= 3000 then return k end end
      assert.same(want, (parmap.map(sq, gen, { N = 2, buffersize = B })))
      assert.same(want, (parmap.map(sq, H.range(3000), { N = 2, buffersize = B })))
    end
  end)
  it("is a positive integer", function()
    for bad, shown in pairs({ [0] = "0", [-1] = "-1", [1.5] = "1.5", [true] = "boolean",
                              ["8"] = 'string "8"' }) do
      local ok, err = pcall(parmap.map, sq, H.range(3), { N = 2, buffersize = bad })
      assert.is_false(ok)
      assert.matches("bad option 'buffersize' (positive integer expected, got " .. shown .. ")",
        err, 1, true)
    end
  end)
end)

describe("options", function()
  it("chunksize, including -1, gives the same results", function()
    local want = parmap.map(sq, H.range(100), { N = 1 })
    for _, cs in ipairs({ 1, 7, 100, 1000, -1 }) do
      assert.same(want, (parmap.map(sq, H.range(100), { N = 3, chunksize = cs })))
    end
  end)
  it("ordered = false yields each item once, naming it, as they complete", function()
    -- item 1 cannot end before the loop has had another item: it waits
    -- (asleep) until the loop body marks that it got one
    local got_other = F.marker()
    local got, order = {}, {}
    for i, r in parmap.parmap(function(x)
      if x == 1 then F.await(got_other) end
      return x * 10
    end, H.range(40), { N = 2, ordered = false, chunksize = 1 }) do
      got[i], order[#order + 1] = r, i
      if i ~= 1 then F.mark(got_other) end
    end
    os.remove(got_other)
    assert.equal(40, #order)
    for i = 1, 40 do assert.equal(i * 10, got[i]) end
    assert.are_not.equal(1, order[1], "the slow item came first")
  end)
  it("ordered = true keeps input order under uneven work", function()
    local _, order = H.collect(parmap.parmap(function(x)
      if x % 5 == 0 then
        local t0 = parmap.now()
        while parmap.now() - t0 < 0.005 do end
      end
      return x
    end, H.range(60), { N = 3, chunksize = 2 }))
    assert.same(H.range(60), order)
  end)
  it("keeps a chunk's slot until its worker's last frame, even after slow items", function()
    -- items slow enough that a worker flushes each result on its own timer
    local function slow(x) F.T.sleep(0.025) return x end
    for _, ordered in ipairs({ true, false }) do -- more chunks than slots
      local out, n = parmap.map(slow, H.range(36), { N = 2, chunksize = 2, ordered = ordered })
      assert.equal(36, n)
      assert.same(H.range(36), out)
    end
  end)
  it("progress = function is called with done and total", function()
    for _, N in ipairs({ 1, 2 }) do
      local calls, last = 0, nil
      parmap.map(sq, H.range(50), { N = N, progress = function(done, total)
        calls = calls + 1
        assert.equal(50, total)
        last = done
      end })
      assert.is_true(calls >= 1)
      assert.equal(50, last)
    end
  end)
  it("progress gets total nil for an iterator, or the total option", function()
    local seen = {}
    parmap.map(sq, string.gmatch("1 2 3", "%d"), { N = 2,
      progress = function(done, total) seen[#seen + 1] = { done, total } end })
    assert.same({ 3, nil }, seen[#seen])
    seen = {}
    parmap.map(sq, string.gmatch("1 2 3", "%d"), { N = 2, total = 3,
      progress = function(done, total) seen[#seen + 1] = { done, total } end })
    assert.same({ 3, 3 }, seen[#seen])
  end)
  it("progress = true or a label draws one final line on a non-terminal stderr", function()
    local out = H.run_lua([[
      local parmap = require "parmap"
      parmap.map(function(x) return x end, {1, 2, 3}, {N = 2, progress = "squares"})
      parmap.map(function(x) return x end, {1, 2}, {N = 1, progress = true})
    ]])
    assert.matches("squares %[#+%] 3/3 100%%", out)
    assert.matches("\n?%[#+%] 2/2 100%%", out)
    local lines = 0
    for _ in out:gmatch("\n") do lines = lines + 1 end
    assert.equal(2, lines)
  end)
end)

describe("errors", function()
  local function failing(x)
    if x == 3 then error("boom") end
    return x
  end

  it("exception = 'raise' (default with N > 1) raises an error object at the item's turn", function()
    local seen = {}
    local ok, e = pcall(function()
      for i, r in parmap.parmap(failing, H.range(10), { N = 2, chunksize = 1 }) do
        seen[#seen + 1] = r
      end
    end)
    assert.is_false(ok)
    assert.same({ 1, 2 }, seen)
    assert.is_true(parmap.iserror(e))
    assert.equal(3, e.index)
    assert.equal("error", e.kind)
    assert.matches("boom$", e.err)
    assert.matches("in function <", e.traceback)
    assert.are_not.equal(core.pid(), e.pid)
    assert.matches("^parmap: item 3 failed in worker %d+: .*boom\n" ..
      "%(raised to the loop at spec/parmap_spec.lua:%d+%)\nstack traceback:", tostring(e))
    assert.same({}, H.children())
  end)
  it("exception = 'return' yields the error object and goes on", function()
    for _, N in ipairs({ 1, 2 }) do
      local got = H.collect(parmap.parmap(failing, H.range(5), { N = N, exception = "return" }))
      assert.is_true(parmap.iserror(got[3][1]))
      assert.equal(3, got[3][1].index)
      assert.same({ n = 1, 5 }, got[5])
    end
  end)
  it("round-trips the original error value when it can travel", function()
    local got = H.collect(parmap.parmap(function(x) error({ code = x, tags = { "a" } }) end,
      { 7 }, { N = 2, exception = "return" }))
    assert.same({ code = 7, tags = { "a" } }, got[1][1].err)
    assert.equal("(error object is a table value)", got[1][1].message)
  end)
  it("keeps the string form of an error object with __tostring", function()
    local E = setmetatable({}, { __tostring = function() return "custom!" end })
    local got = H.collect(parmap.parmap(function() error(E) end, { 1 }, { N = 2, exception = "return" }))
    assert.equal("custom!", got[1][1].message)
  end)
  it("sends the string form when the error value cannot travel", function()
    local got = H.collect(parmap.parmap(function() error(setmetatable({ f = print },
      { __tostring = function() return "has a function" end })) end, { 1 }, { N = 2, exception = "return" }))
    assert.equal("has a function", got[1][1].err)
  end)
  it("exception = 'proc' raises the original value", function()
    local ok, e = pcall(parmap.map, function() error({ code = 42 }) end, { 1 }, { N = 2, exception = "proc" })
    assert.is_false(ok)
    assert.same({ code = 42 }, e)
  end)
  it("N = 1 defaults to 'proc': the error propagates untouched", function()
    local E = {}
    local ok, e = pcall(parmap.map, function() error(E) end, { 1 }, { N = 1 })
    assert.is_false(ok)
    assert.equal(E, e)
  end)
  it("N = 1 with 'raise' raises an error object with a traceback", function()
    local ok, e = pcall(parmap.map, failing, H.range(4), { N = 1, exception = "raise" })
    assert.is_false(ok)
    assert.is_true(parmap.iserror(e))
    assert.equal(3, e.index)
    assert.matches("stack traceback", e.traceback)
  end)
  it("names the item and the place of a result that cannot travel", function()
    local got = H.collect(parmap.parmap(function(x)
      if x == 2 then return { ok = true, cb = print } end
      return x
    end, { 1, 2, 3 }, { N = 2, exception = "return" }))
    local e = got[2][1]
    assert.is_true(parmap.iserror(e))
    assert.equal("value", e.kind)
    assert.equal("result of item 2: cannot send a function at .cb", e.message)
    assert.same({ n = 1, 3 }, got[3])
    local ok, err = pcall(parmap.map, function() return 1, coroutine.create(print) end, { 1 }, { N = 2 })
    assert.is_false(ok)
    assert.matches("result 2 of item 1: cannot send a thread", tostring(err))
  end)
  it("reports a worker killed mid-map with its signal and item", function()
    local seen = {}
    local ok, e = pcall(function()
      for i, r in parmap.parmap(function(x)
        if x == 4 then os.execute("kill -9 " .. core.pid()) end
        return x
      end, H.range(8), { N = 2, chunksize = 1 }) do
        seen[#seen + 1] = r
      end
    end)
    assert.is_false(ok)
    assert.same({ 1, 2, 3 }, seen)
    assert.equal("died", e.kind)
    assert.equal(4, e.index)
    assert.matches("killed by signal 9", e.message)
    assert.same({}, H.children())
  end)
  it("goes on after a worker death with exception = 'return'", function()
    local got = H.collect(parmap.parmap(function(x)
      if x % 3 == 0 then os.exit(3) end
      return x
    end, H.range(9), { N = 2, exception = "return" }))
    for i = 1, 9 do
      if i % 3 == 0 then
        assert.equal("died", got[i][1].kind)
        assert.matches("exited with status 3 while running item " .. i, got[i][1].message)
      else
        assert.same({ n = 1, i }, got[i])
      end
    end
    assert.same({}, H.children())
  end)
end)

describe("bad arguments", function()
  local function fails(pattern, ...)
    local ok, err = pcall(parmap.parmap, ...)
    assert.is_false(ok)
    assert.matches(pattern, err, 1, true)
  end
  it("fn must be callable", function()
    fails("bad argument #1 'fn' (function expected, got number)", 1, {})
    local callable = setmetatable({}, { __call = function(_, x) return x end })
    assert.same({ 5 }, (parmap.map(callable, { 5 }, { N = 2 })))
  end)
  it("items must be a table or a function", function()
    fails("bad argument #2 'items' (table or function expected, got string)", sq, "abc")
    fails("items.n must be a non-negative integer", sq, { n = -1 })
  end)
  it("opts must be a table with known keys", function()
    fails("bad argument #3 'opts' (table expected, got number)", sq, {}, 5)
    fails("unknown option 'chunk_size'", sq, {}, { chunk_size = 1 })
  end)
  it("checks every option", function()
    fails("bad option 'N' (positive integer expected, got 0)", sq, {}, { N = 0 })
    fails("bad option 'N' (positive integer expected, got 1.5)", sq, {}, { N = 1.5 })
    fails("bad option 'star' (true, false or parmap.None expected, got 1)", sq, {}, { star = 1 })
    fails("bad option 'kwstar' (boolean expected, got string \"yes\")", sq, {}, { kwstar = "yes" })
    fails("bad option 'args' (table expected, got 1)", sq, {}, { args = 1 })
    fails("bad option 'kwargs' (table expected, got string \"k\")", sq, {}, { kwargs = "k" })
    fails("bad option 'chunksize' (positive integer or -1 expected, got 0)", sq, {}, { chunksize = 0 })
    fails("bad option 'ordered' (boolean expected, got 1)", sq, {}, { ordered = 1 })
    fails("bad option 'exception' ('raise', 'return' or 'proc' expected, got string \"ignore\")", sq, {},
      { exception = "ignore" })
    fails("bad option 'progress' (boolean, string or function expected, got 3)", sq, {},
      { progress = 3 })
    fails("bad option 'total' (non-negative integer expected, got -2)", sq, print, { total = -2 })
    fails("bad option 'timeout' (positive number of seconds expected, got 0)", sq, {}, { timeout = 0 })
  end)
  it("raises at the call, blaming the caller", function()
    local ok, err = pcall(function() parmap.map(sq, {}, { N = -1 }) end)
    assert.is_false(ok)
    assert.matches("parmap_spec.lua:%d+: parmap: bad option 'N'", err)
    ok, err = pcall(function() local f = parmap.parmap(sq, 5); return f end)
    assert.is_false(ok)
    assert.matches("parmap_spec.lua:%d+: parmap: bad argument #2", err)
  end)
end)

describe("timeout", function()
  -- item 2 sleeps until it is killed; the others are fast, and the timeout
  -- is long enough that a loaded machine cannot make one of them miss it
  local TO = F.slow
  local function nap(x)
    if x == 2 then F.T.sleep(60) end
    return x
  end
  it("kills a worker whose item runs too long and names the item", function()
    for _, N in ipairs({ 1, 2 }) do
      local got = H.collect(parmap.parmap(nap, { 1, 2, 3 },
        { N = N, timeout = TO, exception = "return" }))
      assert.same({ n = 1, 1 }, got[1])
      assert.equal("timeout", got[2][1].kind)
      assert.matches("item 2 timed out after " .. TO .. " s", got[2][1].message, 1, true)
      assert.same({ n = 1, 3 }, got[3])
      assert.same({}, H.children())
    end
  end)
  it("never fails a fast item (many short items, a long timeout)", function()
    local out, n = parmap.map(function(x) return x + 1 end, H.range(300000),
      { N = 2, timeout = 100 })
    assert.equal(300000, n)
    assert.equal(300001, out[300000])
  end)
  it("raises with exception = 'raise'", function()
    local ok, e = pcall(parmap.map, nap, { 1, 2, 3 }, { N = 2, timeout = TO })
    assert.is_false(ok)
    assert.equal(2, e.index)
    assert.equal("timeout", e.kind)
  end)
end)

describe("a worker's exit", function()
  it("never runs the caller's atexit work, even through os.exit", function()
    local out = H.run_lua([[
      local parmap = require "parmap"
      -- a to-be-closed main-chunk value and a __gc object: run once, by the parent
      local gc = setmetatable({}, { __gc = function() io.write("gc ran\n") end })
      io.write("buffered before the map ")
      local got = {}
      for i, r in parmap.parmap(function(x)
        if x == 2 then os.exit(0, true) end
        return x
      end, { 1, 2, 3 }, { N = 2, exception = "return" }) do
        got[i] = parmap.iserror(r) and r.kind or r
      end
      io.write(got[1], " ", got[2], " ", got[3], "\n")
      os.exit(0, true)
    ]])
    assert.equal("buffered before the map 1 died 3\ngc ran\n", out)
  end)
end)

describe("the state's allocator", function()
  -- parmap wraps the allocator to advise huge pages for large blocks; the
  -- wrapper must outlive lua_close, which unloads C modules before it frees
  -- the last blocks
  local src = [[
    local parmap = require "parmap"
    local s = string.rep("x", 20e6)
    local t = {}
    for i = 1, 1e6 do t[i] = i end
    local r = parmap.map(function(x) return x .. "" end, { s, s }, { N = 2 })
    io.write(#r[1] + #r[2] + #t, "\n")
  ]]
  it("lua_close frees large blocks after the module is unloaded", function()
    local out, code = H.run_lua(src)
    assert.equal(0, code, out)
    assert.equal("41000000\n", out)
  end)
  it("PARMAP_HUGEPAGES=0 leaves the allocator alone", function()
    local path = H.script(src)
    local p = io.popen("PARMAP_HUGEPAGES=0 " .. H.lua_cmd(path) .. " 2>&1")
    local out = p:read("a")
    local ok = p:close()
    os.remove(path)
    assert.is_true(ok, out)
    assert.equal("41000000\n", out)
  end)
end)
