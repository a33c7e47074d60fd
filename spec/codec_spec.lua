-- Values travel between processes exactly: every value kind, both ways
-- (iterator items to the workers, results back).
local parmap = require "parmap"

local function identity(...) return ... end

-- Send v to a worker as an iterator item and bring it back as a result.
local function roundtrip(v)
  local sent = false
  local function one()
    if sent then return nil end
    sent = true
    return v
  end
  local got
  for _, r in parmap.parmap(identity, one, { N = 2 }) do got = r end
  return got
end

-- The result only (items from a table: nothing is sent but an index).
local function result_of(v)
  local got
  for _, r in parmap.parmap(function() return v end, { 1 }, { N = 2 }) do got = r end
  return got
end

describe("scalars", function()
  it("keep nil, booleans and the integer subtype", function()
    for _, send in ipairs({ roundtrip, result_of }) do
      assert.is_true(send(true))
      assert.is_false(send(false))
      assert.equal("integer", math.type(send(3)))
      assert.equal("float", math.type(send(3.0)))
      for _, i in ipairs({ 0, 1, 127, 128, -1, -128, 2 ^ 31, math.maxinteger, math.mininteger }) do
        local got = send(math.tointeger(i) or i)
        assert.equal(i, got)
        assert.equal(math.type(math.tointeger(i) or i), math.type(got))
      end
    end
  end)
  it("keep floats bit-exact: -0.0, NaN, infinities, subnormals", function()
    for _, send in ipairs({ roundtrip, result_of }) do
      local z = send(-0.0)
      assert.equal(0, z)
      assert.equal(-math.huge, 1 / z)
      local nan = send(0 / 0)
      assert.is_true(nan ~= nan)
      assert.equal(math.huge, send(math.huge))
      assert.equal(-math.huge, send(-math.huge))
      assert.equal(5e-324, send(5e-324))
      assert.equal(0.1, send(0.1))
      assert.equal(string.pack("d", 1 / 3), string.pack("d", send(1 / 3)))
    end
  end)
  it("keep binary strings", function()
    local all = {}
    for b = 0, 255 do all[#all + 1] = string.char(b) end
    local bin = table.concat(all) .. "\0\0end"
    assert.equal(bin, roundtrip(bin))
    assert.equal(bin, result_of(bin))
    assert.equal("", roundtrip(""))
  end)
  it("carry a 50 MB string each way", function()
    local big = string.rep("0123456789abcdef", 50 * 1024 * 1024 // 16)
    local back = roundtrip(big)
    assert.equal(#big, #back)
    assert.is_true(big == back)
  end)
end)

describe("tables", function()
  it("keep arrays, records, holes and every key type", function()
    local t = { 1, 2, nil, 4, n = 4, name = "x", [2.5] = "float key", [true] = "yes",
      [false] = "no", [-7] = "negative", [math.maxinteger] = "max", ["with space"] = 1 }
    assert.same(t, roundtrip(t))
    assert.same(t, result_of(t))
  end)
  it("keep tables as keys", function()
    local k = { "key" }
    local t = { [k] = "v", other = k }
    local back = roundtrip(t)
    assert.equal("v", back[back.other])
  end)
  it("keep shared references", function()
    local shared = { 1, 2 }
    local t = { a = shared, b = shared, list = { shared, shared } }
    local back = roundtrip(t)
    assert.same(shared, back.a)
    assert.equal(back.a, back.b)
    assert.equal(back.a, back.list[1])
    assert.equal(back.a, back.list[2])
  end)
  it("keep cycles", function()
    local t = { name = "root" }
    t.self = t
    t.child = { parent = t }
    local back = result_of(t)
    assert.equal(back, back.self)
    assert.equal(back, back.child.parent)
    assert.equal("root", back.name)
  end)
  it("share references between the values of one item", function()
    local shared = {}
    local got
    for _, a, b in parmap.parmap(function() return shared, shared end, { 1 }, { N = 2 }) do
      got = { a, b }
    end
    assert.equal(got[1], got[2])
  end)
  it("nest deeply without recursion", function()
    local t = {}
    local cur = t
    for _ = 1, 20000 do
      cur.next = {}
      cur = cur.next
    end
    cur.leaf = "here"
    local back = roundtrip(t)
    local depth = 0
    while back.next do back = back.next; depth = depth + 1 end
    assert.equal(20000, depth)
    assert.equal("here", back.leaf)
  end)
  it("drop metatables", function()
    local t = setmetatable({ x = 1 }, { __index = function() return "meta" end })
    local back = result_of(t)
    assert.is_nil(getmetatable(back))
    assert.is_nil(back.y)
    assert.equal(1, back.x)
  end)
end)

describe("values that cannot travel", function()
  it("name their kind and place", function()
    local cases = {
      { print, "result of item 1: cannot send a function" },
      { { coroutine.create(print) }, "result of item 1: cannot send a thread at [1]" },
      { { a = { ["b c"] = io.stdout } }, 'result of item 1: cannot send a FILE* at .a["b c"]' },
      { { [print] = 1 }, "result of item 1: cannot send a function (as a key)" },
    }
    for _, case in ipairs(cases) do
      local got
      for _, r in parmap.parmap(function() return case[1] end, { 1 },
        { N = 2, exception = "return" }) do got = r end
      assert.is_true(parmap.iserror(got))
      assert.equal(case[2]:gsub("FILE%*", "userdata"), got.message)
    end
  end)
end)
