-- The retries option: an item that failed (fn raised, its worker died, or
-- it timed out) runs again, up to `retries` more times; exactly one result
-- or error is delivered per item, in order, and the error carries attempts.
local parmap = require "parmap"
local core = require "parmap.core"
local H = require "helpers"
local F = require "faults_helpers"
local T = F.T

-- Runs are counted in files, one per item: workers are separate processes.
local dir
local function runs_file(x) return dir .. "/" .. tostring(x) end

-- Count one more run of item x; returns the count (this run included).
local function bump(x, note)
  local f = io.open(runs_file(x))
  local n = f and #f:read("a"):gsub("[^\n]", "") or 0
  if f then f:close() end
  f = assert(io.open(runs_file(x), "a"))
  f:write((note or core.pid()), "\n")
  f:close()
  return n + 1
end

-- The notes of every run of item x (the pid of each run by default).
local function runs(x)
  local out = {}
  local f = io.open(runs_file(x))
  if not f then return out end
  for line in f:lines() do out[#out + 1] = line end
  f:close()
  return out
end

-- fn that raises in its first `k` runs of each item, then returns x * 10.
local function fails_first(k)
  return function(x)
    if bump(x) <= k then error("flaky " .. x) end
    return x * 10
  end
end

-- fn whose worker dies (os.exit) in the first run of each item.
local function dies_first(x)
  if bump(x) == 1 then os.exit(3) end
  return x * 10, core.pid()
end

local function tens(n)
  local t = {}
  for i = 1, n do t[i] = i * 10 end
  return t
end

before_each(function()
  dir = os.tmpname()
  os.remove(dir)
  assert(os.execute("mkdir " .. dir))
end)

after_each(function()
  os.execute("rm -rf " .. dir)
end)

describe("retries, when fn raises", function()
  it("runs an item again until it succeeds within its runs", function()
    assert.same(tens(8), parmap.map(fails_first(2), H.range(8),
      { N = 2, retries = 2 }))
    for x = 1, 8 do assert.equal(3, #runs(x)) end
  end)

  it("gives up after retries + 1 runs: the error says attempts", function()
    local got = {}
    for i, e in parmap(fails_first(2), H.range(4),
      { N = 2, retries = 1, exception = "return" }) do
      got[i] = e
    end
    for x = 1, 4 do
      assert.is_true(parmap.iserror(got[x]))
      assert.equal("error", got[x].kind)
      assert.equal(2, got[x].attempts)
      assert.equal(2, #runs(x))
    end
  end)

  it("raises the last failure with attempts under exception = 'raise'", function()
    local ok, e = pcall(parmap.map, fails_first(5), { 1, 2 }, { N = 2, retries = 2 })
    assert.is_false(ok)
    assert.is_true(parmap.iserror(e))
    assert.equal(3, e.attempts)
    assert.matches("flaky 1", e.message)
  end)

  it("sets attempts = 1 on an error object without retries", function()
    local got = {}
    for i, e in parmap(function() error("no") end, { 1 }, { N = 2, exception = "return" }) do
      got[i] = e
    end
    assert.is_true(parmap.iserror(got[1]))
    assert.equal(1, got[1].attempts)
  end)

  it("reseeds a retried item the same way (seed): a deterministic fn fails alike", function()
    local got = parmap.map(function(x)
      local r = math.random(1 << 40)
      if bump(x, r) == 1 then error("first") end
      return r
    end, H.range(4), { N = 2, retries = 1, seed = 7 })
    for x = 1, 4 do
      local notes = runs(x)
      assert.equal(2, #notes)
      assert.equal(notes[1], notes[2])
      assert.equal(tonumber(notes[1]), got[x])
    end
  end)
end)

describe("retries, when the worker dies or times out", function()
  -- chunksize = 1: a worker sends each result before its next item, so
  -- no finished item dies with it unsent (those would run again anyway)
  it("runs the item again in another worker process", function()
    local pids = {}
    for i, r, pid in parmap(dies_first, H.range(6), { N = 2, retries = 1, chunksize = 1 }) do
      assert.equal(i * 10, r)
      pids[i] = pid
    end
    for x = 1, 6 do
      local notes = runs(x)
      assert.equal(2, #notes)
      assert.not_equal(notes[1], tostring(pids[x])) -- not the dead one
      assert.equal(notes[2], tostring(pids[x]))
    end
  end)

  it("gives up after retries + 1 deaths: kind 'died', attempts", function()
    local got = {}
    for i, e in parmap(function(x) bump(x); os.exit(3) end, H.range(3),
      { N = 2, retries = 2, exception = "return" }) do
      got[i] = e
    end
    for x = 1, 3 do
      assert.equal("died", got[x].kind)
      assert.equal(3, got[x].attempts)
      assert.equal(3, #runs(x))
    end
  end)

  it("counts runs lost to deaths against the runs fn may raise in", function()
    -- run 1 dies, run 2 raises, run 3 would succeed
    local function fn(x)
      local n = bump(x)
      if n == 1 then os.exit(3) end
      if n == 2 then error("second") end
      return x * 10
    end
    local got = {}
    for i, r in parmap(fn, H.range(4), { N = 2, retries = 1, chunksize = 1,
      exception = "return" }) do
      got[i] = r
    end
    for x = 1, 4 do
      assert.is_true(parmap.iserror(got[x]))
      assert.equal("error", got[x].kind)
      assert.equal(2, got[x].attempts)
      assert.equal(2, #runs(x))
    end
    for x = 1, 4 do os.remove(runs_file(x)) end
    assert.same(tens(4), parmap.map(fn, H.range(4), { N = 2, retries = 2, chunksize = 1 }))
  end)

  it("counts them for an item in the middle of a segment too", function()
    -- item 2 of the chunk 1..4: run 1 dies, run 2 raises, run 3 would succeed
    local got = {}
    for i, r in parmap(function(x)
      local n = x == 2 and bump(x) or 3
      if n == 1 then os.exit(3) end
      if n == 2 then error("second") end
      return x * 10
    end, H.range(8), { N = 2, chunksize = 4, retries = 1, exception = "return" }) do
      got[i] = r
    end
    assert.equal("error", got[2].kind)
    assert.equal(2, got[2].attempts)
    got[2] = 20
    assert.same(tens(8), got)
  end)

  it("runs an item that timed out again", function()
    local got = parmap.map(function(x)
      if x == 2 and bump(x) == 1 then T.sleep(120) end -- killed at the timeout
      return x * 10
    end, H.range(3), { N = 2, retries = 1, timeout = F.bound(1) })
    assert.same(tens(3), got)
    assert.equal(2, #runs(2))
  end)

  it("gives up after retries + 1 timeouts: kind 'timeout', attempts", function()
    local got = {}
    for i, e in parmap(function(x) bump(x); T.sleep(120) end, { 1 },
      { N = 2, retries = 1, timeout = 0.2, exception = "return" }) do
      got[i] = e
    end
    assert.equal("timeout", got[1].kind)
    assert.equal(2, got[1].attempts)
    assert.equal(2, #runs(1))
  end)
end)

describe("retries deliver exactly one outcome per item", function()
  -- item x: its first run dies (x % 3 == 0), raises (x % 3 == 1) or succeeds
  local function mixed(x)
    if bump(x) == 1 then
      if x % 3 == 0 then os.exit(3) end
      if x % 3 == 1 then error("once") end
    end
    return x * 10
  end

  it("in order", function()
    local seen = {}
    for i, r in parmap(mixed, H.range(30), { N = 2, retries = 1, chunksize = 4 }) do
      seen[#seen + 1] = i
      assert.equal(i * 10, r)
    end
    assert.same(H.range(30), seen)
  end)

  it("with ordered = false", function()
    local count = {}
    for i, r in parmap(mixed, H.range(30), { N = 2, retries = 1, ordered = false }) do
      assert.equal(i * 10, r)
      count[i] = (count[i] or 0) + 1
    end
    for x = 1, 30 do assert.equal(1, count[x]) end
  end)

  it("from an iterator, with maxtasks", function()
    local n = 0
    local got = parmap.map(mixed, function()
      if n < 20 then n = n + 1; return n end
    end, { N = 2, retries = 1, maxtasks = 3 })
    assert.same(tens(20), got)
  end)

  it("counts an item once in progress, when its outcome is known", function()
    local calls = {}
    parmap.map(mixed, H.range(30), { N = 2, retries = 1,
      progress = function(done, total) calls[#calls + 1] = { done, total } end })
    local last = 0
    for _, c in ipairs(calls) do
      assert.is_true(c[1] > last and c[1] <= 30)
      assert.equal(30, c[2])
      last = c[1]
    end
    assert.equal(30, last)
  end)

  it("leaves no child and no fd behind", function()
    local before = F.snapshot()
    for _ in parmap(mixed, H.range(12), { N = 2, retries = 1 }) do end
    local ok = pcall(parmap.map, function(x) bump(x); os.exit(3) end, { 1, 2 },
      { N = 2, retries = 1 })
    assert.is_false(ok)
    F.assert_stopped(before)
  end)
end)

describe("retries do not rerun what would fail alike", function()
  it("a result that cannot travel (kind 'value') fails at once", function()
    local got = {}
    for i, e in parmap(function(x) bump(x); return print end, { 1 },
      { N = 2, retries = 3, exception = "return" }) do
      got[i] = e
    end
    assert.equal("value", got[1].kind)
    assert.equal(1, got[1].attempts)
    assert.equal(1, #runs(1))
  end)

  it("a bad item for star (a shape error) is raised at once", function()
    local ok, err = pcall(parmap.map, function(...) bump("s"); return ... end,
      { 5 }, { N = 2, star = true, retries = 3 })
    assert.is_false(ok)
    assert.matches("item 1: star = true needs a sequence table", err)
    assert.equal(0, #runs("s"))
  end)

  it("an init that raises fails the map once (attempts 1)", function()
    local ok, e = pcall(parmap.map, function(x) return x end, { 1, 2 },
      { N = 2, retries = 3, init = function() error("no init") end })
    assert.is_false(ok)
    assert.equal("init", e.kind)
    assert.equal(1, e.attempts)
  end)
end)

describe("retries on the serial path (N = 1)", function()
  it("runs fn again in the caller", function()
    assert.same(tens(4), parmap.map(fails_first(2), H.range(4), { N = 1, retries = 2 }))
    for x = 1, 4 do assert.equal(3, #runs(x)) end
  end)

  it("gives up after retries + 1 runs, with attempts", function()
    local got = {}
    for i, e in parmap(fails_first(2), { 1, 2 },
      { N = 1, retries = 1, exception = "return" }) do
      got[i] = e
    end
    assert.equal(2, got[1].attempts)
    assert.equal(2, got[2].attempts)
    assert.equal(2, #runs(1))
  end)

  it("raises the error value itself under exception = 'proc'", function()
    local ok, err = pcall(parmap.map, function(x)
      bump(x)
      error({ code = x })
    end, { 1 }, { N = 1, retries = 2, exception = "proc" })
    assert.is_false(ok)
    assert.same({ code = 1 }, err)
    assert.equal(3, #runs(1))
  end)

  it("does not rerun a shape error", function()
    local ok, err = pcall(parmap.map, function(...) bump("s"); return ... end,
      { 5 }, { N = 1, star = true, retries = 3 })
    assert.is_false(ok)
    assert.matches("item 1: star = true needs a sequence table", err)
    assert.equal(0, #runs("s"))
  end)
end)

describe("the retries option", function()
  it("is a non-negative integer", function()
    local function msg(v)
      local ok, err = pcall(parmap.map, tostring, { 1 }, { retries = v })
      assert.is_false(ok)
      return err
    end
    assert.matches([[parmap: bad option 'retries' %(non%-negative integer expected, got string "2"%)]],
      msg("2"))
    assert.matches("bad option 'retries' %(non%-negative integer expected, got %-1%)", msg(-1))
    assert.matches("bad option 'retries' %(non%-negative integer expected, got 1.5%)", msg(1.5))
    assert.matches("bad option 'retries' %(non%-negative integer expected, got boolean%)", msg(true))
  end)

  it("names the caller's line", function()
    local ok, err = pcall(function()
      local r = parmap.map(tostring, { 1 }, { retries = "x" }) -- not a tail call
      return r
    end)
    assert.is_false(ok)
    assert.matches("retries_spec.lua:%d+: parmap: bad option 'retries'", err)
  end)

  it("0 is the default: a failure is final", function()
    local ok, e = pcall(parmap.map, fails_first(1), { 1 }, { N = 2, retries = 0 })
    assert.is_false(ok)
    assert.equal(1, e.attempts)
    assert.equal(1, #runs(1))
  end)
end)
