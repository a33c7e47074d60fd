-- retry_if and retry_delay: which failures get the runs `retries` allows,
-- and how long each waits (doubling, capped by retry_delay_max). Runs are
-- noted in files, one per item, with their start and end times (parmap.now
-- is the system's monotonic clock: the same in every process).
local parmap = require "parmap"
local core = require "parmap.core"
local H = require "helpers"

local dir
local function file(x) return dir .. "/" .. tostring(x) end

-- Note one more run of item x starting now; returns the count.
local function bump(x)
  local n = 0
  local f = io.open(file(x))
  if f then
    for _ in f:lines() do n = n + 1 end
    f:close()
  end
  f = assert(io.open(file(x), "a"))
  f:write("start ", string.format("%.6f", parmap.now()), "\n")
  f:close()
  return n + 1
end

-- Note that this run of item x ends now (just before it raises or dies).
local function ended(x)
  local f = assert(io.open(file(x) .. ".end", "a"))
  f:write(string.format("%.6f", parmap.now()), "\n")
  f:close()
end

local function lines(path, pat)
  local out = {}
  local f = io.open(path)
  if not f then return out end
  for l in f:lines() do out[#out + 1] = tonumber(l:match(pat)) end
  f:close()
  return out
end
local function starts(x) return lines(file(x), "^start (.*)$") end
local function ends(x) return lines(file(x) .. ".end", "^(.*)$") end

-- A note from retry_if itself (it runs in a worker or in the caller).
local function note(line)
  local f = assert(io.open(dir .. "/pred", "a"))
  f:write(line, "\n")
  f:close()
end
local function notes()
  local out = {}
  local f = io.open(dir .. "/pred")
  if not f then return out end
  for l in f:lines() do out[#out + 1] = l end
  f:close()
  return out
end

local function setup()
  dir = H.tmpname()
  assert(os.execute("mkdir -p " .. dir))
end
local function teardown()
  os.execute("rm -rf " .. dir)
end

-- fn: item 2 raises "flaky" in its first two runs, item 3 "bug" always.
local function flaky_or_bug(x)
  local n = bump(x)
  if x == 2 and n <= 2 then ended(x); error("flaky " .. x) end
  if x == 3 then ended(x); error("bug " .. x) end
  return x * 10
end
local function only_flaky(e)
  note(string.format("%s %d %d", e.kind, e.index, e.attempts))
  return tostring(e.err):find("flaky", 1, true) ~= nil
end

for _, N in ipairs { 1, 2 } do
  describe("retry_if on fn's error, N = " .. N, function()
    before_each(setup)
    after_each(teardown)

    it("runs again what it accepts and gives up at once on the rest", function()
      local r = parmap.map(flaky_or_bug, { 1, 2, 3, 4 }, { N = N, retries = 5,
        exception = "return", retry_if = only_flaky })
      assert.same({ 10, 20 }, { r[1], r[2] })
      assert.equal(40, r[4])
      assert.is_true(parmap.iserror(r[3]))
      assert.equal("error", r[3].kind)
      assert.equal(1, r[3].attempts) -- retry_if said no after the 1st run
      assert.matches("bug 3", r[3].message, 1, true)
      assert.equal(3, #starts(2))
      assert.equal(1, #starts(3))
      -- it saw the error objects: kind, index, attempts so far
      local seen = notes()
      table.sort(seen)
      assert.same({ "error 2 1", "error 2 2", "error 3 1" }, seen)
    end)

    it("ends at retries + 1 runs whatever it says", function()
      local r = parmap.map(function(x) bump(x); error("flaky") end, { 1 },
        { N = N, retries = 2, exception = "return", retry_if = only_flaky })
      assert.equal(3, r[1].attempts)
      assert.equal(3, #starts(1))
    end)

    it("says how many runs an item had when it stopped them early", function()
      local r = parmap.map(function(x) bump(x); error("flaky") end, { 1 },
        { N = N, retries = 5, exception = "return",
          retry_if = function(e) return e.attempts < 2 end })
      assert.equal(2, r[1].attempts)
      assert.equal(2, #starts(1))
    end)

    it("that raises: the item runs no more, its message names retry_if", function()
      local r = parmap.map(function(x) bump(x); error("boom") end, { 1 },
        { N = N, retries = 3, exception = "return",
          retry_if = function() error("predicate bug") end })
      assert.equal(1, #starts(1))
      assert.equal("error", r[1].kind)
      assert.matches("option 'retry_if' raised", r[1].message, 1, true)
      assert.matches("predicate bug", r[1].message, 1, true)
      assert.matches("boom", r[1].message, 1, true) -- the item's own failure
    end)

    it("that yields: the same, not a hang nor a crash", function()
      local r = parmap.map(function(x) bump(x); error("boom") end, { 1 },
        { N = N, retries = 3, exception = "return",
          retry_if = function() coroutine.yield(1) end })
      assert.equal(1, #starts(1))
      assert.matches("option 'retry_if' raised", r[1].message, 1, true)
      assert.matches("yield", r[1].message, 1, true)
    end)

    it("retry_delay: the 2nd run starts >= 0.3 s after the 1st ended, the 3rd >= 0.6 s", function()
      local r = parmap.map(function(x)
        if bump(x) <= 2 then ended(x); error("flaky") end
        return x
      end, { 1 }, { N = N, retries = 3, retry_delay = 0.3 })
      assert.equal(1, r[1])
      local s, e = starts(1), ends(1)
      assert.equal(3, #s)
      assert.is_true(s[2] - e[1] >= 0.3, "2nd run after " .. s[2] - e[1])
      assert.is_true(s[3] - e[2] >= 0.6, "3rd run after " .. s[3] - e[2])
    end)
  end)
end

describe("retry_if on deaths and timeouts (decided in the caller)", function()
  before_each(setup)
  after_each(teardown)

  -- N = 1 with a timeout runs the items in one worker process
  for _, o in ipairs { { N = 2 }, { N = 1, timeout = 60 } } do
    it("e.kind == 'died' retries a death, not fn's error (N = " .. o.N .. ")", function()
      local r = parmap.map(function(x)
        local n = bump(x)
        if x == 1 and n == 1 then ended(x); os.exit(3) end
        if x == 2 then error("bug") end
        return x
      end, { 1, 2, 3 }, { N = o.N, timeout = o.timeout, retries = 3,
        exception = "return", chunksize = 1, retry_delay = 0.3,
        retry_if = function(e)
          note(string.format("%s %d %d %s", e.kind, e.index, e.attempts,
            tostring(e.signal)))
          return e.kind == "died"
        end })
      assert.equal(1, r[1])
      assert.equal(3, r[3])
      assert.equal(1, r[2].attempts)
      assert.equal(1, #starts(2))
      local s, e = starts(1), ends(1)
      assert.equal(2, #s)
      assert.is_true(s[2] - e[1] >= 0.3, "2nd run after " .. s[2] - e[1])
      local seen = notes()
      table.sort(seen)
      assert.same({ "died 1 1 nil", "error 2 1 nil" }, seen)
    end)
  end

  it("sees a signal's death with e.signal, and a false answer ends the item", function()
    local r = parmap.map(function(x)
      bump(x)
      require("parmap_testhelper").kill(core.pid())
      return x
    end, { 1 }, { N = 2, retries = 3, exception = "return",
      retry_if = function(e) note(e.kind .. " " .. tostring(e.signal)); return false end })
    assert.equal("died", r[1].kind)
    assert.equal(9, r[1].signal)
    assert.equal(1, r[1].attempts)
    assert.same({ "died 9" }, notes())
  end)

  it("a timeout: kind 'timeout', retried when it says so", function()
    local r = parmap.map(function(x)
      if bump(x) == 1 then ended(x); while true do end end
      return x
    end, { 1 }, { N = 2, retries = 1, timeout = 0.5, retry_delay = 0.3,
      retry_if = function(e) note(e.kind); return e.kind == "timeout" end })
    assert.equal(1, r[1])
    assert.same({ "timeout" }, notes())
    local s, e = starts(1), ends(1)
    assert.is_true(s[2] - e[1] >= 0.3)
  end)

  it("that raises: the death is the item's outcome, its message names retry_if", function()
    local r = parmap.map(function(x) bump(x); os.exit(3) end, { 1 },
      { N = 2, retries = 3, exception = "return",
        retry_if = function() error("predicate bug") end })
    assert.equal(1, #starts(1))
    assert.equal("died", r[1].kind)
    assert.matches("option 'retry_if' raised", r[1].message, 1, true)
    assert.matches("predicate bug", r[1].message, 1, true)
    assert.matches("exited with status 3", r[1].message, 1, true)
  end)

  it("a held item does not hold the others back", function()
    local got = {}
    for i in parmap(function(x)
      if x == 1 and bump(x) == 1 then ended(x); os.exit(3) end
      return x
    end, H.range(6), { N = 2, retries = 1, chunksize = 1, ordered = false,
      retry_delay = 3 }) do
      got[#got + 1] = i
    end
    assert.equal(6, #got)
    assert.equal(1, got[#got]) -- the others came while it waited
    local s, e = starts(1), ends(1)
    assert.is_true(s[2] - e[1] >= 3)
  end)

  it("a held item with no worker left: the map waits for it, then forks", function()
    local r = parmap.map(function(x)
      if bump(x) == 1 then ended(x); os.exit(3) end
      return x
    end, { 1 }, { N = 2, retries = 2, retry_delay = 0.3 })
    assert.equal(1, r[1])
    local s, e = starts(1), ends(1)
    assert.is_true(s[2] - e[1] >= 0.3)
  end)

  it("m:poll() and m:fd() wake for a held item", function()
    local T = require "parmap_testhelper"
    local m = parmap.start(function(x)
      if bump(x) == 1 then ended(x); os.exit(3) end
      return x * 2
    end, { 1 }, { N = 1, retries = 1, retry_delay = 0.3 })
    local got, deadline = {}, parmap.now() + 60
    while true do
      assert(T.poll(m:fd(), 20000), "m:fd() stayed quiet while an item waited")
      local res = table.pack(m:poll())
      if res.n == 0 then break end
      if res[1] then got[res[1]] = res[2] end
      assert(parmap.now() < deadline, "the map did not end")
    end
    assert.equal(2, got[1])
    local s, e = starts(1), ends(1)
    assert.is_true(s[2] - e[1] >= 0.3)
  end)
end)

describe("retry_delay in a worker with a timeout", function()
  before_each(setup)
  after_each(teardown)

  it("the wait is not the run's time: a wait past timeout does not time the item out", function()
    local r = parmap.map(function(x)
      if bump(x) == 1 then ended(x); error("flaky") end
      return x
    end, { 1, 2 }, { N = 2, retries = 1, timeout = 0.5, retry_delay = 1.5,
      exception = "return" })
    assert.equal(1, r[1]) -- not kind "timeout"
    local s, e = starts(1), ends(1)
    assert.is_true(s[2] - e[1] >= 1.5)
  end)

  it("the segment's earlier results reach the loop while an item waits", function()
    local got = {}
    for i in parmap(function(x)
      if x == 3 and bump(x) == 1 then ended(x); error("flaky") end
      return x
    end, { 1, 2, 3, 4 }, { N = 1, timeout = 60, chunksize = 4, retries = 1,
      retry_delay = 3 }) do
      got[i] = parmap.now()
    end
    local s = starts(3)
    assert.equal(2, #s)
    assert.is_true(got[1] < s[2] and got[2] < s[2], "1 and 2 came after the wait")
  end)

  it("a death while it waits counts the run that failed before it", function()
    local r = parmap.map(function(x)
      bump(x)
      error("flaky")
    end, { 1 }, { N = 2, retries = 1, retry_delay = 30, exception = "return",
      retry_if = function(e) -- in the worker, just before its wait
        if e.kind == "error" and parmap.worker() then
          os.execute("(sleep 0.3; kill -KILL " .. core.pid() .. ") &")
        end
        return true
      end })
    assert.equal("died", r[1].kind)
    assert.equal(2, r[1].attempts) -- the failed run and the one the death cut
    assert.equal(1, #starts(1))
  end)
end)

describe("retry_delay's doubling and retry_delay_max", function()
  before_each(setup)
  after_each(teardown)

  for _, N in ipairs { 1, 2 } do
    it("caps the wait (N = " .. N .. ")", function()
      -- uncapped, 20 s then 40 s
      local t0 = parmap.now()
      local r = parmap.map(function(x)
        if bump(x) <= 2 then ended(x); error("flaky") end
        return x
      end, { 1 }, { N = N, retries = 2, retry_delay = 20, retry_delay_max = 0.2 })
      assert.equal(1, r[1])
      local s, e = starts(1), ends(1)
      assert.is_true(s[2] - e[1] >= 0.2 and s[3] - e[2] >= 0.2)
      assert.is_true(parmap.now() - t0 < 25, "the cap held")
    end)
  end

  it("caps a death's wait too", function()
    local t0 = parmap.now()
    local r = parmap.map(function(x)
      if bump(x) <= 2 then ended(x); os.exit(3) end
      return x
    end, { 1 }, { N = 2, retries = 2, retry_delay = 20, retry_delay_max = 0.2 })
    assert.equal(1, r[1])
    assert.is_true(parmap.now() - t0 < 25, "the cap held")
  end)
end)

describe("retry_if, retry_delay, retry_delay_max: bad values", function()
  local function err_of(opts)
    local ok, e = pcall(parmap.map, function(x) return x end, { 1 }, opts)
    assert.is_false(ok)
    return e
  end
  it("name the option", function()
    assert.matches("bad option 'retry_if' (function expected, got 3)",
      err_of { retries = 1, retry_if = 3 }, 1, true)
    assert.matches("bad option 'retry_delay' (number of seconds from 0 to 86400 expected, got -1)",
      err_of { retry_delay = -1 }, 1, true)
    assert.matches("bad option 'retry_delay' (number of seconds",
      err_of { retry_delay = "1" }, 1, true)
    assert.matches("bad option 'retry_delay' (number of seconds",
      err_of { retry_delay = 0 / 0 }, 1, true)
    assert.matches("bad option 'retry_delay_max' (number of seconds",
      err_of { retry_delay_max = 1e6 }, 1, true)
    assert.matches("bad option 'retry_delay_max' (number of seconds",
      err_of { retry_delay_max = true }, 1, true)
  end)
  it("a typo gets the closest name", function()
    assert.matches("did you mean 'retry_delay'?", err_of { retry_dely = 1 }, 1, true)
    assert.matches("did you mean 'retry_if'?", err_of { retryif = print }, 1, true)
  end)
  it("a callable table is a predicate", function()
    local pred = setmetatable({}, { __call = function(_, e) return e.attempts < 2 end })
    local r = parmap.map(function() error("x") end, { 1 },
      { N = 2, retries = 4, exception = "return", retry_if = pred })
    assert.equal(2, r[1].attempts)
  end)
end)
