-- Bad inputs and options, one row each: the call (on one line), and the
-- message it must raise. Every message starts with the caller's file:line
-- (the line of the call) and "parmap", and names the argument or option.
local parmap = require "parmap"
local H = require "helpers"

local function id(x) return x end
local function iter(n)
  local i = 0
  return function() i = i + 1; if i <= n then return i end end
end
local function len(v) return setmetatable({}, { __len = function() return v end }) end
local PE = parmap.ParEval(id, { N = 1 })
local P = parmap.ReturnProcess(id)

-- { what, call (one line), plain text the message must contain }
local ROWS = {
  -- items: sequences only, lengths checked
  { "a table with keys but no sequence part",
    function() local r = parmap.map(id, { a = 1, b = 2 }); return r end,
    "bad argument #2 'items' (not a sequence: #items is 0 but it has other keys; to map over its keys or values, collect them into a list first)" },
  { "a table with a hole at 1",
    function() local r = parmap.map(id, { [2] = 1 }); return r end, "'items' (not a sequence" },
  { "ipairs(t) as items", function() local r = parmap.map(id, ipairs({ 1, 2 })); return r end,
    "bad argument #2 'items' (an iterator triple: pass the table itself (or an items function), not ipairs(t) or pairs(t))" },
  { "pairs(t) as items", function() local r = parmap.map(id, pairs({ 1, 2 })); return r end,
    "'items' (an iterator triple" },
  { "pairs(t) as items of a loop", function() local f = parmap.parmap(id, pairs({ a = 1 })); return f end,
    "'items' (an iterator triple" },
  { "next as items", function() local r = parmap.map(id, next, {}); return r end,
    "'items' (an iterator triple" },
  { "items.n not an integer", function() local r = parmap.map(id, { n = 2.5 }); return r end,
    "bad argument #2 'items' (items.n must be a non-negative integer, got 2.5)" },
  { "items.n a numeric string", function() local r = parmap.map(id, { n = "2" }); return r end,
    "items.n must be a non-negative integer, got string \"2\"" },
  { "items.n negative", function() local r = parmap.map(id, { n = -1 }); return r end,
    "items.n must be a non-negative integer, got -1" },
  { "__len giving 2.5", function() local r = parmap.map(id, len(2.5), { N = 2 }); return r end,
    "bad argument #2 'items' (#items returned 2.5 (its __len), not a non-negative integer)" },
  { "__len giving nil", function() local r = parmap.map(id, len(nil), { N = 1 }); return r end,
    "#items returned nil (its __len)" },
  { "__len giving a string", function() local r = parmap.map(id, len("3")); return r end,
    "#items returned string \"3\" (its __len)" },
  { "__len giving -1", function() local r = parmap.map(id, len(-1)); return r end,
    "#items returned -1 (its __len)" },
  -- numbers are numbers: no string coercion, the type shown
  { "N a numeric string", function() local r = parmap.map(id, {}, { N = "4" }); return r end,
    "bad option 'N' (positive integer expected, got string \"4\")" },
  { "N 0", function() local r = parmap.map(id, {}, { N = 0 }); return r end,
    "bad option 'N' (positive integer expected, got 0)" },
  { "N nan", function() local r = parmap.map(id, {}, { N = 0 / 0 }); return r end,
    "bad option 'N' (positive integer expected, got nan)" },
  { "N inf", function() local r = parmap.map(id, {}, { N = math.huge }); return r end,
    "bad option 'N' (positive integer expected, got inf)" },
  { "N a table", function() local r = parmap.map(id, {}, { N = {} }); return r end,
    "bad option 'N' (positive integer expected, got table)" },
  { "timeout a numeric string", function() local r = parmap.map(id, {}, { timeout = "5" }); return r end,
    "bad option 'timeout' (positive number of seconds expected, got string \"5\")" },
  { "timeout nan", function() local r = parmap.map(id, {}, { timeout = 0 / 0 }); return r end,
    "bad option 'timeout' (positive number of seconds expected, got nan)" },
  { "timeout -inf", function() local r = parmap.map(id, {}, { timeout = -math.huge }); return r end,
    "bad option 'timeout' (positive number of seconds expected, got -inf)" },
  { "chunksize a string", function() local r = parmap.map(id, {}, { chunksize = "2" }); return r end,
    "bad option 'chunksize' (positive integer or -1 expected, got string \"2\")" },
  { "chunksize -2", function() local r = parmap.map(id, {}, { chunksize = -2 }); return r end,
    "bad option 'chunksize' (positive integer or -1 expected, got -2)" },
  { "total a string", function() local r = parmap.map(id, iter(0), { total = "3" }); return r end,
    "bad option 'total' (non-negative integer expected, got string \"3\")" },
  { "total 1.5", function() local r = parmap.map(id, iter(0), { total = 1.5 }); return r end,
    "bad option 'total' (non-negative integer expected, got 1.5)" },
  { "args.n a string", function() local r = parmap.map(id, {}, { args = { n = "1" } }); return r end,
    "bad option 'args.n' (non-negative integer expected, got string \"1\")" },
  { "args.n past MAX_ARGS", function() local r = parmap.map(id, {}, { args = { n = 1e6 // 1 } }); return r end,
    "bad option 'args.n' (at most 100000 arguments, got 1000000)" },
  { "retries past MAX_RETRIES", function() local r = parmap.map(id, {}, { retries = 1 << 40 }); return r end,
    "bad option 'retries' (integer from 0 to 10000 expected, got 1099511627776)" },
  { "args' __len giving 0.5", function() local r = parmap.map(id, {}, { args = len(0.5) }); return r end,
    "bad option 'args' (#args returned 0.5 (its __len), not a non-negative integer)" },
  -- unknown options: the closest name
  { "a typo", function() local r = parmap.map(id, {}, { progres = true }); return r end,
    "unknown option 'progres' (did you mean 'progress'?)" },
  { "another case", function() local r = parmap.map(id, {}, { n = 2 }); return r end,
    "unknown option 'n' (did you mean 'N'?)" },
  { "snake case", function() local r = parmap.map(id, {}, { chunk_size = 2 }); return r end,
    "unknown option 'chunk_size' (did you mean 'chunksize'?)" },
  { "nothing close", function() local r = parmap.map(id, {}, { verbose = true }); return r end,
    "unknown option 'verbose'" },
  { "a positional option", function() local r = parmap.map(id, {}, { 4 }); return r end,
    "unknown option 1 (options are named, as in {N = 4})" },
  -- every entry point blames its caller's line
  { "parmap(...) as a function", function() local f = parmap(42, {}); return f end,
    "parmap: bad argument #1 'fn' (function expected, got number)" },
  { "parmap(...) in a for", function() for _ in parmap(42, {}) do end end,
    "parmap: bad argument #1 'fn' (function expected, got number)" },
  { "parmap.parmap", function() local f = parmap.parmap(id, 5); return f end,
    "parmap: bad argument #2 'items'" },
  { "parmap.imap", function() local f = parmap.imap(id, {}, { N = -1 }); return f end,
    "parmap: bad option 'N'" },
  -- ReturnProcess
  { "ReturnProcess: a typo", function() local p = parmap.ReturnProcess(id, { arg = {} }); return p end,
    "parmap.ReturnProcess: unknown option 'arg' (did you mean 'args'?)" },
  { "ReturnProcess: args.n a string",
    function() local p = parmap.ReturnProcess(id, { args = { n = "2" } }); return p end,
    "parmap.ReturnProcess: bad option 'args.n' (non-negative integer expected, got string \"2\")" },
  { "ReturnProcess: exception a number",
    function() local p = parmap.ReturnProcess(id, { exception = 1 }); return p end,
    "parmap.ReturnProcess: bad option 'exception' ('raise', 'return' or 'proc' expected, got 1)" },
  -- ParEval
  { "ParEval: n_chunks a string", function() local p = parmap.ParEval(id, { n_chunks = "2" }); return p end,
    "parmap.ParEval: bad option 'n_chunks' (positive integer expected, got string \"2\")" },
  { "ParEval: n_min -1", function() local p = parmap.ParEval(id, { n_min = -1 }); return p end,
    "parmap.ParEval: bad option 'n_min' (non-negative integer expected, got -1)" },
  { "ParEval: a typo", function() local p = parmap.ParEval(id, { n_chunk = 2 }); return p end,
    "parmap.ParEval: unknown option 'n_chunk' (did you mean 'n_chunks'?)" },
  { "ParEval: a typo of a map option", function() local p = parmap.ParEval(id, { Progress = true }); return p end,
    "parmap.ParEval: unknown option 'Progress' (did you mean 'progress'?)" },
  { "ParEval: a map option checked", function() local p = parmap.ParEval(id, { N = "2" }); return p end,
    "parmap: bad option 'N' (positive integer expected, got string \"2\")" },
  { "ParEval: X from ipairs", function() local y = PE(ipairs({ 1 })); return y end,
    "parmap.ParEval: bad argument #1 'X' (an iterator triple" },
  { "ParEval: X's __len", function() local y = PE(len(1.5)); return y end,
    "parmap.ParEval: bad argument #1 'X' (#X returned 1.5 (its __len), not a non-negative integer)" },
  { "ParEval: X.n a string", function() local y = PE({ n = "1" }); return y end,
    "parmap.ParEval: bad argument #1 'X' (X.n must be a non-negative integer, got string \"1\")" },
  { "ParEval: X not a sequence", function() local y = PE({ a = 1 }); return y end,
    "parmap.ParEval: bad argument #1 'X' (not a sequence: #X is 0 but it has other keys" },
  { "ParEval: bounds(n) a string", function() local b = PE:bounds("3"); return b end,
    "parmap.ParEval: bad argument #1 'n' (non-negative integer expected, got string \"3\")" },
  -- values
  { "values: not an iterator", function() local g = parmap.values(42); return g end,
    "parmap.values: bad argument #1 (iterator function expected, got number)" },
  -- ReturnProcess methods (C): caller's line and the state
  { "join before start", function() local r = P:join(); return r end,
    "parmap: ReturnProcess: join before start" },
}

describe("bad inputs and options (one row each)", function()
  for _, row in ipairs(ROWS) do
    local what, call, text = row[1], row[2], row[3]
    it(what, function()
      local ok, err = pcall(call)
      assert.is_false(ok, "no error")
      assert.is_string(err)
      local line = debug.getinfo(call, "S").linedefined
      local head = "options_spec.lua:" .. line .. ": parmap"
      assert.is_truthy(err:find(head, 1, true),
        "expected the message to start at the call's line " .. line .. ": " .. err)
      assert.is_truthy(err:find(text, 1, true), "expected '" .. text .. "' in: " .. err)
    end)
  end
end)

describe("inputs and options that are valid", function()
  it("an empty table, {n = 0} and {n = 3} (three nils) are sequences", function()
    assert.same({ {}, 0 }, { parmap.map(id, {}) })
    assert.same({ {}, 0 }, { parmap.map(id, { n = 0 }) })
    local calls = 0
    local _, n = parmap.map(function() calls = calls + 1 end, { n = 3 }, { N = 1 })
    assert.equal(3, n)
    assert.equal(3, calls)
  end)
  it("a table whose __len gives its length maps that many items", function()
    local t = setmetatable({}, { __len = function() return 2 end, __index = function(_, i) return type(i) == "number" and i * 10 or nil end })
    assert.same({ 10, 20 }, (parmap.map(id, t, { N = 1 })))
  end)
  it("integer-valued floats count as integers", function()
    assert.same({ 1, 2 }, (parmap.map(id, { 1, 2 }, { N = 2.0, chunksize = 1.0 })))
    assert.same({ 1, 2 }, (parmap.map(id, { 1, 2, n = 2.0 }, { N = 1 })))
  end)
  it("timeout = math.huge is no timeout (N = 1 then runs in this process)", function()
    local pid = require("parmap.core").pid()
    local got = parmap.map(function() return require("parmap.core").pid() end, { 1 },
      { N = 1, timeout = math.huge })
    assert.equal(pid, got[1])
  end)
  it("args.n up to MAX_ARGS reaches the function", function()
    local got = parmap.map(function(_, ...) return select("#", ...) end, { 1 },
      { N = 1, args = { n = parmap.MAX_ARGS } })
    assert.equal(parmap.MAX_ARGS, got[1])
  end)
  it("ParEval with a huge n_eval makes one chunk (no overflow)", function()
    local pe = parmap.ParEval(id, { N = 1, n_eval = math.maxinteger })
    assert.same({ { 1, 3 } }, pe:bounds(3))
    assert.same({ 1, 2, 3 }, pe({ 1, 2, 3 }))
  end)
  it("io.lines and other iterators that return more values are items functions", function()
    local path = H.script("a\nb\n")
    local got = parmap.map(id, io.lines(path), { N = 1 })
    os.remove(path)
    assert.same({ "a", "b" }, got)
  end)
  it("chunksize = -1 without a known total warns once and chunks automatically", function()
    local out, code = H.run_lua([[
      local parmap = require "parmap"
      local i = 0
      local r, n = parmap.map(function(x) return x * 2 end,
        function() i = i + 1; if i <= 5 then return i end end, { N = 2, chunksize = -1 })
      print(n, r[1], r[5])
    ]])
    assert.equal(0, code)
    assert.equal("parmap: chunksize = -1 needs a known total; using automatic chunking\n5\t2\t10\n", out)
  end)
end)
