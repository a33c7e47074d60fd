-- A worker's finished results reach the loop while its slow item still
-- runs (DESIGN.md, Frames: within 20 ms of the last flush), not when the
-- slow item ends: the fast items of a chunk never wait behind its slow one.
-- No timing is asserted: the slow item runs until the loop has seen the
-- fast results (a marker file), or gives up after GIVE_UP seconds, and says
-- which.
local parmap = require "parmap"
local H = require "helpers"

local GIVE_UP = 15 -- seconds: only reached when results are held back

local function exists(path)
  local f = io.open(path)
  if f then f:close() end
  return f ~= nil
end

local function touch(path)
  assert(io.open(path, "w")):close()
end

local marker
before_each(function()
  marker = os.tmpname()
  os.remove(marker)
end)
after_each(function() os.remove(marker) end)

-- How the slow item waits for the marker.
local WAITS = {
  -- blocked in C (a child process), as os.execute("sleep 3") is
  c = function(path)
    local t0 = parmap.now()
    while parmap.now() - t0 < GIVE_UP do
      if exists(path) then return "released" end
      os.execute("sleep 0.05")
    end
    return "gave up"
  end,
  -- a busy loop in Lua
  lua = function(path)
    local t0, k = parmap.now(), 0
    while parmap.now() - t0 < GIVE_UP do
      k = k + 1
      if k % 100000 == 0 and exists(path) then return "released" end
    end
    return "gave up"
  end,
}

-- Items 1..n-1 fast, item n slow, all in one chunk of one worker; the loop
-- touches the marker once it has every fast result. fn(x, path) gets the
-- item's number and the marker; returns the loop's results.
local N_ITEMS = 4
local function run(fn, opts, items)
  local o = { N = 2, chunksize = N_ITEMS }
  for k, v in pairs(opts or {}) do o[k] = v end
  local path = marker
  local got, fast = {}, 0
  for i, r in parmap(function(...) return fn(path, ...) end,
                     items or H.range(N_ITEMS), o) do
    got[i] = r
    if i < N_ITEMS and not parmap.iserror(r) then
      fast = fast + 1
      if fast == N_ITEMS - 1 then touch(path) end
    end
  end
  return got
end

-- fast items return x * 10; the last waits with `wait`
local function plain(wait)
  return function(path, x)
    if x == N_ITEMS then return wait(path) end
    return x * 10
  end
end

describe("a chunk's finished results while its slow item runs", function()
  for _, ordered in ipairs({ false, true }) do
    for name, wait in pairs(WAITS) do
      it(string.format("reach the loop (ordered = %s, fn %s)", tostring(ordered),
        name == "c" and "blocked in C" or "busy in Lua"), function()
        assert.same({ 10, 20, 30, "released" }, run(plain(wait), { ordered = ordered }))
      end)
    end
  end

  it("through the call adapter (star, args, kwargs) and with retries", function()
    local items = {}
    for i = 1, N_ITEMS do items[i] = { i } end
    local got = run(function(path, x, a, kw)
      if x == N_ITEMS then return WAITS.c(path) end
      return x * a * kw.k
    end, { star = true, args = { 10 }, kwargs = { k = 1 }, retries = 2 }, items)
    assert.same({ 10, 20, 30, "released" }, got)
  end)

  it("when fn forks (a ReturnProcess in fast items, a map in the slow one)", function()
    local got = run(function(path, x)
      if x == N_ITEMS then
        -- a map inside the worker, with workers of its own
        local r = parmap.map(function(y) return y end, { 1, 2, 3 }, { N = 2 })
        assert(r[3] == 3)
        return WAITS.c(path)
      end
      local p = parmap.ReturnProcess(function() return x * 10 end):start()
      return p:join()
    end)
    assert.same({ 10, 20, 30, "released" }, got)
  end)

  it("when the slow item then exits: delivered once, the slow item died", function()
    local got = run(function(path, x)
      if x == N_ITEMS then
        local f = assert(io.open(path .. ".how", "w"))
        f:write(WAITS.c(path))
        f:close()
        os.exit(3)
      end
      return x * 10
    end, { exception = "return" })
    local f = assert(io.open(marker .. ".how"))
    local how = f:read("a")
    f:close()
    os.remove(marker .. ".how")
    assert.equal("released", how)
    assert.same({ 10, 20, 30 }, { got[1], got[2], got[3] })
    assert.is_true(parmap.iserror(got[4]))
    assert.equal("died", got[4].kind)
  end)

  it("when the loop leaves early, the slow item is stopped", function()
    local path, t0 = marker, parmap.now()
    local seen = 0
    for _, r in parmap(function(x)
      if x == N_ITEMS then return WAITS.c(path .. ".never") end
      return x
    end, H.range(N_ITEMS), { N = 2, chunksize = N_ITEMS }) do
      seen = seen + 1
      if seen == N_ITEMS - 1 then break end
      assert(r)
    end
    assert.equal(N_ITEMS - 1, seen)
    assert.is_true(parmap.now() - t0 < GIVE_UP)
    assert.same({}, H.children())
  end)
end)
