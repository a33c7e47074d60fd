-- A forked child's collector: deferred over the inherited heap, never for
-- ever. Each case runs in a fresh lua5.4 whose own heap is small, so a
-- child's peak RSS (VmHWM) is its own garbage plus a few MB.
local H = require "helpers"

local PRELUDE = [[
local parmap = require "parmap"
local function status(key)
  local f = assert(io.open("/proc/self/status"))
  local s = f:read("a")
  f:close()
  return tonumber(s:match(key .. ":%s*(%d+)"))
end
local function hwm_mb() return status("VmHWM") / 1024 end
-- minor page faults of this process so far (field 10 of /proc/self/stat)
local function minflt()
  local f = assert(io.open("/proc/self/stat"))
  local s = f:read("a")
  f:close()
  local rest, k = s:match("%) (.*)$"), 2
  for v in rest:gmatch("%S+") do
    k = k + 1
    if k == 10 then return tonumber(v) end
  end
end
-- ~300 MB of short-lived tables, a few bytes live at any time; the Lua
-- heap's peak (MB), sampled
local heap_peak = 0
local function churn(n)
  local keep
  for i = 1, n or 3000000 do
    keep = { i, i + 1 }
    if i % 4096 == 0 then heap_peak = math.max(heap_peak, collectgarbage("count")) end
  end
  return keep[1]
end
-- "PEAK <VmHWM> <Lua heap peak>" in MB
local function peak() return hwm_mb() .. " " .. heap_peak / 1024 end
]]

local function run(src)
  local out, code = H.run_lua(PRELUDE .. src)
  assert.equal(0, code, out)
  return out
end

-- An ASan build keeps freed blocks in quarantine (256 MB): its RSS says
-- nothing of the collector, the Lua heap's own count still does.
local SANITIZED = (os.getenv("LD_PRELOAD") or ""):find("asan") ~= nil
  or os.getenv("PARMAP_VALGRIND") ~= nil

local LIMIT_MB = 100

-- The peaks of the "PEAK <rss> <heap>" lines of out (each the larger of
-- the two, or the heap's alone when sanitized), as numbers.
local function peaks(out)
  local t = {}
  for rss, heap in out:gmatch("PEAK (%S+) (%S+)") do
    rss, heap = tonumber(rss), tonumber(heap)
    t[#t + 1] = SANITIZED and heap or math.max(rss, heap)
  end
  return t
end

describe("a worker's collector", function()
  it("runs inside one long item: 300 MB of short-lived garbage stays far below 300 MB", function()
    local out = run [[
      local r = parmap.map(function(n)
        churn(n)
        return peak()
      end, { 3000000, 10 }, { N = 2 })
      io.write("PEAK ", r[1], "\n")
    ]]
    local p = peaks(out)
    assert.equal(1, #p, out)
    assert.is_true(p[1] < LIMIT_MB, "worker peak " .. p[1] .. " MB")
  end)

  it("runs when the garbage is made in a coroutine the worker inherited", function()
    local out = run [[
      local co = coroutine.wrap(function(n)
        while true do n = coroutine.yield(churn(n)) end
      end)
      co(10)
      local r = parmap.map(function(n)
        co(n)
        return peak()
      end, { 3000000, 10 }, { N = 2 })
      io.write("PEAK ", r[1], "\n")
    ]]
    local p = peaks(out)
    assert.is_true(p[1] < LIMIT_MB, "worker peak " .. p[1] .. " MB")
  end)

  it("runs when fn sets its own hook", function()
    local out = run [[
      local r = parmap.map(function(n)
        local hits = 0
        debug.sethook(function() hits = hits + 1 end, "", 1000)
        churn(n)
        debug.sethook()
        return peak(), hits
      end, { 3000000, 10 }, { N = 2 })
      io.write("PEAK ", r[1], "\n")
    ]]
    local p = peaks(out)
    assert.is_true(p[1] < LIMIT_MB, "worker peak " .. p[1] .. " MB")
  end)

  it("runs in the worker of a map inside a worker", function()
    local out = run [[
      local r = parmap.map(function(n)
        local inner = parmap.map(function(m)
          churn(m)
          return peak()
        end, { n, 10 }, { N = 2 })
        return inner[1]
      end, { 3000000, 10 }, { N = 2 })
      io.write("PEAK ", r[1], "\n")
    ]]
    local p = peaks(out)
    assert.equal(1, #p, out)
    assert.is_true(p[1] < LIMIT_MB, "inner worker peak " .. p[1] .. " MB")
  end)

  it("stays stopped when the caller stopped it", function()
    local out = run [[
      collectgarbage("stop")
      local r = parmap.map(function(n)
        churn(n)
        return collectgarbage("isrunning")
      end, { 1000000, 10 }, { N = 2 })
      local p = parmap.ReturnProcess(function()
        churn(1000000) -- ~90 MB: past the budget
        return collectgarbage("isrunning")
      end):start()
      io.write("RUNNING ", tostring(r[1]), " ", tostring(r[2]), " ",
        tostring(p:join()), " ", tostring(collectgarbage("isrunning")), "\n")
    ]]
    assert.equal("RUNNING false false false false\n", out)
  end)

  it("does not walk a big inherited heap during a short map", function()
    -- 64 MB of tables built without garbage in between (a compact heap),
    -- and a caller whose collector never pauses: without the deferral a
    -- worker's first allocations would run a whole cycle over that heap,
    -- writing a mark on (so copying) every one of its 16,000 pages.
    local out = run [[
      local keep, parts = {}, {}
      for j = 1, 60 do parts[j] = "i" end
      local mk = load("local i = ... return {" .. table.concat(parts, ",") .. "}")
      local i = 0
      while collectgarbage("count") < 64 * 1024 do
        for _ = 1, 1000 do
          i = i + 1
          keep[i] = mk(i)
        end
      end
      collectgarbage("incremental", 100, 1000)
      collectgarbage() -- the next cycle is due at once
      local r = parmap.map(function(n)
        local f0 = minflt()
        churn(n) -- ~8 MB, far below the heap
        return minflt() - f0
      end, { 80000, 80000 }, { N = 2 })
      io.write("FAULTS ", r[1], " ", r[2], " ", #keep, "\n")
    ]]
    local a, b = out:match("FAULTS (%d+) (%d+)")
    assert.truthy(a, out)
    -- fresh pages for 8 MB of garbage: ~2,000 faults; a cycle: 16,000 more
    assert.is_true(tonumber(a) < 8000 and tonumber(b) < 8000, out)
  end)
end)

describe("a worker of a generational caller", function()
  it("collects its garbage without copying the inherited heap", function()
    if SANITIZED then return end -- another allocator: other pages
    -- ~45 MB of lines (11,000 pages) made old by entering generational mode
    -- after they are built; each worker makes ~100 MB of garbage. A young
    -- collection never writes an old object: the workers fault in their
    -- own garbage's pages only. A full cycle marks every line, copying
    -- each worker's whole inherited heap.
    local out = run [[
      local t = {}
      local y = string.rep("y", 91)
      -- one block a line, no garbage between: no free holes in its pages
      -- (a worker reusing one would copy that page)
      for i = 1, 300000 do t[i] = string.format("%09d%s", i, y) end
      collectgarbage("incremental")
      collectgarbage("generational")
      local function cminflt()
        local f = assert(io.open("/proc/self/stat"))
        local s = f:read("a")
        f:close()
        local rest, k = s:match("%) (.*)$"), 2
        for v in rest:gmatch("%S+") do
          k = k + 1
          if k == 11 then return tonumber(v) end
        end
      end
      local heap = collectgarbage("count") // 4
      local f0 = cminflt()
      local n = 0
      for _, r in parmap.parmap(function(s)
        local g = {}
        for i = 1, 8 do g[i] = { i } end
        return #s + #g
      end, t, { N = 2 }) do n = n + r end
      io.write("FAULTS ", cminflt() - f0, " PAGES ", heap, " SUM ", n, "\n")
    ]]
    local f, pages, sum = out:match("FAULTS (%d+) PAGES (%d+) SUM (%d+)")
    assert.truthy(f, out)
    assert.equal(300000 * 108, tonumber(sum), out)
    -- without: ~2 faults per inherited page per worker (40,000)
    assert.is_true(tonumber(f) < tonumber(pages) // 2, out)
  end)
end)

describe("a worker of a caller whose generational mode fell back", function()
  it("inherits old objects: the caller settles the mode before forking", function()
    if SANITIZED then return end
    -- lua5.4's generational mode, falling back to full collections while
    -- the table grows, leaves its lines young; parmap ends the fallback in
    -- the caller, else each worker's collections copy the whole heap
    local out = run [[
      collectgarbage("generational")
      local t, y = {}, string.rep("y", 91)
      for i = 1, 300000 do t[i] = string.format("%09d%s", i, y) end
      local function cminflt()
        local f = assert(io.open("/proc/self/stat"))
        local s = f:read("a")
        f:close()
        local rest, k = s:match("%) (.*)$"), 2
        for v in rest:gmatch("%S+") do
          k = k + 1
          if k == 11 then return tonumber(v) end
        end
      end
      local heap = collectgarbage("count") // 4
      local f0 = cminflt()
      local r = parmap.map(function(s)
        local g = {}
        for i = 1, 8 do g[i] = { i } end
        return #s + #g
      end, t, { N = 2 })
      local p = parmap.ReturnProcess(function()
        for _ = 1, 300000 do local g = {} for i = 1, 8 do g[i] = { i } end end
        return #t
      end):start()
      io.write("FAULTS ", cminflt() - f0, " PAGES ", heap, " N ", #r, " ", p:join(), "\n")
    ]]
    local f, pages = out:match("FAULTS (%d+) PAGES (%d+) N 300000 300000")
    assert.truthy(f, out)
    -- without: ~2 faults per inherited page per child (60,000)
    assert.is_true(tonumber(f) < tonumber(pages) // 2, out)
  end)
end)

describe("a ReturnProcess child's collector", function()
  it("runs inside its call, also when the target sets its own hook", function()
    local out = run [[
      for _, hook in ipairs { false, true } do
        local p = parmap.ReturnProcess(function()
          if hook then debug.sethook(function() end, "", 1000) end
          churn(3000000)
          debug.sethook()
          return peak()
        end):start()
        io.write("PEAK ", p:join(), "\n")
      end
    ]]
    local p = peaks(out)
    assert.equal(2, #p, out)
    assert.is_true(p[1] < LIMIT_MB, "child peak " .. p[1] .. " MB")
    assert.is_true(p[2] < LIMIT_MB, "child peak with a hook " .. p[2] .. " MB")
  end)
end)
