-- Soak and resources: a thousand maps in one process leave no fd, child or
-- memory behind (case 14); a long ordered stream with a slow item in every
-- thousand keeps the parent's memory bounded (case 15). Both run in a fresh
-- lua5.4 so that the numbers are the engine's alone; each prints its
-- measurements on a "SOAK" line (set PARMAP_SOAK_VERBOSE=1 to see them).
-- Case 15 streams 10,000,000 items (1,000,000 under ASan, 20,000 under
-- valgrind); PARMAP_SOAK=1 forces the full size everywhere.
local F = require "faults_helpers"

local verbose = os.getenv("PARMAP_SOAK_VERBOSE")
local function report(out)
  if verbose then
    for line in out:gmatch("SOAK[^\n]*") do io.stderr:write(line, "\n") end
  end
end

describe("faults: soak (case 14)", function()
  it("1,000 consecutive maps: open fds and children unchanged, RSS flat", function()
    local maps = F.valgrind and 100 or 1000
    local out, code = F.run([[
      local parmap = require "parmap"
      local H = require "helpers"
      local T = require "parmap_testhelper"
      local function nfds() local n = 0 for _ in pairs(T.fds()) do n = n + 1 end return n end
      local function rss()
        collectgarbage(); collectgarbage()
        local f = io.open("/proc/self/status")
        local s = f:read("a")
        f:close()
        return tonumber(s:match("VmRSS:%s*(%d+)"))
      end
      local items = H.range(50)
      local fds0, kids0 = nfds(), #H.children()
      local maps = ]] .. maps .. [[
      local early
      for k = 1, maps do
        local kind = k % 5
        if kind == 0 then -- table input, parmap.map
          local out = parmap.map(function(x) return x * k end, items, { N = 2 })
          assert(out[50] == 50 * k)
        elseif kind == 1 then -- iterator input, unordered
          local i, n = 0, 0
          for _ in parmap.parmap(function(x) return x end, function() i = i + 1 if i <= 50 then return i end end,
            { N = 2, ordered = false }) do n = n + 1 end
          assert(n == 50)
        elseif kind == 2 then -- an error raised
          local ok = pcall(parmap.map, function(x) if x == 7 then error("e") end return x end, items, { N = 2 })
          assert(not ok)
        elseif kind == 3 then -- break
          for i in parmap.parmap(function(x) return x end, items, { N = 2, chunksize = 1 }) do
            if i == 3 then break end
          end
        else -- a worker death with exception = "return"
          local got = parmap.map(function(x) if x == 9 then os.exit(2) end return x end, items,
            { N = 2, exception = "return" })
          assert(parmap.iserror(got[9]) and got[10] == 10)
        end
        assert(#H.children() == kids0, "children left after map " .. k)
        if k == maps // 10 then early = rss() end
      end
      local late = rss()
      print(string.format("SOAK case 14: %d maps, fds %d -> %d, children %d -> %d, RSS %d KiB after %d maps, %d KiB after %d",
        maps, fds0, nfds(), kids0, #H.children(), early, maps // 10, late, maps))
      print("RESULT", fds0 == nfds(), kids0 == #H.children(), late - early)
    ]], 600)
    report(out)
    assert.equal(0, code, out)
    local same_fds, same_kids, growth = out:match("RESULT\t(%a+)\t(%a+)\t(%-?%d+)")
    assert.equal("true", same_fds, out)
    assert.equal("true", same_kids, out)
    -- (the sanitizers' allocators hold freed memory back: RSS says nothing there)
    if not (F.asan or F.valgrind) then
      assert.is_true(tonumber(growth) < 2048, "RSS grew by " .. growth .. " KiB: " .. out)
    end
  end)
end)

describe("faults: soak (case 15)", function()
  it("an ordered stream with one item in a thousand 100x slower keeps the parent's memory bounded", function()
    -- 10,000,000 takes about 3 s here; smaller under the sanitizers
    local n = os.getenv("PARMAP_SOAK") and 10000000
      or (F.valgrind and 20000 or (F.asan and 1000000 or 10000000))
    local out, code = F.run([[
      local parmap = require "parmap"
      local core = require "parmap.core"
      local function status()
        local f = io.open("/proc/self/status")
        local s = f:read("a")
        f:close()
        return tonumber(s:match("VmRSS:%s*(%d+)")), tonumber(s:match("VmHWM:%s*(%d+)"))
      end
      local n = ]] .. n .. [[
      local function spin(reps)
        local a = 0
        for j = 1, reps do a = a + j end
        return a
      end
      -- calibrate: a slow item's fn takes at least 100x a plain one's
      local function cost(reps, times)
        local t = os.clock()
        for _ = 1, times do spin(reps) end
        return (os.clock() - t) / times
      end
      local fast, slow_reps = cost(20, 200000), 2000
      while cost(slow_reps, 2000) < 100 * fast do slow_reps = slow_reps * 5 // 4 end
      local ratio = cost(slow_reps, 2000) / fast
      local function work(x)
        return x, spin(x % 1000 == 0 and slow_reps or 20)
      end
      local i = 0
      local t0 = core.now()
      local early, last, sum = nil, 0, 0
      for k, x in parmap.parmap(work, function() i = i + 1 if i <= n then return i end end,
        { N = 2, ordered = true }) do
        assert(k == last + 1 and x == k)
        last, sum = k, sum + x
        if k == n // 10 then early = status() end
      end
      assert(last == n and sum == n * (n + 1) // 2)
      local rss, hwm = status()
      print(string.format("SOAK case 15: %d items (1 in 1000 %.0fx slower) in %.1f s, parent RSS %d KiB at 10%%, %d KiB at the end, peak %d KiB",
        n, ratio, core.now() - t0, early, rss, hwm))
      print("RESULT", early, hwm)
    ]], 3000)
    report(out)
    assert.equal(0, code, out)
    local early, hwm = out:match("RESULT\t(%d+)\t(%d+)")
    assert.is_not_nil(early, out)
    -- bounded: the peak is the early footprint plus a window of chunks,
    -- not a function of the item count
    assert.is_true(tonumber(hwm) - tonumber(early) < 32 * 1024, out)
  end)
end)
