-- parmap.range: a map over the values of a numeric `for` without a table
-- of them: workers compute their items; # and total are known; every
-- option works with it.
local parmap = require "parmap"
local H = require "helpers"
local M = require "mpi_helpers"

-- The values `for x = a, b, s` gives, as a list.
local function for_values(a, b, s)
  local out = {}
  if s == nil then
    for x = a, b do out[#out + 1] = x end
  else
    for x = a, b, s do out[#out + 1] = x end
  end
  return out
end

-- x as a string that tells integers from floats and every float bit.
local function exact(x)
  if math.type(x) == "integer" then return "i" .. x end
  return "f" .. string.format("%a", x)
end

local function exact_list(t, n)
  local out = {}
  for i = 1, n do out[i] = exact(t[i]) end
  return table.concat(out, " ")
end

local function same_as_for(got, n, a, b, s)
  local want = for_values(a, b, s)
  assert.equal(#want, n)
  assert.equal(exact_list(want, #want), exact_list(got, n))
end

local id = function(x) return x end

describe("parmap.range", function()
  it("range(n) is 1..n, integers, with # and indexing", function()
    local r = parmap.range(5)
    assert.equal(5, #r)
    assert.equal(1, r[1])
    assert.equal(5, r[5])
    assert.is_nil(r[0])
    assert.is_nil(r[6])
    assert.is_nil(r.n)
    assert.equal("integer", math.type(r[3]))
    local got, n = parmap.map(id, r, { N = 2 })
    same_as_for(got, n, 1, 5)
  end)

  it("gives exactly the values of Lua's numeric for, on the workers", function()
    local cases = {
      { 1, 10 }, { 3, 20, 3 }, { 10, 1, -1 }, { 10, 1, -3 }, { 1, 0 }, { 5, 5 },
      { 1, 2.5 }, { -3, -7.5, -2 }, { 1.0, 5 }, { 0, 1, 0.1 }, { 1, 0, -0.1 },
      { 0.1, 0.9, 0.1 }, { -1e10, 1e10, 1e9 + 0.5 }, { 1, 3, 0.25 },
      { math.maxinteger - 5, math.maxinteger }, { math.mininteger, math.mininteger + 4 },
      { math.maxinteger - 10, math.maxinteger, 4 }, { 1, math.huge * 0 }, -- NaN limit
    }
    for _, c in ipairs(cases) do
      local r = parmap.range(table.unpack(c, 1, 3))
      local got, n = parmap.map(id, r, { N = 2, chunksize = 3 })
      same_as_for(got, n, c[1], c[2], c[3])
      assert.equal(n, #r)
      -- and the table path (__index), as the serial loop and MPI read it
      local t = {}
      for i = 1, #r do t[i] = r[i] end
      same_as_for(t, #r, c[1], c[2], c[3])
    end
  end)

  it("a long float range is exact at every index, in any order", function()
    local r = parmap.range(0, 3000, 0.125 / 3) -- 72001 items, past the marks
    local want = for_values(0, 3000, 0.125 / 3)
    assert.equal(#want, #r)
    local bad = 0
    for i, x in parmap(id, r, { N = 2, ordered = false, chunksize = 997 }) do
      if exact(x) ~= exact(want[i]) then bad = bad + 1 end
    end
    assert.equal(0, bad)
    -- random access in the caller
    for _, i in ipairs({ #want, 1, 4097, 4096, 8193, 30000, 2 }) do
      assert.equal(exact(want[i]), exact(r[i]))
    end
  end)

  it("holds nothing per item: a range of 10^12 costs no memory", function()
    collectgarbage()
    collectgarbage("stop")
    local before = collectgarbage("count")
    local r = parmap.range(1000000000000)
    local cost = collectgarbage("count") - before
    collectgarbage("restart")
    assert.equal(1000000000000, #r)
    assert.is_true(cost < 4, cost .. " KB")
    -- and a map over it stops at break, having built nothing
    local k = 0
    for i, x in parmap(function(x) return x * 2 end, r, { N = 2 }) do
      assert.equal(2 * i, x)
      k = k + 1
      if k == 1000 then break end
    end
    assert.equal(1000, k)
  end)

  it("knows its total: progress gets it", function()
    local totals = {}
    parmap.map(id, parmap.range(50), { N = 2, progress = function(done, total)
      totals[total] = true
    end })
    assert.same({ [50] = true }, totals)
  end)

  it("works with args, kwargs, seed, ordered = false, N = 1, timeout, retries, maxtasks", function()
    local f = function(x, a, kw) return x * a + kw.b end
    local got = parmap.map(f, parmap.range(4), { N = 2, args = { 10 }, kwargs = { b = 1 } })
    assert.same({ 11, 21, 31, 41 }, got)
    got = parmap.map(f, parmap.range(4), { N = 1, args = { 10 }, kwargs = { b = 1 } })
    assert.same({ 11, 21, 31, 41 }, got)
    local a = parmap.map(function(x) return x + math.random() end, parmap.range(20), { N = 2, seed = 7 })
    local b = parmap.map(function(x) return x + math.random() end, parmap.range(20), { N = 1, seed = 7 })
    assert.same(a, b)
    local seen = {}
    for i, x in parmap(id, parmap.range(100), { N = 2, ordered = false }) do
      assert.equal(i, x)
      seen[i] = true
    end
    for i = 1, 100 do assert.is_true(seen[i]) end
    got = parmap.map(id, parmap.range(10), { N = 2, timeout = 30, retries = 1, maxtasks = 3 })
    assert.same(for_values(1, 10), got)
  end)

  it("star = parmap.None calls fn(args...) once per index; star = true and kwstar are errors", function()
    local got, n = parmap.map(function(a) return a end, parmap.range(3), { N = 2, star = parmap.None, args = { "z" } })
    assert.same({ "z", "z", "z" }, got)
    assert.equal(3, n)
    assert.has_error(function() parmap.map(id, parmap.range(3), { star = true }) end,
      "parmap: bad argument #2 'items' (a parmap.range's items are numbers: star = true needs tables; star = parmap.None calls fn(args...) once per index)")
    assert.has_error(function() parmap.map(id, parmap.range(3), { kwstar = true }) end,
      "parmap: bad argument #2 'items' (a parmap.range's items are numbers: kwstar = true needs tables; star = parmap.None calls fn(args...) once per index)")
  end)

  it("an item's error names its index", function()
    for _, N in ipairs({ 1, 2 }) do
      local errs = {}
      for i, r in parmap(function(x) if x == 6 then error("six") end return x end,
          parmap.range(2, 10, 2), { N = N, exception = "return" }) do
        if parmap.iserror(r) then errs[#errs + 1] = i end
      end
      assert.same({ 3 }, errs)
    end
  end)

  it("bad arguments are errors naming them", function()
    local function msg(...)
      local ok, e = pcall(parmap.range, ...)
      assert.is_false(ok)
      return (tostring(e):gsub("^[^:]*:%d+: ", ""))
    end
    assert.equal("parmap.range: bad argument #1 'n' (number expected, got string)", msg("3"))
    assert.equal("parmap.range: bad argument #2 'last' (number expected, got nil)", msg(1, nil))
    assert.equal("parmap.range: bad argument #3 'step' (number expected, got table)", msg(1, 2, {}))
    assert.equal("parmap.range: 1 to 3 arguments expected (n, or first, last[, step]), got 0", msg())
    assert.equal("parmap.range: 1 to 3 arguments expected (n, or first, last[, step]), got 4", msg(1, 2, 3, 4))
    assert.equal("parmap.range: step is zero", msg(1, 2, 0))
    assert.equal("parmap.range: step is zero", msg(1, 2, 0.0))
    assert.equal("parmap.range: more than math.maxinteger items", msg(math.mininteger, math.maxinteger))
    assert.matches("a float range of more than 1000000000 items", msg(0, 1e12, 0.5), 1, true)
    assert.matches("a float range of more than 1000000000 items", msg(0.0, math.huge), 1, true)
    assert.matches("too small to move from", msg(2.0 ^ 53, 2.0 ^ 53 + 10, 1.0), 1, true)
    local r = parmap.range(3)
    assert.has_error(function() r[1] = 5 end)
    assert.equal("parmap.range", getmetatable(r))
  end)

  it("is what a map's error names when given a non-range", function()
    assert.has_error(function() parmap.map(id, 10) end,
      "parmap: bad argument #2 'items' (table or function expected, got number)")
  end)

  -- under parmap-mpi the coordinator reads the range as a table (rank 0
  -- sends each item, a varint: agents have no copy of it)
  it("works under parmap-mpi", function()
    if not M.have then
      pending("PARMAP_MPI_BIN not set (make test, make check-mpi)")
      return
    end
    local src = [[
      local parmap = require "parmap"
      local got, n = parmap.map(function(x) return x * 2 end, parmap.range(1000))
      local ok = n == 1000
      for i = 1, 1000 do ok = ok and got[i] == 2 * i and math.type(got[i]) == "integer" end
      local f = parmap.map(function(x) return x end, parmap.range(0, 1, 0.1))
      local k = 0
      for x = 0, 1, 0.1 do k = k + 1; ok = ok and f[k] == x end
      print("mpi", ok and k == 11 and #f == 11)
    ]]
    local out = M.mpirun(src, 3)
    assert.equal("mpi\ttrue\n", out)
  end)
end)
