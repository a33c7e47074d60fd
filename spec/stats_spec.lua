-- stats = true: the map records, per item, its wall time, CPU time and the
-- worker's peak RSS (measured in the worker), readable as m:stats() with
-- totals, the slowest items and the scheduling overhead.
local parmap = require "parmap"
local F = require "faults_helpers"

-- CPU work for `s` seconds of this process's CPU time
local function spin(s)
  local t = os.clock()
  while os.clock() - t < s do end
end

local range = require("helpers").range

describe("stats = true", function()
  it("records wall and CPU time per item; the slowest first; totals", function()
    local m = parmap.start(function(x)
      if x == 7 then spin(0.3 * F.slow) end -- slower than any other
      return x
    end, range(20), { N = 2, stats = true })
    local t, n = m:collect()
    assert.equal(20, n)
    assert.equal(20, t[20])
    local s = m:stats()
    assert.equal(20, s.items)
    assert.equal(2, s.workers)
    assert.is_true(s.over)
    -- the spinning item: at least its CPU time, and it is the slowest
    local e7 = m:stats(7)
    assert.equal(7, e7.index)
    assert.is_true(e7.cpu >= 0.25, "cpu " .. e7.cpu)
    assert.is_true(e7.wall >= e7.cpu * 0.9)
    assert.equal(7, s.slowest[1].index)
    assert.equal(10, #s.slowest)
    for k = 2, #s.slowest do
      assert.is_true(s.slowest[k - 1].wall >= s.slowest[k].wall)
    end
    -- totals
    local busy, cpu = 0, 0
    for i = 1, 20 do
      local e = m:stats(i)
      busy, cpu = busy + e.wall, cpu + e.cpu
      assert.is_true(e.wall >= 0 and e.cpu >= 0 and e.rss > 0)
    end
    assert.is_true(math.abs(busy - s.busy) < 1e-6)
    assert.is_true(math.abs(cpu - s.cpu) < 1e-6)
    assert.is_true(math.abs(s.mean.wall - busy / 20) < 1e-6)
    assert.is_true(s.wall >= e7.wall)
    assert.is_true(s.overhead >= 0 and s.overhead_share >= 0 and s.overhead_share <= 1)
    assert.is_true(math.abs(s.overhead - (s.wall * 2 - s.busy)) < 1e-6 or
      s.overhead == 0)
    assert.is_true(math.abs(s.overhead_per_item - s.overhead / 20) < 1e-6)
    assert.is_true(s.parallelism > 0 and s.parallelism <= 2 + 1e-6)
    assert.is_nil(m:stats(21))
    assert.is_nil(m:stats(0))
    m:close()
  end)

  it("records the worker's peak RSS after each item and its growth", function()
    -- in a fresh process: a worker forked from a big heap (this busted
    -- process, after many specs) may place the string in pages that are
    -- resident already, and its peak need not grow
    local H = require "helpers"
    local out, code = H.run_lua([[
      local parmap = require "parmap"
      local m = parmap.start(function(x)
        if x == 3 then
          local s = string.rep("x", 64 * 1024 * 1024) -- 64 MiB, touched
          return #s
        end
        return x
      end, { 1, 2, 3, 4, 5, 6 }, { N = 1, stats = true, chunksize = 1 })
      local t = m:collect()
      assert(t[3] == 64 * 1024 * 1024)
      local s = m:stats()
      io.write("maxrss ", s.maxrss, "\n")
      for i = 1, 6 do
        local e = m:stats(i)
        io.write(i, " ", e.rss, " ", e.rss_growth, "\n")
      end
    ]])
    assert.equal(0, code, out)
    local rss, growth = {}, {}
    local maxrss = tonumber(out:match("maxrss (%d+)"))
    for i, a, b in out:gmatch("\n(%d) (%d+) (%d+)") do
      rss[tonumber(i)], growth[tonumber(i)] = tonumber(a), tonumber(b)
    end
    -- the big string raised its worker's peak by most of its size
    assert.is_true(growth[3] >= 48 * 1024 * 1024, out)
    assert.is_true(rss[3] >= 64 * 1024 * 1024, out)
    assert.equal(rss[3], maxrss)
    -- a peak only grows: the items after it ran in the same worker
    for i = 4, 6 do assert.is_true(rss[i] >= rss[3], out) end
    for i = 1, 2 do assert.is_true(rss[i] < rss[3], out) end
  end)

  it("works through the for loop (the iterator's state is the map) and N = 1 runs a worker", function()
    local it, m = parmap.imap(function(x) return x, parmap.worker() end,
      range(5), { N = 1, stats = true })
    local ids = {}
    for i, x, id in it, m do
      assert.equal(i, x)
      ids[i] = id
    end
    assert.same({ 1, 1, 1, 1, 1 }, ids) -- in worker 1, not in the caller
    assert.equal(5, m:stats().items)
  end)

  it("from an iterator, unordered, with args; results unchanged", function()
    local k = 0
    local it, m = parmap.imap(function(x, a) return x + a end,
      function() k = k + 1; if k <= 3000 then return k end end,
      { N = 2, ordered = false, args = { 10 }, stats = true })
    local sum, n = 0, 0
    for i, v in it, m do
      assert.equal(i + 10, v)
      sum, n = sum + i, n + 1
    end
    assert.equal(3000, n)
    assert.equal(4501500, sum)
    local s = m:stats()
    assert.equal(3000, s.items)
    for i = 1, 3000, 499 do assert.is_not_nil(m:stats(i)) end
  end)

  it("records items whose fn raised, after their retries", function()
    local m = parmap.start(function(x)
      if x == 2 then spin(0.05); error("two") end
      return x
    end, range(4), { N = 2, stats = true, exception = "return", retries = 1 })
    local t = {}
    for i, v in m.next, m do t[i] = v end
    assert.is_true(parmap.iserror(t[2]))
    assert.equal(2, t[2].attempts)
    assert.equal(4, m:stats().items)
    assert.is_true(m:stats(2).cpu >= 0.03)
    m:close()
  end)

  it("times an item that raised before fn from its own start", function()
    -- item 2's __index raises: fn never starts for it, and its time must
    -- not be counted from item 1's start (which spins)
    local items = setmetatable({ n = 3 }, { __index = function(_, i)
      if i == 2 then error("no item 2") end
      return i
    end })
    local m = parmap.start(function(x)
      if x == 1 then spin(0.3 * F.slow) end
      return x
    end, items, { N = 1, chunksize = 3, stats = true, exception = "return" })
    local t = m:collect()
    assert.is_true(parmap.iserror(t[2]))
    assert.is_true(m:stats(1).wall >= 0.25 * F.slow)
    assert.is_true(m:stats(2).wall < 0.1 * F.slow, "wall " .. m:stats(2).wall)
    m:close()
  end)

  it("parmap.map with stats gives the same results", function()
    local r, n = parmap.map(function(x) return { x } end, range(100),
      { N = 2, stats = true })
    assert.equal(100, n)
    for i = 1, 100 do assert.same({ i }, r[i]) end
  end)

  it("is readable while the map runs and after it stopped early", function()
    local m = parmap.start(function(x) return x end, range(1000),
      { N = 2, stats = true })
    local seen = 0
    for _ in m.next, m do
      seen = seen + 1
      if seen == 10 then break end
    end
    local s = m:stats()
    assert.is_false(s.over)
    assert.is_true(s.items >= 10)
    m:close()
    assert.is_true(m:stats().items >= 10)
  end)

  it("without stats: m:stats() says how to get them", function()
    local m = parmap.start(function(x) return x end, { 1 }, { N = 2 })
    m:collect()
    assert.error_matches(function() m:stats() end, "stats = true")
    m:close()
  end)

  it("checks its value", function()
    assert.error_matches(function()
      parmap.map(print, {}, { stats = 1 })
    end, "bad option 'stats' %(boolean expected, got 1%)")
    assert.error_matches(function()
      parmap.map(print, {}, { stats = "yes" })
    end, "bad option 'stats'")
    assert.error_matches(function()
      parmap.map(print, {}, { Stats = true })
    end, "did you mean 'stats'")
  end)
end)
