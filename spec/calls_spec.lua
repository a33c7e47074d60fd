-- The call semantics: parmapper's star / kwstar / args / kwargs table,
-- for N = 1 (serial), 2 and 4.
local parmap = require "parmap"
local None = parmap.None

-- fn reports exactly what it was called with: its argument count, and each
-- argument (tables are copied to plain values so they can travel back).
local function echo(...)
  local out = { n = select("#", ...) }
  for k = 1, out.n do
    local v = select(k, ...)
    if type(v) == "table" then
      local copy = {}
      for key, x in pairs(v) do copy[key] = x end
      v = copy
    end
    out[k] = v
  end
  return out
end

local function run(items, opts)
  local got = {}
  for i, r in parmap.parmap(echo, items, opts) do got[i] = r end
  return got
end

for _, N in ipairs({ 1, 2, 4 }) do
  describe("N = " .. N, function()
    describe("star = false, kwstar = false", function()
      it("calls fn(val)", function()
        local got = run({ 10, 20, 30 }, { N = N })
        assert.same({ n = 1, 10 }, got[1])
        assert.same({ n = 1, 30 }, got[3])
      end)
      it("appends args after val, honouring args.n", function()
        local got = run({ 1, 2 }, { N = N, args = { n = 3, "a", nil, "c" } })
        assert.same({ n = 4, 1, "a", nil, "c" }, got[1])
        assert.same({ n = 4, 2, "a", nil, "c" }, got[2])
      end)
      it("passes a copy of kwargs as the trailing table", function()
        local kw = { scale = 3 }
        local got = run({ 1, 2 }, { N = N, args = { "x" }, kwargs = kw })
        assert.same({ n = 3, 2, "x", { scale = 3 } }, got[2])
      end)
    end)

    describe("star = true, kwstar = false", function()
      it("unpacks vals, honouring vals.n", function()
        local got = run({ { 1, 2 }, { n = 3, "a" } }, { N = N, star = true })
        assert.same({ n = 2, 1, 2 }, got[1])
        assert.same({ n = 3, "a", nil, nil }, got[2])
      end)
      it("appends args and kwargs", function()
        local got = run({ { 1, 2 } }, { N = N, star = true, args = { 9 }, kwargs = { k = 1 } })
        assert.same({ n = 4, 1, 2, 9, { k = 1 } }, got[1])
      end)
    end)

    describe("star = parmap.None, kwstar = false", function()
      it("ignores the item but counts it", function()
        local got = run({ "ignored", "also" }, { N = N, star = None, args = { 7 } })
        assert.same({ n = 1, 7 }, got[1])
        assert.same({ n = 1, 7 }, got[2])
      end)
      it("calls fn() with no arguments at all", function()
        local got = run({ 1 }, { N = N, star = None })
        assert.same({ n = 0 }, got[1])
      end)
    end)

    describe("star = parmap.None, kwstar = true", function()
      it("calls fn(args..., merge(kwargs, kwvals))", function()
        local got = run({ { b = 2, a = 10 } }, { N = N, star = None, kwstar = true,
          args = { "p" }, kwargs = { a = 1, c = 3 } })
        assert.same({ n = 2, "p", { a = 10, b = 2, c = 3 } }, got[1])
      end)
    end)

    describe("star = false, kwstar = true", function()
      it("calls fn(val, args..., merge(kwargs, kwvals))", function()
        local got = run({ { 5, { x = 1 } } }, { N = N, kwstar = true, args = { "p" } })
        assert.same({ n = 3, 5, "p", { x = 1 } }, got[1])
      end)
      it("gives every call its own fresh table", function()
        local seen = {}
        local f = function(_, kw)
          kw.touched = (kw.touched or 0) + 1
          return kw.touched
        end
        for i, r in parmap.parmap(f, { { 1, {} }, { 2, {} }, { 3, {} } },
          { N = N, kwstar = true, kwargs = { base = true } }) do
          seen[i] = r
        end
        assert.same({ 1, 1, 1 }, seen)
      end)
    end)

    describe("star = true, kwstar = true", function()
      it("calls fn(vals..., args..., merge(kwargs, kwvals))", function()
        local got = run({ { { 1, 2 }, { k = "v" } } },
          { N = N, star = true, kwstar = true, args = { 3 }, kwargs = { k = "old", j = 0 } })
        assert.same({ n = 4, 1, 2, 3, { k = "v", j = 0 } }, got[1])
      end)
    end)

    describe("items of the wrong shape", function()
      it("raise naming the item whatever exception says (star = true)", function()
        local ok, err = pcall(run, { { 1 }, 5 }, { N = N, star = true, exception = "return" })
        assert.is_false(ok)
        assert.matches("item 2: star = true needs a sequence table, got number", err)
      end)
      it("raise naming the item (kwstar = true)", function()
        local ok, err = pcall(run, { "x" }, { N = N, kwstar = true })
        assert.is_false(ok)
        assert.matches("item 1: kwstar = true needs a table {val, kwvals}, got string", err)
      end)
      it("raise when kwvals is not a table", function()
        local ok, err = pcall(run, { { 1, 2 } }, { N = N, kwstar = true })
        assert.is_false(ok)
        assert.matches("item 1: kwvals must be a table, got number", err)
      end)
    end)
  end)
end
