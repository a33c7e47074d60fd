-- spec/installed/smoke.lua: a short spec for an *installed* parmap, run by
-- .ci/packaging.sh against each installation (make install, luarocks make,
-- a packed source rock) with LUA_PATH/LUA_CPATH naming only that tree.
-- Its name does not match busted's "_spec" pattern, so `make test` does not
-- run it; run it by hand with
--   PARMAP_TREE_LUA=$PREFIX/share/lua/5.4 PARMAP_TREE_C=$PREFIX/lib/lua/5.4 \
--   LUA_PATH="$PARMAP_TREE_LUA/?.lua;;" LUA_CPATH="$PARMAP_TREE_C/?.so;;" \
--   lua5.4 $(command -v busted) -o TAP spec/installed/smoke.lua
-- (from a directory without a .busted file, which would add lua/ to the path).
local tree_lua = os.getenv("PARMAP_TREE_LUA")
local tree_c = os.getenv("PARMAP_TREE_C")

local function inside(path, dir)
  return path ~= nil and dir ~= nil and path:sub(1, #dir + 1) == dir .. "/"
end

describe("the installed parmap", function()
  it("is the one in the tree under test, Lua and C halves", function()
    assert.is_string(tree_lua, "PARMAP_TREE_LUA is not set")
    assert.is_string(tree_c, "PARMAP_TREE_C is not set")
    local front = package.searchpath("parmap", package.path)
    local process = package.searchpath("parmap.returnprocess", package.path)
    local core = package.searchpath("parmap.core", package.cpath)
    assert.is_true(inside(front, tree_lua), "parmap found at " .. tostring(front))
    assert.is_true(inside(process, tree_lua), "parmap.returnprocess found at " .. tostring(process))
    assert.is_true(inside(core, tree_c), "parmap.core found at " .. tostring(core))
    local parmap = require "parmap"
    assert.are.equal("@" .. front, debug.getinfo(parmap.map, "S").source)
  end)

  it("says its version", function()
    assert.are.equal("0.1.0", require("parmap")._VERSION)
  end)

  it("maps a closure on forked workers, in order", function()
    local parmap = require "parmap"
    local base = 1000
    local items = {}
    for i = 1, 200 do items[i] = i end
    local out, n = parmap.map(function(x) return base + x * x end, items, { N = 2 })
    assert.are.equal(200, n)
    for i = 1, 200 do assert.are.equal(base + i * i, out[i]) end
  end)

  it("runs the items in other processes", function()
    local parmap, core = require "parmap", require "parmap.core"
    local pids = parmap.map(function() return core.pid() end, { 1, 2, 3, 4 }, { N = 2 })
    for i = 1, 4 do assert.are_not.equal(core.pid(), pids[i]) end
  end)

  it("pulls an iterator lazily and stops at break", function()
    local parmap = require "parmap"
    local seen = 0
    for i, r in parmap(function(s) return #s end, ("x"):rep(10000):gmatch("x"),
                       { N = 2, ordered = false }) do
      assert.are.equal(1, r)
      assert.is_true(i >= 1)
      seen = seen + 1
      if seen == 50 then break end
    end
    assert.are.equal(50, seen)
  end)

  it("keeps values exact across the process boundary", function()
    local parmap = require "parmap"
    local out = parmap.map(function(x) return { x, -0.0, 2^53 + 1, "a\0b" } end,
      { 7 }, { N = 2 })
    local r = out[1]
    assert.are.equal("integer", math.type(r[1]))
    assert.are.equal(1 / 0 * -1, 1 / r[2])
    assert.are.equal(2^53 + 1, r[3])
    assert.are.equal("a\0b", r[4])
  end)

  it("reports a failed item with its index", function()
    local parmap = require "parmap"
    local out = parmap.map(function(x)
      if x == 3 then error("boom") end
      return x
    end, { 1, 2, 3, 4 }, { N = 2, exception = "return" })
    assert.is_true(parmap.iserror(out[3]))
    assert.are.equal(3, out[3].index)
    assert.is_truthy(out[3].message:find("boom", 1, true))
    assert.are.equal(4, out[4])
  end)
end)
