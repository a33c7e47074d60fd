-- A map that an event loop drives: parmap.start returns the map object,
-- m:fd() is readable whenever m:poll() has something to do, and m:poll()
-- never blocks. Driven by plain poll(2) (the test helper) and by luv.
local parmap = require "parmap"
local T = require "parmap_testhelper"
local F = require "faults_helpers"

local has_luv, uv = pcall(require, "luv")
if not has_luv and os.getenv("CI") then
  error("eventloop_spec needs luv (Debian: lua-luv; make test-deps installs it)")
end
local has_cq, cqueues = pcall(require, "cqueues")
if not has_cq and os.getenv("CI") then
  error("eventloop_spec needs cqueues (Debian: lua-cqueues; make test-deps installs it)")
end

-- Drive m from poll(2) on m:fd() until it is over; fails instead of
-- hanging when the fd stays quiet for `quiet` seconds (a lost wake-up).
-- each(i, ...) gets every item; `budget` items at most per wake-up.
local function drive(m, each, budget, quiet)
  local fd, wakes = m:fd(), 0
  local deadline = F.now() + 60
  while true do
    assert(T.poll(fd, math.floor((quiet or 20) * 1000)),
      "m:fd() stayed quiet while the map was not over")
    wakes = wakes + 1
    local k = 0
    while true do
      local res = table.pack(m:poll())
      if res.n == 0 then return wakes end
      if res[1] == false then break end
      if each then each(table.unpack(res, 1, res.n)) end
      k = k + 1
      if budget and k >= budget then break end
    end
    assert(F.now() < deadline, "the map did not end")
  end
end

local range = require("helpers").range

describe("parmap.start and m:poll() from plain poll(2)", function()
  it("delivers every item once, in order, driven by the fd alone", function()
    local m = parmap.start(function(x) return x * x, -x end, range(500),
      { N = 2 })
    local got, nvals = {}, {}
    drive(m, function(i, a, b)
      assert.is_nil(got[i])
      got[i] = { a, b }
      nvals[#nvals + 1] = i
    end)
    assert.equal(500, #nvals)
    for i = 1, 500 do
      assert.equal(i, nvals[i])
      assert.same({ i * i, -i }, got[i])
    end
    assert.is_nil(m:poll()) -- over stays over
    m:close()
  end)

  it("sends big iterator items with only the fd to wake it (POLLOUT)", function()
    -- 40 items of 256 KiB: each segment fills the socket many times over,
    -- so the engine must be woken to send the rest
    local n, k = 40, 0
    local items = function()
      k = k + 1
      if k <= n then return string.rep(string.char(65 + k % 26), 262144) end
    end
    local m = parmap.start(function(s) return #s, s:sub(1, 1) end, items,
      { N = 2, chunksize = 3 })
    local seen = 0
    drive(m, function(i, len, c)
      seen = seen + 1
      assert.equal(262144, len)
      assert.equal(string.char(65 + i % 26), c)
    end)
    assert.equal(n, seen)
    m:close()
  end)

  it("watches a socket for room while a segment is unsent (EPOLLOUT)", function()
    -- item 1 holds the worker; item 2's 4 MiB cannot all fit the socket,
    -- so the map must be woken when the worker reads: the epoll set
    -- (/proc/self/fdinfo) must ask for POLLOUT on that socket
    local r, w = T.pipe()
    local k = 0
    local m = parmap.start(function(s)
      assert(T.read(r, 30000, 1) == "x", "no marker")
      return #s
    end, function()
      k = k + 1
      if k <= 2 then return string.rep("z", 4 * 1024 * 1024) end
    end, { N = 1, chunksize = 1 })
    local fd = m:fd()
    assert.is_false(m:poll())
    local f = assert(io.open("/proc/self/fdinfo/" .. fd))
    local info = f:read("a")
    f:close()
    local out = false
    for ev in info:gmatch("tfd:%s*%d+%s+events:%s*(%x+)") do
      if tonumber(ev, 16) & 4 ~= 0 then out = true end
    end
    assert(out, "no fd watched for POLLOUT:\n" .. info)
    T.write(w, "xx")
    local n = 0
    drive(m, function(_, len) n = n + 1; assert.equal(4 * 1024 * 1024, len) end)
    assert.equal(2, n)
    m:close()
    T.close(r)
    T.close(w)
  end)

  it("never blocks: false while the item runs, then its result", function()
    local r, w = T.pipe()
    -- the item waits for a byte that only this test writes
    local m = parmap.start(function(x)
      assert(T.read(r, 30000, 1) == "x", "no marker")
      return x + 1
    end, { 41 }, { N = 1 })
    for _ = 1, 20 do assert.is_false(m:poll()) end
    assert.is_false(T.poll(m:fd(), 0)) -- nothing to do: not readable
    assert.is_true(m:timeout() > 0 and m:timeout() <= 0.2 + 1e-9)
    T.write(w, "x")
    local i, v
    drive(m, function(a, b) i, v = a, b end)
    assert.equal(1, i)
    assert.equal(42, v)
    m:close()
    T.close(r)
    T.close(w)
  end)

  it("does not keep the fd readable while there is nothing to do", function()
    local r, w = T.pipe()
    local m = parmap.start(function()
      return T.read(r, 30000, 1)
    end, { 1, 2 }, { N = 2 })
    local fd = m:fd()
    assert.is_false(m:poll())
    -- with a spin bug (a level left set) every wait returns at once:
    -- thousands of wake-ups in a second; the engine's own timer wakes it
    -- every 200 ms
    local wakes, t0 = 0, F.now()
    while F.now() - t0 < 1 do
      if T.poll(fd, 100) then
        wakes = wakes + 1
        assert.is_false(m:poll())
      end
    end
    assert.is_true(wakes <= 50, "woken " .. wakes .. " times in a second")
    T.write(w, "ab")
    local n = 0
    drive(m, function() n = n + 1 end)
    assert.equal(2, n)
    m:close()
    T.close(r)
    T.close(w)
  end)

  it("stays readable while items are ready, if the loop takes one per wake", function()
    local m = parmap.start(function(x) return x end, range(300), { N = 2 })
    local n = 0
    local wakes = drive(m, function() n = n + 1 end, 1)
    assert.equal(300, n)
    assert.is_true(wakes >= 300)
    m:close()
  end)

  it("unordered, and from an iterator", function()
    local k = 0
    local m = parmap.start(function(x) return 2 * x end,
      function() k = k + 1; if k <= 1000 then return k end end,
      { N = 2, ordered = false })
    local sum, n = 0, 0
    drive(m, function(i, v) assert.equal(2 * i, v); n = n + 1; sum = sum + i end)
    assert.equal(1000, n)
    assert.equal(500500, sum)
    m:close()
  end)

  it("wakes for a timeout: the engine's timer is in the fd", function()
    -- the worker hangs silently: nothing but time can show it
    local m = parmap.start(function(x)
      if x == 2 then T.sleep(60) end
      return x
    end, { 1, 2, 3 }, { N = 1, timeout = 0.3 * F.slow, exception = "return" })
    local got = {}
    local t0 = F.now()
    drive(m, function(i, v) got[i] = v end, nil, 20)
    assert.is_true(F.now() - t0 < 30 * F.slow)
    assert.equal(1, got[1])
    assert.is_true(parmap.iserror(got[2]))
    assert.equal("timeout", got[2].kind)
    assert.equal(3, got[3])
    m:close()
  end)

  it("a worker's death is a failure the fd shows", function()
    local m = parmap.start(function(x)
      if x == 3 then os.exit(7) end
      return x
    end, range(5), { N = 2, exception = "return" })
    local got = {}
    drive(m, function(i, v) got[i] = v end)
    assert.equal("died", got[3].kind)
    for _, i in ipairs({ 1, 2, 4, 5 }) do assert.equal(i, got[i]) end
    m:close()
  end)

  it("raises an item's error from m:poll() (exception = 'raise'), then the map is stopped", function()
    local m = parmap.start(function(x)
      if x == 2 then error("bad two") end
      return x
    end, { 1, 2, 3 }, { N = 2 })
    local fd = m:fd()
    local ok, e
    local t0 = F.now()
    repeat
      assert(T.poll(fd, 20000))
      ok, e = pcall(function()
        while m:poll() do end
      end)
    until not ok or F.now() - t0 > 30
    assert.is_false(ok)
    assert.is_true(parmap.iserror(e))
    assert.equal(2, e.index)
    assert.matches("bad two", e.message)
    assert.error_matches(function() m:poll() end, "the map was stopped")
    assert.is_true(T.poll(fd, 0)) -- readable: a call has something to say
    m:close()
  end)

  it("runs fn in a worker process with N = 1 (never in the loop)", function()
    local me = parmap.worker()
    local m = parmap.start(function() return (parmap.worker()) end, { 1, 2 },
      { N = 1 })
    local ids = {}
    drive(m, function(i, id) ids[i] = id end)
    assert.is_nil(me)
    assert.same({ 1, 1 }, ids)
    m:close()
  end)

  it("closes its descriptors with the map; workers do not inherit them", function()
    local before = F.fds()
    local m = parmap.start(function(x)
      -- the map's fds are closed in a worker: only its own socket is open
      return x
    end, range(10), { N = 2 })
    local fd = m:fd()
    assert.is_not_nil(F.fds()[fd])
    local inner = parmap.start(function()
      return T.fds()[fd] ~= nil
    end, { 1 }, { N = 1 })
    local leaked
    drive(inner, function(_, v) leaked = v end)
    inner:close()
    assert.is_false(leaked)
    drive(m)
    m:close()
    collectgarbage()
    assert.same(before, F.fds())
  end)

  it("cannot be polled from a worker (its copy is stale)", function()
    local m = parmap.start(function(x) return x end, range(3), { N = 2 })
    local inner = parmap.start(function()
      local ok1, e1 = pcall(m.poll, m)
      local ok2, e2 = pcall(m.fd, m)
      return not ok1 and tostring(e1) or "polled", not ok2 and tostring(e2) or "fd"
    end, { 1 }, { N = 1 })
    local e1, e2
    drive(inner, function(_, a, b) e1, e2 = a, b end)
    assert.matches("belongs to process", e1)
    assert.matches("belongs to process", e2)
    inner:close()
    local n = 0
    drive(m, function() n = n + 1 end)
    assert.equal(3, n)
    m:close()
  end)

  it("m:fd() of a map already over is readable and poll says over", function()
    local m = parmap.start(function(x) return x end, {}, { N = 2 })
    assert.is_true(T.poll(m:fd(), 0))
    assert.equal(0, select("#", m:poll()))
    m:close()
  end)

  it("m:next() and m:collect() block as the for loop does", function()
    local m = parmap.start(function(x) return x * 3 end, range(5), { N = 2 })
    local i, v = m:next()
    assert.equal(1, i)
    assert.equal(3, v)
    local t, n = m:collect()
    assert.equal(5, n)
    assert.same({ nil, 6, 9, 12, 15 }, { t[1], t[2], t[3], t[4], t[5] })
    m:close()
  end)

  it("is busy inside its own progress callback", function()
    local m
    local msg
    m = parmap.start(function(x) return x end, range(3), { N = 2,
      progress = function()
        local ok, e = pcall(m.poll, m)
        if not ok then msg = msg or e end
      end })
    drive(m)
    assert.matches("busy", msg)
    m:close()
  end)

  it("parmap.start checks its arguments as parmap does", function()
    assert.error_matches(function() parmap.start(1, {}) end, "bad argument #1")
    assert.error_matches(function() parmap.start(print, {}, { nope = 1 }) end,
      "unknown option")
    assert.error_matches(function()
      parmap.start(print, {}, { backend = "mpi" })
    end, "fork backend")
  end)
end)

describe("a map driven by luv", function()
  if not has_luv then
    pending("luv is not installed (lua-luv)")
    return
  end

  it("runs while a timer keeps firing; the items need the timer's ticks", function()
    -- each item waits for one byte that only the loop's timer writes: the
    -- map can end only if the timer fires while it runs
    local r, w = T.pipe()
    local n = 20
    local m = parmap.start(function(x)
      assert(T.read(r, 30000, 1) == "t", "no tick")
      return x * x
    end, range(n), { N = 2 })
    local loop_ok, err = true, nil
    local ticks, got, over = 0, {}, false
    local timer, watchdog = uv.new_timer(), uv.new_timer()
    local poll = uv.new_poll(m:fd())
    local function finish()
      over = true
      poll:stop(); poll:close()
      timer:stop(); timer:close()
      watchdog:stop(); watchdog:close()
    end
    timer:start(5, 5, function()
      ticks = ticks + 1
      T.write(w, "t")
    end)
    watchdog:start(60000, 0, function()
      loop_ok, err = false, "watchdog: the map did not end"
      finish()
    end)
    poll:start("r", function(e)
      local ok, perr = pcall(function()
        assert(not e, e)
        while true do
          local i, v = m:poll()
          if i == nil then return finish() end
          if i == false then return end
          got[i] = v
        end
      end)
      if not ok then loop_ok, err = false, perr; finish() end
    end)
    uv.run()
    assert(loop_ok, err)
    assert.is_true(over)
    assert.is_true(ticks >= n)
    for i = 1, n do assert.equal(i * i, got[i]) end
    m:close()
    T.close(r)
    T.close(w)
  end)

  it("examples/luv_loop.lua runs", function()
    local H = require "helpers"
    local p = io.popen(H.lua_cmd("examples/luv_loop.lua") .. " 2>&1")
    local out = p:read("a")
    local ok = p:close()
    assert(ok, out)
    assert.matches("50 results", out)
  end)
end)

describe("a map driven by cqueues", function()
  if not has_cq then
    pending("cqueues is not installed (lua-cqueues)")
    return
  end

  it("the map object is a pollable (pollfd, events, timeout) beside a ticking coroutine", function()
    local r, w = T.pipe()
    local n = 20
    local m = parmap.start(function(x)
      assert(T.read(r, 30000, 1) == "t", "no tick")
      return x + 100
    end, range(n), { N = 2 })
    local cq = cqueues.new()
    local ticks, got, over = 0, {}, false
    cq:wrap(function()
      while not over do
        cqueues.sleep(0.005)
        ticks = ticks + 1
        T.write(w, "t")
      end
    end)
    cq:wrap(function()
      local t0 = F.now()
      while F.now() - t0 < 60 do
        cqueues.poll(m) -- m:pollfd() for m:events(), at most m:timeout()
        while true do
          local i, v = m:poll()
          if i == nil then
            over = true
            cqueues.cancel(m:fd()) -- before the fd closes
            m:close()
            return
          end
          if not i then break end
          got[i] = v
        end
      end
      over = true
    end)
    local ok, err = cq:loop()
    assert(ok, err)
    assert.is_true(ticks >= n)
    for i = 1, n do assert.equal(i + 100, got[i]) end
    T.close(r)
    T.close(w)
  end)
end)
