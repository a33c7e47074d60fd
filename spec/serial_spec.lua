-- The serial path (N = 1) keeps the fork path's per-item protocol: the same
-- map run with N = 1 and with N = 2 gives the same outcome for every item
-- (values, error objects, what is raised). Also star items' vals.n, read
-- by the call adapter on every path.
local parmap = require "parmap"

local unpack = table.unpack

-- A value with tables compared by content (results and errors that came
-- back from a worker are copies).
local function same(a, b)
  if type(a) ~= "table" or type(b) ~= "table" then
    return a == b or (a ~= a and b ~= b)
  end
  for k, v in next, a do if not same(v, b[k]) then return false end end
  for k in next, b do if a[k] == nil then return false end end
  return true
end

-- What an error says whatever process it came from: its pid and traceback
-- differ between the paths, and so may the err of a table (a copy).
local function shown(v)
  if parmap.iserror(v) then
    return { error = true, index = v.index, kind = v.kind, err = v.err,
      message = v.message, attempts = v.attempts, where = v.where }
  end
  return v
end

-- Every outcome of the map, in order: {i, values...} per item, then
-- {raised = what} when the loop raised.
local function run(N, fn, items, opts)
  local o = { N = N }
  for k, v in next, opts do o[k] = v end
  local out = {}
  if type(items) == "function" then items = items() end -- a fresh iterator
  local function take(i, ...)
    if i == nil then return false end
    local row = table.pack(i, ...)
    for k = 2, row.n do row[k] = shown(row[k]) end
    out[#out + 1] = row
    return true
  end
  local ok, err = pcall(function()
    local f, s, c, closer <close> = parmap(fn, items, o)
    while take(f(s, c)) do end
  end)
  if not ok then out[#out + 1] = { raised = shown(err) } end
  return out
end

-- The same map with N = 1 and N = 2 gives the same outcomes.
local function differential(fn, items, opts)
  local serial, forked = run(1, fn, items, opts), run(2, fn, items, opts)
  if not same(serial, forked) then
    error(string.format("N = 1 and N = 2 differ:\nN = 1: %s\nN = 2: %s",
      require("pl.pretty").write(serial), require("pl.pretty").write(forked)), 2)
  end
  return serial
end

-- items[i], raising for item `bad` (a table of five through __len).
local function raising_items(bad, what)
  return setmetatable({}, {
    __len = function() return 5 end,
    __index = function(_, i)
      if type(i) ~= "number" then return nil end
      if i == bad then error(what or ("no item " .. i)) end
      return i
    end,
  })
end

local EXCEPTIONS = { "return", "raise", "proc" }

describe("the serial path (N = 1) against the fork path (N = 2)", function()
  it("an items table whose __index raises fails that item alone", function()
    for _, exception in ipairs(EXCEPTIONS) do
      local out = differential(function(x) return x * 10 end,
        raising_items(3), { exception = exception })
      if exception == "return" then -- the map goes on past item 3
        assert.equal(5, #out)
        assert.is_true(out[3][2].error)
        assert.equal("error", out[3][2].kind)
        assert.equal(3, out[3][2].index)
        assert.matches("no item 3", out[3][2].message)
        assert.same({ 4, 40 }, { out[4][1], out[4][2] })
      else
        assert.equal(3, #out) -- items 1, 2, then the raise
        assert.is_not_nil(out[3].raised)
      end
    end
  end)

  it("an item error that is a table keeps its value", function()
    differential(function(x) return x end,
      raising_items(2, { code = 7 }), { exception = "return" })
    differential(function(x) return x end,
      raising_items(2, { code = 7 }), { exception = "proc" })
  end)

  it("retries run an item whose items[i] raises again, as a worker does", function()
    local out = differential(function(x) return x end, raising_items(3),
      { exception = "return", retries = 2 })
    assert.equal(3, out[3][2].attempts)
  end)

  it("fn raising, values, nil and many results, every exception mode", function()
    local function fn(x)
      if x == 2 then error("boom " .. x) end
      if x == 3 then error({ x = x }) end
      if x == 4 then return nil, nil end
      if x == 5 then return end
      if x == 6 then return unpack(parmap.map(function(y) return y end, { 1, 2, 3 }, { N = 1 })) end
      return x, { x, { x } }, "s" .. x
    end
    for _, exception in ipairs(EXCEPTIONS) do
      for _, retries in ipairs({ 0, 1 }) do
        differential(fn, { 1, 2, 3, 4, 5, 6, 7 },
          { exception = exception, retries = retries })
      end
    end
  end)

  it("kwstar items, with retries, args and kwargs", function()
    local function fn(...)
      local kw = select(select("#", ...), ...)
      if kw.fail then error("fails " .. tostring(kw.fail)) end
      return ...
    end
    local items = { { 1, {} }, { 2, { fail = 2 } }, { 3, { a = 3 } } }
    for _, retries in ipairs({ 0, 2 }) do
      local out = differential(fn, items, { kwstar = true, retries = retries,
        exception = "return", args = { "a" }, kwargs = { k = 1 } })
      assert.equal(retries + 1, out[2][2].attempts)
    end
    differential(fn, { { 1, {} }, 5 }, { kwstar = true, exception = "return" })
    differential(fn, { { a = 1 }, { fail = 1 } },
      { kwstar = true, star = parmap.None, exception = "return", retries = 1 })
    differential(fn, { { { 1, 2 }, { b = 1 } }, { { 1, n = 3 }, { fail = 1 } } },
      { kwstar = true, star = true, exception = "return", retries = 1 })
  end)

  it("items of a bad shape raise naming the item, whatever exception says", function()
    local fn = function(...) return select("#", ...) end
    for _, exception in ipairs(EXCEPTIONS) do
      local o = { exception = exception, star = true }
      local out = differential(fn, { { 1 }, 2 }, o)
      assert.matches("item 2", out[#out].raised)
      out = differential(fn, { { 1 }, { 1, 2, n = 1.5 } }, o)
      assert.matches("item 2", out[#out].raised)
      out = differential(fn, { { 1, {} }, { 2, 3 } },
        { exception = exception, kwstar = true })
      assert.matches("item 2: kwvals must be a table", out[#out].raised)
    end
  end)

  it("vals' own metamethods raise inside the item", function()
    local vals = setmetatable({}, {
      __len = function() return 2 end,
      __index = function(_, k) if k == 2 then error("no value 2") end end,
    })
    local badlen = setmetatable({}, { __len = function() error("no length") end })
    local out = differential(function(...) return select("#", ...) end,
      { { 1 }, vals, badlen, { 4, 4 } }, { star = true, exception = "return" })
    assert.equal("error", out[2][2].kind)
    assert.matches("no value 2", out[2][2].message)
    assert.matches("no length", out[3][2].message)
    assert.same({ 4, 2 }, { out[4][1], out[4][2] })
  end)

  it("an items iterator that raises: the items before, then its error", function()
    local function items()
      local k = 0
      return function()
        k = k + 1
        if k == 3 then error("iterator broke") end
        return k
      end
    end
    for _, exception in ipairs(EXCEPTIONS) do
      local out = differential(function(x) return x end, items,
        { exception = exception })
      assert.equal(3, #out)
      assert.matches("iterator broke", out[3].raised)
    end
  end)

  it("fn returning as many values as a worker may return (900,000)", function()
    local k = 900000
    local t = {}
    for j = 1, k do t[j] = j end
    for _, N in ipairs({ 1, 2 }) do
      for _, exception in ipairs(EXCEPTIONS) do
        local got = {}
        -- the loop takes two values: counting them would copy them all
        for i, a in parmap(function(x) return x, table.unpack(t, 1, k - x) end,
          { 0, 1 }, { N = N, exception = exception }) do
          got[i] = a
        end
        assert.same({ 0, 1 }, got)
      end
    end
  end)

  it("init that raises and finish", function()
    differential(function(x) return x end, { 1, 2 },
      { init = function() error("no init") end, exception = "return" })
  end)
end)

describe("kwstar = true with retries on the serial path", function()
  it("runs fn again, and attempts counts every run", function()
    local runs = 0
    local r = parmap.map(function(x, kw)
      runs = runs + 1
      if runs <= 2 then error("flaky " .. x .. " " .. kw.k) end
      return x * kw.k
    end, { { 4, { k = 10 } } }, { N = 1, kwstar = true, retries = 3 })
    assert.equal(40, r[1])
    assert.equal(3, runs)
    runs = 0
    r = parmap.map(function() runs = runs + 1; error("always") end,
      { { 1, {} } }, { N = 1, kwstar = true, retries = 2, exception = "return" })
    assert.equal(3, runs)
    assert.equal("error", r[1].kind)
    assert.equal(3, r[1].attempts)
    assert.matches("always", r[1].message)
  end)
end)

describe("star items' vals.n", function()
  local function count(...) return select("#", ...) end

  for _, N in ipairs({ 1, 2 }) do
    describe("N = " .. N, function()
      it("takes an integer-valued float (2.0 is 2)", function()
        local r = parmap.map(count, { { 1, 2, 3, n = 2.0 }, { 1, n = 0 }, { n = 3 } },
          { N = N, star = true })
        assert.same({ 2, 0, 3 }, r)
      end)

      it("refuses anything else, naming the item, whatever exception says", function()
        local bad = { 1.5, "2", -1, 0 / 0, 2 ^ 63, -math.huge, true, {} }
        for _, n in ipairs(bad) do
          for _, exception in ipairs(EXCEPTIONS) do
            local ok, err = pcall(parmap.map, count, { { 1 }, { 1, 2, 3, n = n } },
              { N = N, star = true, exception = exception })
            assert.is_false(ok)
            assert.is_string(err)
            assert.matches("item 2: star = true: vals.n must be a non%-negative integer", err)
          end
        end
        local _, err = pcall(parmap.map, count, { { n = "2" } }, { N = N, star = true })
        assert.matches('got string "2"', err)
        _, err = pcall(parmap.map, count, { { n = 0 / 0 } }, { N = N, star = true })
        assert.matches("got nan", err)
      end)

      it("says too many values past the stack's limit", function()
        local ok, err = pcall(parmap.map, count, { { n = math.maxinteger } },
          { N = N, star = true })
        assert.is_false(ok)
        assert.matches("item 1: star = true: too many values to unpack", err)
      end)

      it("refuses a __len that gives no non-negative integer", function()
        for _, len in ipairs({ -1, 1.5, "2" }) do
          local t = setmetatable({}, { __len = function() return len end })
          local ok, err = pcall(parmap.map, count, { { 1 }, t }, { N = N, star = true,
            exception = "return" })
          assert.is_false(ok)
          assert.matches("item 2: star = true: #vals %(its __len%) must be a non%-negative integer, got "
            .. (len == "2" and 'string "2"' or tostring(len):gsub("%p", "%%%0")), err)
        end
        local t = setmetatable({}, { __len = function() return 2.0 end })
        assert.same({ 2 }, parmap.map(count, { t }, { N = N, star = true }))
      end)

      it("applies to {vals, kwvals} items of kwstar too", function()
        local r = parmap.map(count, { { { 1, 2, 3, n = 1.0 }, {} } },
          { N = N, star = true, kwstar = true })
        assert.same({ 2 }, r) -- one value and the kw table
        local ok, err = pcall(parmap.map, count, { { { 1, n = -2 }, {} } },
          { N = N, star = true, kwstar = true })
        assert.is_false(ok)
        assert.matches("item 1: star = true: vals.n", err)
      end)

      it("from an iterator too", function()
        local t = { { 1, 2, n = 1.0 }, { 1, n = 0.5 } }
        local k = 0
        local ok, err = pcall(parmap.map, count, function() k = k + 1; return t[k] end,
          { N = N, star = true })
        assert.is_false(ok)
        assert.matches("item 2: star = true: vals.n", err)
      end)
    end)
  end
end)

describe("ParEval's chunk results' n", function()
  it("is read as an integer (2.0 is 2), whatever N", function()
    for _, N in ipairs({ 1, 2 }) do
      local pe = parmap.ParEval(function(c) return { c[1], c[2], n = 2.0 } end,
        { n_chunks = 2, N = N })
      local out = pe({ 1, 2, 3, 4 })
      assert.equal(4, out.n)
      assert.equal("integer", math.type(out.n))
      assert.same({ 1, 2, 3, 4 }, { out[1], out[2], out[3], out[4] })
      pe = parmap.ParEval(function(c) return { c[1], n = 0 / 0 } end, { n_chunks = 2, N = N })
      local ok, err = pcall(pe, { 1, 2 })
      assert.is_false(ok)
      assert.matches("chunk 1 %(items 1..1%) returned a table whose n is nan", err)
    end
  end)
end)
