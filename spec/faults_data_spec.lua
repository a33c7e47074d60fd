-- Fault injection, bad data: values that cannot travel (both ways), deep
-- nesting, keys of every type, 100 MB strings, a million items; and a
-- worker that writes garbage on its socket (the parent must answer with a
-- clean protocol error, never a crash). spec/fuzz_codec.c fuzzes the
-- decoder itself (`make fuzz`).
local parmap = require "parmap"
local core = require "parmap.core"
local H = require "helpers"
local F = require "faults_helpers"
local T = F.T

local function id(x) return x end

-- A chain of n tables: {next = {next = ... {leaf = leaf}}}.
local function chain(n, leaf)
  local root = {}
  local t = root
  for _ = 2, n do
    local c = {}
    t.next = c
    t = c
  end
  t.leaf = leaf
  return root
end

local function chain_depth(t)
  local n = 1
  while t.next do t, n = t.next, n + 1 end
  return n, t.leaf
end

---------------------------------------------------------------- case 12

describe("faults: values that cannot travel (case 12)", function()
  local bad = {
    { "function", function() return print end },
    { "thread", function() return coroutine.create(print) end },
    { "userdata", function() return T.userdata() end },
    { "userdata", function() return io.stdout end },
    { "userdata", function() return T.lightuserdata(42) end },
  }
  for _, b in ipairs(bad) do
    local tname, make = b[1], b[2]
    it("a " .. tname .. " result: a 'value' error naming the item and the place", function()
      local before = F.snapshot()
      local got = H.collect(parmap.parmap(function(x)
        if x == 2 then return make() end
        if x == 3 then return { ok = 1, deep = { make() } } end
        if x == 4 then return 1, make() end
        return x
      end, H.range(5), { N = 2, exception = "return" }))
      assert.same({ n = 1, 1 }, got[1])
      assert.same({ n = 1, 5 }, got[5])
      for i = 2, 4 do
        assert.is_true(parmap.iserror(got[i][1]))
        assert.equal("value", got[i][1].kind)
        assert.equal(i, got[i][1].index)
      end
      assert.equal("result of item 2: cannot send a " .. tname, got[2][1].message)
      assert.equal("result of item 3: cannot send a " .. tname .. " at .deep[1]", got[3][1].message)
      assert.equal("result 2 of item 4: cannot send a " .. tname, got[4][1].message)
      local ok, e = pcall(parmap.map, function() return make() end, { 1 }, { N = 2 })
      assert.is_false(ok)
      assert.equal("value", e.kind)
      F.assert_stopped(before)
    end)
    for _, mode in ipairs({ "raise", "return", "proc" }) do
      it("a " .. tname .. " iterator item raises a plain error, exception = '" .. mode .. "'", function()
        local before = F.snapshot()
        local k = 0
        local ok, e = pcall(function()
          for _ in parmap.parmap(id, function()
            k = k + 1
            if k == 3 then return { x = { make() } } end
            if k <= 6 then return k end
          end, { N = 2, exception = mode }) do end
        end)
        assert.is_false(ok)
        assert.equal("parmap: item 3: cannot send a " .. tname .. " at .x[1]", e)
        F.assert_stopped(before)
      end)
    end
  end
  it("a function as a key is named as a key", function()
    local ok, e = pcall(parmap.map, function() return { [print] = 1 } end, { 1 }, { N = 2 })
    assert.is_false(ok)
    assert.equal("result of item 1: cannot send a function (as a key)", e.message)
  end)
  it("a value with a metatable travels without it", function()
    local got = parmap.map(function() return setmetatable({ a = 1 }, { __index = print }) end, { 1 }, { N = 2 })
    assert.same({ a = 1 }, got[1])
    assert.is_nil(getmetatable(got[1]))
  end)
end)

describe("faults: big and deep values (case 12)", function()
  it("tables nested 100,000 deep travel both ways, no C stack overflow", function()
    local before = F.snapshot()
    local depth = 100000
    local sent = false
    local got = H.collect(parmap.parmap(function(t)
      local n, leaf = chain_depth(t)
      return chain(n + 1, leaf .. "!")
    end, function()
      if sent then return nil end
      sent = true
      return chain(depth, "bottom")
    end, { N = 2 }))
    local n, leaf = chain_depth(got[1][1])
    assert.equal(depth + 1, n)
    assert.equal("bottom!", leaf)
    F.assert_stopped(before)
  end)
  it("a value that cannot travel 100,000 deep: a clear error, soon", function()
    local before = F.snapshot()
    local t0 = core.now()
    local got = H.collect(parmap.parmap(function() return chain(100000, print) end, { 1 },
      { N = 2, exception = "return" }))
    local e = got[1][1]
    assert.equal("value", e.kind)
    assert.matches("^result of item 1: cannot send a function at %.next%.next", e.message)
    assert.matches("%.%.%.%(99976 levels%)%.%.%..*%.next%.leaf$", e.message)
    assert.is_true(#e.message < 1000)
    local sent = false
    local ok, err = pcall(parmap.map, id, function()
      if not sent then sent = true; return chain(100000, print) end
    end, { N = 2 })
    assert.is_false(ok)
    assert.matches("^parmap: item 1: cannot send a function at %.next%.next", err)
    assert.is_true(core.now() - t0 < F.bound(10), "took " .. (core.now() - t0))
    F.assert_stopped(before)
  end)
  it("an error value nested 100,000 deep travels back", function()
    local before = F.snapshot()
    local got = H.collect(parmap.parmap(function() error(chain(100000, "x")) end, { 1 },
      { N = 2, exception = "return" }))
    assert.equal(100000, (chain_depth(got[1][1].err)))
    F.assert_stopped(before)
  end)
  it("keys of every type travel both ways", function()
    local before = F.snapshot()
    local shared = { "shared" }
    local function sample()
      return {
        [true] = "t", [false] = "f",
        [0] = "zero", [-1] = "neg", [math.maxinteger] = "maxint", [math.mininteger] = "minint",
        [1.5] = "float", [-0.25] = "negfloat", [math.huge] = "inf", [-math.huge] = "-inf",
        [2^53] = "2^53 (an integer key once stored)", [1e300] = "big",
        [""] = "empty", ["with\0nul"] = "nul", [string.rep("k", 1000)] = "long",
        [shared] = "a table key", [{ 1, 2 }] = "another table key",
        shared = shared, 10, 20, 30, [5] = "hole",
      }
    end
    local k = 0
    local got = H.collect(parmap.parmap(function(t)
      assert(t[t.shared] == "a table key", "table key identity lost in the worker")
      return t
    end, function() k = k + 1; if k == 1 then return sample() end end, { N = 2 }))
    local r = got[1][1]
    local want = sample()
    for key, v in pairs(want) do
      if type(key) ~= "table" then assert.same(v, r[key], tostring(key)) end
    end
    assert.equal("a table key", r[r.shared])
    local n = 0
    for key, v in pairs(r) do
      n = n + 1
      if type(key) == "table" and key ~= r.shared then assert.same({ 1, 2 }, key); assert.equal("another table key", v) end
    end
    local m = 0
    for _ in pairs(want) do m = m + 1 end
    assert.equal(m, n)
    assert.equal("integer", math.type(next({ [2^53] = 1 })))
    assert.is_true(r[2^53] ~= nil)
    F.assert_stopped(before)
  end)
  it("a 100 MB string each way", function()
    local before = F.snapshot()
    local size = 100 * 1024 * 1024
    local sent = false
    local got = H.collect(parmap.parmap(function(s)
      return #s, s:sub(1, 10), s:sub(-10), s .. "!"
    end, function()
      if sent then return nil end
      sent = true
      return string.rep("0123456789", size // 10)
    end, { N = 2 }))
    assert.equal(size, got[1][1])
    assert.equal("0123456789", got[1][2])
    assert.equal("0123456789", got[1][3])
    assert.equal(size + 1, #got[1][4])
    assert.equal("789!", got[1][4]:sub(-4))
    collectgarbage()
    F.assert_stopped(before)
  end)
  it("1,000,000 items from a table and from an iterator", function()
    local before = F.snapshot()
    local n = 1000000
    local out, count = parmap.map(function(x) return x + 1 end, H.range(n), { N = 2 })
    assert.equal(n, count)
    assert.equal(2, out[1])
    assert.equal(n + 1, out[n])
    local i, sum, last = 0, 0, 0
    for j, r in parmap.parmap(function(x) return x * 2 end,
      function() i = i + 1; if i <= n then return i end end, { N = 2 }) do
      assert(j == last + 1)
      last = j
      sum = sum + r
    end
    assert.equal(n, last)
    assert.equal(n * (n + 1), sum)
    F.assert_stopped(before)
  end)
end)

---------------------------------------------------------------- case 13

describe("faults: a worker writes garbage on its socket (case 13)", function()
  local my_socket = F.my_socket
  local function frame(nitems, bodylen, flags, body)
    return string.pack("=I4I4I8I8I8", 0x504d5231, nitems, bodylen, 0, flags) .. (body or "")
  end
  local cases = {
    { "a bad magic number", function() return string.rep("X", 32) end,
      "protocol error from worker %d+: bad magic" },
    { "a corrupt record", function() return frame(1, 3, 0, "\0\1\127") end,
      "corrupt result for item 2" },
    { "a record cut short", function() return frame(1, 4, 0, "\0\1\5\9") end,
      "corrupt result for item 2" },
    { "a record announced with no byte behind it", function() return frame(1, 0, 0) end,
      "corrupt result for item 2: no record" },
    { "two records announced, one sent", function() return frame(2, 3, 1, "\0\1\129") end,
      "corrupt result for item 2: no record", 2, 1 },
    { "more results than items", function() return frame(1000, 0, 0) end,
      "protocol error from worker %d+: too many results" },
    { "a segment ended early", function() return frame(0, 0, 1) end,
      "protocol error from worker %d+: segment ended early" },
    { "a body longer than memory", function() return frame(1, 1 << 62, 0) end,
      "parmap: " },
  }
  for _, c in ipairs(cases) do
    local name, bytes, pattern, chunksize, at = c[1], c[2], c[3], c[4] or 1, c[5] or 2
    it(name .. ": a clean error, workers stopped", function()
      local before = F.snapshot()
      local ok, e = pcall(function()
        for _ in parmap.parmap(function(x)
          if x == at then
            assert(T.write(my_socket(), bytes()))
            T.sleep(0.5) -- let the parent read it before the real result
          end
          return x
        end, H.range(4), { N = 2, chunksize = chunksize, exception = "return" }) do end
      end)
      assert.is_false(ok)
      assert.is_string(e)
      assert.matches(pattern, e)
      F.assert_stopped(before)
    end)
  end
  it("a frame cut short by the worker's death is a death, not a hang", function()
    local before = F.snapshot()
    local got = H.collect(parmap.parmap(function(x)
      if x == 2 then
        assert(T.write(my_socket(), frame(1, 100, 0, "\0\1")))
        os.exit(4)
      end
      return x
    end, H.range(4), { N = 2, chunksize = 1, exception = "return" }))
    assert.equal("died", got[2][1].kind)
    assert.matches("exited with status 4 while running item 2", got[2][1].message)
    assert.same({ n = 1, 3 }, got[3])
    F.assert_stopped(before)
  end)
end)
