-- ReturnProcess, ParEval and pipelines (parmap.values).
local parmap = require "parmap"
local core = require "parmap.core"
local H = require "helpers"
local F = require "faults_helpers"
local T = F.T

local RP = parmap.ReturnProcess

-- Is pid gone (reaped: not even a zombie)?
local function gone(pid)
  local f = io.open("/proc/" .. pid .. "/stat")
  if f then f:close() end
  return f == nil
end

describe("ReturnProcess", function()
  it("runs target in another process and returns all its values, nils kept", function()
    local p = RP(function(a, b)
      return core.pid(), a + b, nil, { x = { 1, 2 } }, nil
    end, { args = { 40, 2 } }):start()
    assert.truthy(p:pid())
    local r = table.pack(p:join())
    assert.equal(5, r.n)
    assert.equal(p:pid(), r[1])
    assert.not_equal(core.pid(), r[1])
    assert.equal(42, r[2])
    assert.is_nil(r[3])
    assert.same({ x = { 1, 2 } }, r[4])
  end)

  it("sees the caller's upvalues, globals and modules without sending them", function()
    local big = {}
    for i = 1, 100000 do big[i] = i end
    local p = RP(function() return #big, big[99999], type(string.format) end):start()
    local n, v, t = p:join()
    assert.equal(100000, n)
    assert.equal(99999, v)
    assert.equal("function", t)
  end)

  it("calls target(args...) with no trailing table when kwargs is not given", function()
    local p = RP(function(...) return select("#", ...), ... end,
      { args = { n = 3, 1, nil, 3 } }):start()
    assert.same({ 3, 1, nil, 3, n = 4 }, table.pack(p:join()))
  end)

  it("passes a fresh copy of kwargs as one trailing table", function()
    local KW = { a = 1, b = "x" }
    local p = RP(function(x, kw)
      local fresh = kw ~= KW
      kw.a = 99 -- does not touch KW
      return x, kw.a, kw.b, fresh, KW.a
    end, { args = { "v" }, kwargs = KW }):start()
    assert.same({ "v", 99, "x", true, 1, n = 5 }, table.pack(p:join()))
    local q = RP(function(...) return select("#", ...), type((...)) end,
      { kwargs = {} }):start()
    assert.same({ 1, "table", n = 2 }, table.pack(q:join()))
  end)

  it("returns the same result when joined twice, and after close", function()
    local p = RP(function() return { 1 }, "two" end):start()
    local a, b = p:join()
    local c, d = p:join()
    assert.equal(a, c) -- the same table
    assert.equal("two", b)
    assert.equal("two", d)
    p:close()
    assert.equal(a, (p:join()))
  end)

  it("raises an error object with the child's traceback (exception = 'raise')", function()
    local p = RP(function() error({ code = 7 }) end):start()
    local ok, e = pcall(p.join, p)
    assert.is_false(ok)
    assert.is_true(parmap.iserror(e))
    assert.is_nil(e.index)
    assert.equal("error", e.kind)
    assert.same({ code = 7 }, e.err)
    assert.equal(p:pid(), e.pid)
    assert.matches("process_spec.lua", e.traceback)
    assert.matches("^parmap: process %d+ failed: ", tostring(e))
    local ok2, e2 = pcall(p.join, p) -- joined again: the same error
    assert.is_false(ok2)
    assert.equal(e, e2)
  end)

  it("says where a string error was raised", function()
    local p = RP(function() error("boom") end):start()
    local _, e = pcall(p.join, p)
    assert.matches("process_spec.lua:%d+: boom", e.message)
    assert.matches("stack traceback:", e.traceback)
    assert.not_matches("process_spec.lua:%d+: in function 'join'", e.traceback)
  end)

  it("returns the error object with exception = 'return'", function()
    local p = RP(function() error("bad") end, { exception = "return" }):start()
    local e = p:join()
    assert.is_true(parmap.iserror(e))
    assert.matches("bad$", e.message)
  end)

  it("raises the original error value with exception = 'proc'", function()
    local p = RP(function() error({ code = 3 }) end, { exception = "proc" }):start()
    local ok, e = pcall(p.join, p)
    assert.is_false(ok)
    assert.is_false(parmap.iserror(e))
    assert.same({ code = 3 }, e)
  end)

  it("reports a result that cannot travel and where it sits", function()
    local p = RP(function() return 1, { cb = { print } } end,
      { exception = "return" }):start()
    local e = p:join()
    assert.equal("value", e.kind)
    assert.equal("result 2: cannot send a function at .cb[1]", e.message)
  end)

  it("reports a child that died with its exit status or signal", function()
    local cases = {
      { function() os.exit(3) end, "exited with status 3", 3 },
      { function() os.exit(true) end, "exited with status 0", 0 },
      { function() T.segfault() end, "killed by signal 11", -11 },
      { function() T.abort() end, "killed by signal 6", -6 },
    }
    for _, c in ipairs(cases) do
      local p = RP(c[1], { exception = "return" }):start()
      local e = p:join()
      assert.is_true(parmap.iserror(e))
      assert.equal("died", e.kind)
      assert.matches("process " .. p:pid() .. " " .. c[2], e.message)
      assert.equal(c[3], p:exitcode())
    end
  end)

  it("join(timeout) returns nil, 'timeout' while it runs; terminate stops it", function()
    local p = RP(function() T.sleep(30) end):start()
    local t = core.now()
    local r, why = p:join(0.2)
    assert.is_nil(r)
    assert.equal("timeout", why)
    assert.is_true(core.now() - t < F.bound(1))
    assert.is_true(p:is_alive())
    assert.is_nil(p:exitcode())
    assert.is_false(p:wait(0))
    assert.equal(p, p:terminate())
    local ok, e = pcall(p.join, p)
    assert.is_false(ok)
    assert.equal("died", e.kind)
    assert.matches("killed by signal 15", e.message)
    assert.equal(-15, p:exitcode())
    assert.is_false(p:is_alive())
    assert.is_true(gone(p:pid()))
  end)

  it("a process the child forked that keeps its socket open does not delay join", function()
    -- the grandchild sleeps until killed: join must return while it lives
    local p = RP(function() return T.fork_sleep(3600) end):start()
    local grandchild = p:join()
    assert.truthy(grandchild)
    assert.is_true(T.alive(grandchild), "join waited for the grandchild")
    T.kill(grandchild, T.SIGKILL)
    local q = RP(function() return "x", T.fork_sleep(3600) end):start()
    assert.is_true(F.within(60, function() return not q:is_alive() end))
    local x, grandchild2 = q:join()
    assert.equal("x", x)
    assert.is_true(T.alive(grandchild2), "is_alive waited for the grandchild")
    T.kill(grandchild2, T.SIGKILL)
  end)

  it("kill() stops a child that ignores SIGTERM", function()
    local ignoring = F.marker()
    local p = RP(function() T.ignore(15) F.mark(ignoring) T.sleep(3600) end,
      { exception = "return" }):start()
    assert.is_true(F.await(ignoring), "the child did not start")
    os.remove(ignoring)
    assert.is_false(p:wait(0.1))
    p:terminate()
    assert.is_false(p:wait(0.3))
    p:kill()
    assert.is_true(p:wait(F.bound(1)))
    assert.matches("killed by signal 9", p:join().message)
  end)

  it("wait and is_alive follow the child without taking its result", function()
    local go = F.marker() -- the child returns only once told to
    local p = RP(function() F.await(go) return "done" end):start()
    assert.is_true(p:is_alive())
    assert.is_false(p:wait(0.05))
    F.mark(go)
    assert.is_true(p:wait(60))
    os.remove(go)
    assert.is_false(p:is_alive())
    assert.equal("done", p:join())
    assert.equal(0, p:exitcode())
  end)

  it("a large result comes back whole, also when the parent is slow to join", function()
    local p = RP(function() return string.rep("ab", 10 * 1024 * 1024) end):start()
    T.sleep(0.2) -- the child blocks on a full socket meanwhile
    assert.is_true(p:is_alive() or true) -- is_alive drains without blocking
    local s = p:join()
    assert.equal(20 * 1024 * 1024, #s)
    assert.equal("ab", s:sub(-2))
  end)

  it("start twice and join before start are clear errors", function()
    local p = RP(function() end)
    assert.has_error(function() p:join() end,
      "parmap: ReturnProcess: join before start")
    assert.is_nil(p:pid())
    assert.matches("not started", tostring(p))
    p:start()
    local ok, err = pcall(p.start, p)
    assert.is_false(ok)
    assert.matches("parmap: ReturnProcess: already started", err)
    p:join()
  end)

  it("checks its arguments, naming them", function()
    local function err(f) local ok, e = pcall(f) assert.is_false(ok) return e end
    assert.matches("bad argument #1 'target' %(function expected, got nil%)",
      err(function() RP(nil) end))
    assert.matches("bad argument #2 'opts' %(table expected, got number%)",
      err(function() RP(print, 3) end))
    assert.matches("unknown option 'N'", err(function() RP(print, { N = 2 }) end))
    assert.matches("bad option 'args'", err(function() RP(print, { args = 1 }) end))
    assert.matches("bad option 'kwargs'", err(function() RP(print, { kwargs = "x" }) end))
    assert.matches("bad option 'exception'", err(function() RP(print, { exception = "x" }) end))
    assert.matches("process_spec.lua", err(function() RP(nil) end))
    assert.matches("^spec/process_spec.lua:%d+: parmap.ReturnProcess: unknown option",
      err(function() RP(print, { N = 2 }) end))
    local p = RP(print):start()
    for _, case in ipairs({ { -1, "-1" }, { 0 / 0, "nan" }, { "3", 'string "3"' }, { {}, "table" },
                            { true, "boolean" } }) do
      local bad, shown = case[1], case[2]
      for _, method in ipairs({ "join", "wait" }) do
        assert.matches("^spec/process_spec.lua:%d+: parmap: ReturnProcess: bad argument #1 'timeout' to '"
          .. method .. "' %(non%-negative number of seconds expected, got " .. shown:gsub("%p", "%%%0") .. "%)",
          err(function() return p[method](p, bad) end))
      end
    end
    p:join()
    assert.matches("parmap.ReturnProcess expected",
      err(function() p.join({}) end))
  end)

  it("a collected process kills and reaps its child: no zombie", function()
    local before = F.snapshot()
    local pid
    do
      local p = RP(function() T.sleep(30) end):start()
      pid = p:pid()
    end
    collectgarbage()
    collectgarbage()
    assert.is_true(gone(pid))
    F.assert_stopped(before)
  end)

  it("a <close> variable kills and reaps its child when its scope ends", function()
    local before = F.snapshot()
    local pid
    do
      local p <close> = RP(function() T.sleep(30) end):start()
      pid = p:pid()
    end
    assert.is_true(gone(pid))
    F.assert_stopped(before)
  end)

  it("leaks no fd and no child over many processes", function()
    local before = F.snapshot()
    for i = 1, 50 do
      local p = RP(function(x) return x * 2 end, { args = { i } }):start()
      assert.equal(i * 2, p:join())
    end
    collectgarbage()
    F.assert_stopped(before)
  end)

  it("runs the caller's finalizers and <close> only in the caller", function()
    local out = F.run([[
      local parmap = require "parmap"
      local core = require "parmap.core"
      local parent = core.pid()
      local function note(what)
        return function()
          io.write(what, core.pid() == parent and " in parent\n" or " IN CHILD\n")
        end
      end
      local keep = setmetatable({}, { __gc = note("gc") })
      io.write("unflushed;")
      do
        local c <close> = setmetatable({}, { __close = note("close") })
        local p = parmap.ReturnProcess(function()
          collectgarbage()
          os.exit(0, true)
        end, { exception = "return" }):start()
        p:join()
      end
      io.write("end\n")
    ]], 60)
    assert.equal("unflushed;close in parent\nend\ngc in parent\n", out)
  end)

  it("two processes run at once", function()
    -- each waits until the other has started: run one after the other,
    -- they would give up waiting
    local m1, m2 = F.marker(), F.marker()
    local p1 = RP(function() F.mark(m1) return F.await(m2, 30) end):start()
    local p2 = RP(function() F.mark(m2) return F.await(m1, 30) end):start()
    assert.is_true(p1:join(), "process 1 never saw process 2 running")
    assert.is_true(p2:join(), "process 2 never saw process 1 running")
    os.remove(m1)
    os.remove(m2)
  end)

  it("a parmap inside a ReturnProcess, and a ReturnProcess inside a parmap worker", function()
    local p = RP(function()
      return parmap.map(function(x) return x * x end, { 1, 2, 3 }, { N = 2 })
    end):start()
    assert.same({ 1, 4, 9 }, p:join())
    local r = parmap.map(function(x)
      return RP(function() return x + 100 end):start():join()
    end, { 1, 2, 3 }, { N = 2 })
    assert.same({ 101, 102, 103 }, r)
  end)

  it("Ctrl-C stops a script blocked in join, child gone", function()
    F.ctrl_c([[
      local parmap = require "parmap"
      local T = require "parmap_testhelper"
      local p = parmap.ReturnProcess(function() T.ignore(T.SIGINT) T.sleep(3600) end):start()
      io.write("CHILD ", p:pid(), "\n")
      io.flush()
      p:join()
    ]], "CHILD")
  end)

  it("keeps a child's garbage in check: its collector resumes when needed", function()
    local p = RP(function()
      local keep
      for i = 1, 3000000 do keep = { i, i + 1 } end
      return collectgarbage("count"), keep[1]
    end):start()
    local kb, last = p:join()
    assert.equal(3000000, last)
    assert.is_true(kb < 64 * 1024, "child heap " .. kb .. " KiB")
  end)
end)

-- parmapper's ParEval _chunker, transcribed: chunk sizes for n items (empty
-- chunks included; nil where Python would divide by zero).
local function parmapper_chunks(n, n_chunks, n_eval, n_min)
  if n_eval then
    n_eval = math.max(n_min, n_eval)
    n_chunks = math.ceil(n / n_eval)
  end
  if n_chunks == 0 then return nil end
  if n // n_chunks < n_min then
    if n_min == 0 then return nil end
    n_chunks = n // n_min
  end
  if n_chunks == 0 then return nil end
  local sizes = {}
  for k = 1, n_chunks do sizes[k] = n // n_chunks end
  for k = 1, n % n_chunks do sizes[k] = sizes[k] + 1 end
  return sizes
end

local function sizes_of(b)
  local s = {}
  for k, ab in ipairs(b) do s[k] = ab[2] - ab[1] + 1 end
  return s
end

describe("ParEval", function()
  local function double(X)
    local out = {}
    for i, x in ipairs(X) do out[i] = 2 * x end
    return out
  end

  it("gives what fun(X) gives, in parallel chunks", function()
    local X = H.range(1001)
    for _, opts in ipairs({ {}, { n_chunks = 3 }, { n_eval = 100 },
      { n_chunks = 7, n_min = 200 }, { n_chunks = 5000 }, { N = 1 } }) do
      assert.same(double(X), parmap.ParEval(double, opts)(X))
    end
  end)

  it("hands each chunk to fun as a new contiguous sequence, in another process", function()
    local pe = parmap.ParEval(function(X)
      return { { first = X[1], last = X[#X], n = #X, pid = core.pid() } }
    end, { n_chunks = 4, N = 2 })
    local r = pe(H.range(10))
    assert.equal(4, #r)
    local want = { { 1, 3 }, { 4, 6 }, { 7, 8 }, { 9, 10 } }
    for k, c in ipairs(r) do
      assert.equal(want[k][1], c.first)
      assert.equal(want[k][2], c.last)
      assert.not_equal(core.pid(), c.pid)
    end
  end)

  it("splits by parmapper's rule for n_chunks, n_eval and n_min", function()
    -- cases checked against parmapper.py itself
    local pe = function(o)
      local n = o.n
      o.n = nil
      return sizes_of(parmap.ParEval(print, o):bounds(n))
    end
    assert.same({ 4, 3, 3 }, pe({ n = 10, n_chunks = 3 }))
    assert.same({ 3, 3, 2, 2 }, pe({ n = 10, n_chunks = 4 }))
    assert.same({ 3, 2, 2 }, pe({ n = 7, n_eval = 3 }))
    assert.same({ 25, 25, 25, 25 }, pe({ n = 100, n_eval = 30 }))
    assert.same({ 20, 20, 20, 20, 20 }, pe({ n = 100, n_chunks = 8, n_min = 20 }))
    assert.same({ 13, 13, 13, 13, 12, 12, 12, 12 }, pe({ n = 100, n_eval = 5, n_min = 12 }))
    assert.same({ 500, 500 }, pe({ n = 1000, n_chunks = 2 }))
    -- parmapper would add 3 empty chunks here; parmap never makes one
    assert.same({ 1, 1, 1, 1, 1 }, pe({ n = 5, n_chunks = 8 }))
  end)

  it("agrees with the transcribed rule on every small case", function()
    local checked = 0
    for n = 1, 40 do
      for n_min = 0, 6 do
        for k = 1, 12 do
          for _, how in ipairs({ "n_chunks", "n_eval" }) do
            local want = parmapper_chunks(n, how == "n_chunks" and k or nil,
              how == "n_eval" and k or nil, n_min)
            local got = sizes_of(parmap.ParEval(print, { [how] = k, n_min = n_min }):bounds(n))
            if want then
              local nonempty = {}
              for _, s in ipairs(want) do if s > 0 then nonempty[#nonempty + 1] = s end end
              assert.same(nonempty, got, ("n=%d %s=%d n_min=%d"):format(n, how, k, n_min))
              checked = checked + 1
            else -- parmapper divides by zero: one chunk of everything
              assert.same({ n }, got)
            end
            local total, lo, hi = 0, math.huge, 0
            for _, s in ipairs(got) do
              total = total + s
              lo, hi = math.min(lo, s), math.max(hi, s)
            end
            assert.equal(n, total)
            assert.is_true(hi - lo <= 1)
          end
        end
      end
    end
    assert.is_true(checked > 3000)
  end)

  it("defaults to one chunk per CPU", function()
    assert.equal(math.min(parmap.ncpu(), 50), #parmap.ParEval(print):bounds(50))
  end)

  it("is callable again and again, and returns {} for an empty input", function()
    local pe = parmap.ParEval(double, { n_chunks = 2 })
    assert.same({ 2, 4 }, pe({ 1, 2 }))
    assert.same({ 6 }, pe({ 3 }))
    assert.same({}, pe({}))
    assert.same({ 2, 4, 6 }, pe({ n = 3, 1, 2, 3 }))
  end)

  it("passes the other options to parmap (args, kwargs, progress)", function()
    local last_done, last_total
    local pe = parmap.ParEval(function(X, k, kw)
      local out = {}
      for i, x in ipairs(X) do out[i] = x * k + kw.add end
      return out
    end, { n_chunks = 3, args = { 10 }, kwargs = { add = 1 },
      progress = function(done, total) last_done, last_total = done, total end })
    assert.same({ 11, 21, 31, 41 }, pe({ 1, 2, 3, 4 }))
    assert.equal(3, last_done) -- three chunks
    assert.equal(3, last_total)
  end)

  it("keeps nils in results that carry n", function()
    local pe = parmap.ParEval(function(X)
      return { n = #X, nil, X[2] }
    end, { n_chunks = 2 })
    local r = pe({ 1, 2, 3, 4 })
    assert.equal(4, r.n)
    assert.same({ n = 4, nil, 2, nil, 4 }, r)
  end)

  it("names the chunk whose result is not a sequence", function()
    local pe = parmap.ParEval(function(X)
      if X[1] == 5 then return 42 end
      return X
    end, { n_chunks = 3 })
    local ok, err = pcall(pe, H.range(10))
    assert.is_false(ok)
    assert.matches("parmap.ParEval: chunk 2 %(items 5..7%) returned a number, not a sequence", err)
  end)

  it("raises fun's error as a parmap error object naming the chunk", function()
    local pe = parmap.ParEval(function(X)
      if X[1] == 5 then error("bad chunk") end
      return X
    end, { n_chunks = 3 })
    local ok, e = pcall(pe, H.range(10))
    assert.is_false(ok)
    assert.is_true(parmap.iserror(e))
    assert.equal(2, e.index)
    assert.matches("bad chunk", e.message)
    local pr = parmap.ParEval(function(X)
      if X[1] == 5 then error("bad chunk") end
      return X
    end, { n_chunks = 3, exception = "return" })
    local ok2, e2 = pcall(pr, H.range(10))
    assert.is_false(ok2)
    assert.is_true(parmap.iserror(e2))
  end)

  it("checks its arguments, naming them", function()
    local function err(f) local ok, e = pcall(f) assert.is_false(ok) return e end
    assert.matches("bad argument #1 'fun'", err(function() parmap.ParEval(3) end))
    assert.matches("n_chunks or n_eval, not both",
      err(function() parmap.ParEval(print, { n_chunks = 2, n_eval = 3 }) end))
    assert.matches("bad option 'n_chunks'", err(function() parmap.ParEval(print, { n_chunks = 0 }) end))
    assert.matches("bad option 'n_eval'", err(function() parmap.ParEval(print, { n_eval = 1.5 }) end))
    assert.matches("bad option 'n_min'", err(function() parmap.ParEval(print, { n_min = -1 }) end))
    assert.matches("option 'chunksize' is set by ParEval",
      err(function() parmap.ParEval(print, { chunksize = 4 }) end))
    assert.matches("unknown option 'nchunks'", err(function() parmap.ParEval(print, { nchunks = 4 }) end))
    assert.matches("bad option 'N'", err(function() parmap.ParEval(print, { N = 0 }) end))
    assert.matches("bad argument #1 'X' %(table expected, got string%)",
      err(function() parmap.ParEval(print)("x") end))
    assert.matches("process_spec.lua", err(function() parmap.ParEval(3) end))
    assert.matches("^spec/process_spec.lua:%d+: parmap.ParEval: bad option 'n_min'",
      err(function() parmap.ParEval(print, { n_min = -1 }) end))
  end)
end)

describe("pipelines (parmap.values)", function()
  it("feeds one parmap's results to another without collecting them", function()
    local stage1 = parmap.values(parmap.parmap(function(x) return x * 10 end,
      H.range(1000), { N = 2 }))
    local got = {}
    for i, r in parmap.parmap(function(x) return x + 1 end, stage1, { N = 2 }) do
      got[i] = r
    end
    assert.equal(1000, #got)
    for i = 1, 1000 do assert.equal(i * 10 + 1, got[i]) end
  end)

  it("streams an infinite iterator through two parmaps, stopped by break", function()
    local before = F.snapshot()
    local n = 0
    local function naturals() n = n + 1 return n end
    local a = parmap.values(parmap.parmap(function(x) return x * x end, naturals, { N = 2 }))
    local last
    for i, r in parmap.parmap(function(x) return x + 1 end, a, { N = 2 }) do
      last = r
      if i == 5000 then break end
    end
    assert.equal(5000 * 5000 + 1, last)
    -- bounded read-ahead: the first stage pulled at most its buffersize
    -- (8192 a worker) ahead of what the second stage pulled, which pulled
    -- at most its own ahead of the loop
    assert.is_true(n <= 5000 + 2 * 8192 * 2, "pulled " .. n .. " items")
    F.assert_stopped(before) -- break closed both stages
  end)

  it("a serial stage in the middle, and parmap.map at the end", function()
    local lines = { "a b", "c", "d e f" }
    local s1 = parmap.values(ipairs(lines))
    local s2 = parmap.values(parmap.parmap(function(l)
      local n = 0
      for _ in l:gmatch("%S+") do n = n + 1 end
      return n
    end, s1, { N = 2 }))
    assert.same({ 200, 100, 300 }, (parmap.map(function(n) return n * 100 end, s2, { N = 1 })))
  end)

  it("an error in the first stage reaches the caller; every stage stops", function()
    local before = F.snapshot()
    local s1 = parmap.values(parmap.parmap(function(x)
      if x == 300 then error("stage one failed") end
      return x
    end, H.range(1000), { N = 2 }))
    local ok, e = pcall(function()
      for _ in parmap.parmap(function(x) return x end, s1, { N = 2 }) do end
    end)
    assert.is_false(ok)
    assert.is_true(parmap.iserror(e))
    assert.equal(300, e.index)
    assert.matches("stage one failed", e.message)
    collectgarbage()
    F.assert_stopped(before)
  end)

  it("an error in the second stage reaches the caller; every stage stops at once", function()
    local before = F.snapshot()
    local s1 = parmap.values(parmap.parmap(function(x) return x end,
      function() return 1 end, { N = 2 })) -- endless
    local ok, e = pcall(function()
      for _ in parmap.parmap(function(x) error("stage two failed") end, s1, { N = 2 }) do end
    end)
    assert.is_false(ok)
    assert.matches("stage two failed", tostring(e))
    F.assert_stopped(before) -- without a collection: the loop closed both
  end)

  it("a nil value would end the next stage early: a clear error instead", function()
    local s1 = parmap.values(parmap.parmap(function(x)
      if x == 3 then return nil end
      return x
    end, H.range(5), { N = 2 }))
    local ok, err = pcall(parmap.map, function(x) return x end, s1, { N = 2 })
    assert.is_false(ok)
    assert.matches("parmap.values: item 3 gave nil", tostring(err))
  end)

  it("examples/pipeline.lua writes every line of its input, in order", function()
    local input = {}
    for line in io.lines("README.md") do input[#input + 1] = line end
    local p = io.popen(H.lua_cmd("examples/pipeline.lua") .. " README.md 2>/dev/null")
    local n = 0
    for line in p:lines() do
      n = n + 1
      local i, words, hash, _, text = line:match("^(%d+)\t(%d+)\t(%x+)\t([^\t]*)\t(.*)$")
      assert.equal(n, tonumber(i))
      assert.equal(input[n], text)
      assert.equal(8, #hash)
      assert.truthy(tonumber(words))
    end
    assert.is_true(p:close())
    assert.equal(#input, n)
  end)

  it("checks its argument", function()
    assert.has_error(function() parmap.values(3) end,
      "parmap.values: bad argument #1 (iterator function expected, got number)")
  end)
end)
