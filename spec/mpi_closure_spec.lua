-- Closures by value (the MPI backend): parmap.core.dumpfn(f)
-- turns a function into bytes, parmap.core.loadfn(s) turns them back into
-- a function in ANOTHER, fresh Lua state (a remote rank inherits nothing).
-- Every round trip here runs the sender and the receiver in two separate
-- lua5.4 processes and compares what the function returns on each side.
local H = require "helpers"
local core = require "parmap.core"

-- local show(...): the values as one line (tables by their sorted fields).
local SHOW = [[
local function show(...)
  local out = {}
  for i = 1, select("#", ...) do
    local v = select(i, ...)
    if type(v) == "table" then
      local keys = {}
      for k in pairs(v) do keys[#keys + 1] = tostring(k) end
      table.sort(keys)
      v = "{" .. table.concat(keys, ",") .. "}"
    end
    out[#out + 1] = tostring(v)
  end
  return table.concat(out, " ")
end
]]

-- build: a chunk that returns the function (run in the sender);
-- call: the body of function(f) ... end run on both sides after the
-- transfer. Returns what the sender's and the receiver's call printed.
local function roundtrip(build, call)
  local path = os.tmpname()
  local sender = SHOW .. string.format([[
local core = require "parmap.core"
local f = (function() %s end)()
local s = core.dumpfn(f)
local fh = assert(io.open(%q, "wb"))
fh:write(s)
fh:close()
local ok, err = pcall(function() print(show((function(f) %s end)(f))) end)
if not ok then print("error: " .. tostring(err)) end
]], build, path, call)
  local receiver = SHOW .. string.format([[
local core = require "parmap.core"
local fh = assert(io.open(%q, "rb"))
local s = fh:read("a")
fh:close()
local f = core.loadfn(s)
local ok, err = pcall(function() print(show((function(f) %s end)(f))) end)
if not ok then print("error: " .. tostring(err)) end
]], path, call)
  local sent, code = H.run_lua(sender)
  assert(code == 0, sent)
  local got, code2 = H.run_lua(receiver)
  os.remove(path)
  assert(code2 == 0, got)
  return sent, got
end

-- Both sides print `expected`.
local function same(expected, build, call)
  local sent, got = roundtrip(build, call)
  assert.are.equal(expected .. "\n", sent)
  assert.are.equal(expected .. "\n", got)
end

-- A function made in the real global environment (busted gives the spec's
-- functions an environment of its own).
local function fn(src)
  return assert(load(src, "=closure", "t", _G))()
end

describe("closures by value", function()
  it("a plain function", function()
    same("12 nil", [[return function(a, b) return a * b end]],
      [[return f(3, 4), f(3, 4) == nil and 1 or nil]])
  end)

  it("upvalues of every scalar type", function()
    same("nil true false 42 -7 2.5 inf -inf nan? text 9223372036854775807",
      [[local a, b, c, d, e, g = nil, true, false, 42, -7, 2.5
        local h, i, s, m = math.huge, -math.huge, "text", math.maxinteger
        local nan = 0/0
        return function()
          return a, b, c, d, e, g, h, i, nan ~= nan and "nan?" or "no", s, m
        end]],
      [[return f()]])
  end)

  it("keeps integers integers and floats floats", function()
    same("integer float", [[local i, x = 3, 3.0
      return function() return math.type(i), math.type(x) end]],
      [[return f()]])
  end)

  it("a table upvalue, with nested tables", function()
    same("2 b {1,2,3.5,x} 10", [[local t = {1, 2, x = {y = "b"}, [3.5] = 10}
      return function() return #t, t.x.y, t, t[3.5] end]],
      [[return f()]])
  end)

  it("a table shared by two closures stays one table", function()
    same("true 1", [[local t = {}
      local function a() return t end
      local function b() t.n = (t.n or 0) + 1; return t end
      return function() return a, b end]],
      [[local a, b = f(); b(); return rawequal(a(), b()), a().n - 1]])
  end)

  it("an upvalue shared by two closures stays shared (a counter pair)",
    function()
      same("3 3", [[local n = 0
        local function inc() n = n + 1 end
        local function get() return n end
        return function() return inc, get end]],
        [[local inc, get = f(); inc(); inc(); inc()
          local inc2, get2 = f() -- the same pair: still the same n
          return get(), get2()]])
    end)

  it("a recursive local function", function()
    same("120", [[local function fact(n) return n <= 1 and 1 or n * fact(n - 1) end
      return fact]], [[return f(5)]])
  end)

  it("mutually recursive functions", function()
    same("true false", [[local is_even, is_odd
      function is_even(n) if n == 0 then return true end return is_odd(n - 1) end
      function is_odd(n) if n == 0 then return false end return is_even(n - 1) end
      return is_even]], [[return f(10), f(7)]])
  end)

  it("cycles through tables (a table that holds itself and a closure over it)",
    function()
      same("true true 7", [[local t = {v = 7}
        t.self = t
        t.get = function() return t.v end
        return function() return t end]],
        [[local t = f(); return t.self == t, t.self.self == t, t.get()]])
    end)

  it("metatables travel with their tables", function()
    same("hello 5", [[local Class = {}
      Class.__index = Class
      function Class.greet() return "hello" end
      local obj = setmetatable({x = 5}, Class)
      return function() return obj:greet(), obj.x end]],
      [[return f()]])
  end)

  it("globals the code reads travel by value: a table and a function",
    function()
      same("21 b", [[CONFIG = {k = 20, name = "b"}
        function helper(x) return x + 1 end
        return function() return helper(CONFIG.k), CONFIG.name end]],
        [[return f()]])
    end)

  it("globals the code does not read stay behind", function()
    local sent, got = roundtrip([[UNUSED = {big = true}; USED = 1
      return function() return USED end]],
      [[return f(), rawget(_G, "UNUSED") ~= nil]])
    assert.are.equal("1 true\n", sent)
    assert.are.equal("1 false\n", got)
  end)

  it("globals read by nested functions and by global functions travel too",
    function()
      same("30", [[BASE = 10
        function add(x) return x + OFFSET end
        OFFSET = 5
        return function(x)
          local inner = function() return add(BASE) end
          return inner() + x - 0
        end]], [[return f(15)]])
    end)

  it("standard library functions travel by name (string.format, print)",
    function()
      same("00042 true true", [[local fmt = string.format
        return function(x) return fmt("%05d", x), type(print) == "function",
          fmt == string.format end]],
        [[local a, b, c = f(42); return a, b, c]])
    end)

  it("a module of the repo travels by name: parmap.None keeps its identity",
    function()
      same("true", [[local parmap = require "parmap"
        local None = parmap.None
        return function() return None == package.loaded.parmap.None end]],
        [[return f()]])
    end)

  it("a module found on package.path travels by name, package.path with it",
    function()
      local dir = os.tmpname()
      os.remove(dir)
      assert(os.execute("mkdir " .. dir))
      local fh = assert(io.open(dir .. "/mpig_testmod.lua", "w"))
      fh:write("return { twice = function(x) return 2 * x end }\n")
      fh:close()
      finally(function() os.execute("rm -rf " .. dir) end)
      same("42 true", string.format([[package.path = %q .. ";" .. package.path
        local twice = require("mpig_testmod").twice
        return function(x) return twice(x) end]], dir .. "/?.lua"),
        [[return f(21), package.loaded.mpig_testmod ~= nil]])
    end)

  it("a function that fails still fails, with its source line", function()
    same("false true", [[return function(x) error("boom " .. x) end]],
      [[local ok, e = pcall(f, 3); return ok, e:match(":%d+: boom 3$") ~= nil]])
  end)
end)

describe("closures by value refuse what cannot travel", function()
  it("an open file: names the upvalue", function()
    local f = fn([[local fh = io.stdout; return function() return fh end]])
    local ok, err = pcall(core.dumpfn, f)
    assert.is_false(ok)
    assert.matches("upvalue 'fh' of fn: cannot send a FILE%*; open it in init",
      err)
  end)

  it("an open file deep in a table: names the whole path", function()
    local f = fn([[local cfg = {log = {out = io.stderr}}
      return function() return cfg end]])
    local ok, err = pcall(core.dumpfn, f, "init")
    assert.is_false(ok)
    assert.matches("field 'out' of field 'log' of upvalue 'cfg' of init: "
      .. "cannot send a FILE%*", err)
  end)

  it("an open file in a global the code reads: names the global", function()
    local f = fn([[MPIG_LOG = io.stdout
      return function() return MPIG_LOG end]])
    finally(function() MPIG_LOG = nil end)
    local ok, err = pcall(core.dumpfn, f)
    assert.is_false(ok)
    assert.matches("global 'MPIG_LOG' read by fn: cannot send a FILE%*", err)
  end)

  it("a coroutine", function()
    local f = fn([[local co = coroutine.create(function() end)
      return function() return co end]])
    local ok, err = pcall(core.dumpfn, f)
    assert.is_false(ok)
    assert.matches("upvalue 'co' of fn: cannot send a coroutine", err)
  end)

  it("a C function that no loaded module holds", function()
    local f = fn([[local it = ("abc"):gmatch(".")
      return function() return it() end]])
    local ok, err = pcall(core.dumpfn, f)
    assert.is_false(ok)
    assert.matches("upvalue 'it' of fn: cannot send a C function that is in "
      .. "no loaded module", err)
  end)

  it("a C function root that no loaded module holds", function()
    local ok, err = pcall(core.dumpfn, ("x"):gmatch("."))
    assert.is_false(ok)
    assert.matches("^fn: cannot send a C function", err)
  end)

  it("a value that is not a function", function()
    local ok, err = pcall(core.dumpfn, {})
    assert.is_false(ok)
    assert.matches("function expected", err)
  end)
end)

describe("closure records from outside are checked", function()
  local good
  setup(function()
    good = core.dumpfn(fn([[local t = {1, {2}}; local n = 4
      local function g() return n end
      return function() return g() + #t, t end]]))
  end)

  it("a record decodes in the same state too", function()
    local f = core.loadfn(good)
    assert.are.equal(6, (f()))
  end)

  it("every truncation is a clean error", function()
    for k = 0, #good - 1 do
      local ok, err = pcall(core.loadfn, good:sub(1, k))
      assert.is_false(ok)
      assert.matches("parmap: bad closure record", err)
    end
  end)

  it("bytes after the end are refused", function()
    local ok, err = pcall(core.loadfn, good .. "\0")
    assert.is_false(ok)
    assert.matches("bytes after the end", err)
  end)

  it("a reference to an unknown object, a bad tag, a bad join", function()
    local path = "\0\0" -- empty package.path and cpath
    for _, rec in ipairs {
      "PMFN\1" .. path .. "\8\5",   -- V_REF 5 before any object
      "PMFN\1" .. path .. "\99",    -- an unknown tag
      "PMFN\1" .. path .. "\6\0",   -- a table as the root
    } do
      local ok, err = pcall(core.loadfn, rec)
      assert.is_false(ok)
      assert.matches("parmap: bad closure record", err)
    end
    -- a function whose upvalue claims to join an upvalue of a table
    local f = fn([[local a = {}; return function() return a end]])
    local s = core.dumpfn(f)
    -- S_BODY of object 1 (the function): 1 upvalue, U_VAL ...
    local at
    for i = #s - 4, 1, -1 do
      if s:sub(i, i + 4) == "\1\1\0\6\0" then at = i; break end
    end
    assert.truthy(at)
    local bad = s:sub(1, at + 1) .. "\1\2\1" .. s:sub(at + 5)
    local ok, err = pcall(core.loadfn, bad)
    assert.is_false(ok)
    assert.matches("parmap: bad closure record", err)
  end)
end)

describe("closure records: upvalue joins are checked", function()
  -- f's body: S_BODY, 2 upvalues, U_VAL V_TNEW 0 (a = {}), U_VAL V_INT 2 (b = 1)
  local function with_join(join)
    local f = fn([[local a, b = {}, 1; return function() return a, b end]])
    local s = core.dumpfn(f)
    local at
    for i = #s - 7, 1, -1 do
      if s:sub(i, i + 7) == "\1\2\0\6\0\0\3\2" then at = i; break end
    end
    assert.truthy(at)
    return s:sub(1, at + 4) .. join .. s:sub(at + 8)
  end

  it("a join with a table's upvalue is refused", function()
    local ok, err = pcall(core.loadfn, with_join("\1\2\1"))
    assert.is_false(ok)
    assert.matches("join with a bad upvalue", err)
  end)

  it("a join with an upvalue past the function's last is refused", function()
    local ok, err = pcall(core.loadfn, with_join("\1\1\9"))
    assert.is_false(ok)
    assert.matches("join with a bad upvalue", err)
  end)

  it("a valid join shares the upvalue", function()
    local g = core.loadfn(with_join("\1\1\1"))
    local a, b = g()
    assert.are.equal(a, b) -- b is now a's upvalue: the same table
    assert.are.equal("table", type(b))
  end)
end)

describe("the backend option", function()
  local parmap = require "parmap"

  it("is 'auto', 'fork' or 'mpi'", function()
    local ok, err = pcall(parmap.map, function(x) return x end, {1}, { backend = "ssh" })
    assert.is_false(ok)
    assert.matches([[bad option 'backend' %('auto', 'fork' or 'mpi' expected, got string "ssh"%)]], err)
  end)

  it("resilient is a boolean (it matters only to the MPI backend)", function()
    local ok, err = pcall(parmap.map, function(x) return x end, {1}, { resilient = 1 })
    assert.is_false(ok)
    assert.matches("bad option 'resilient' %(boolean expected", err)
    assert.are.same({1}, parmap.map(function(x) return x end, {1}, { resilient = true, N = 2 }))
  end)

  it("'auto' and 'fork' run on forked workers outside parmap-mpi", function()
    for _, b in ipairs { "auto", "fork" } do
      local r = parmap.map(function(x) return x * 2 end, {1, 2, 3}, { backend = b, N = 2 })
      assert.are.same({2, 4, 6}, r)
    end
  end)

  it("'mpi' outside parmap-mpi is an error saying how to start the script", function()
    local ok, err = pcall(parmap.map, function(x) return x end, {1}, { backend = "mpi" })
    assert.is_false(ok)
    assert.matches("backend 'mpi' needs the script to run under parmap%-mpi", err)
  end)
end)

describe("parmap in an MPI job not started by parmap-mpi", function()
  local function run(env, pre)
    local path = H.script((pre or "") .. 'local parmap = require "parmap"; print("ran")\n')
    local p = io.popen(env .. " " .. H.lua_cmd(path) .. " 2>&1")
    local out = p:read("a")
    p:close()
    os.remove(path)
    return out
  end

  it("refuses to load when the job has several processes (no accidental SPMD)", function()
    for _, var in ipairs { "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS" } do
      local out = run("env -u PARMAP_MPI " .. var .. "=4")
      assert.matches("one of 4 processes of an MPI job", out)
      assert.matches("mpirun %-n K parmap%-mpi script.lua", out)
      assert.not_matches("ran", out)
    end
  end)

  it("loads in a job of one process, and under parmap-mpi", function()
    assert.are.equal("ran\n", run("env -u PARMAP_MPI OMPI_COMM_WORLD_SIZE=1"))
    assert.are.equal("ran\n", run("env PARMAP_MPI=1 OMPI_COMM_WORLD_SIZE=4"))
  end)

  it("loads in a Slurm batch script run directly: SLURM_NTASKS counts the "
    .. "job's tasks, not the processes of this step", function()
    assert.are.equal("ran\n", run("env -u PARMAP_MPI -u SLURM_STEP_NUM_TASKS "
      .. "SLURM_JOB_ID=7 SLURM_NTASKS=3 SLURM_NPROCS=3"))
  end)

  -- parmap-mpi preloads parmap.mpi; here a stand-in gives MPI's job size
  local function mpi_of(size)
    return string.format('package.loaded["parmap.mpi"] = {size = function() '
      .. 'return %d end}\n', size)
  end

  it("refuses parmap-mpi started K times as K jobs of one (srun without "
    .. "the MPI's --mpi plugin), naming the plugins", function()
    for _, var in ipairs { "SLURM_STEP_NUM_TASKS", "PMI_SIZE" } do
      local out = run("env PARMAP_MPI=1 " .. var .. "=3", mpi_of(1))
      assert.matches("parmap%-mpi runs as one of 3 processes, but MPI sees "
        .. "a job of 1", out)
      assert.matches("srun %-%-mpi=pmix for Open MPI, %-%-mpi=pmi2 for MPICH", out)
      assert.not_matches("ran", out)
    end
  end)

  it("loads under parmap-mpi when MPI sees the launcher's processes, or "
    .. "when there is no launcher", function()
    assert.are.equal("ran\n", run("env PARMAP_MPI=1 SLURM_STEP_NUM_TASKS=3", mpi_of(3)))
    assert.are.equal("ran\n", run("env -u SLURM_STEP_NUM_TASKS -u OMPI_COMM_WORLD_SIZE "
      .. "-u PMI_SIZE -u PMIX_SIZE PARMAP_MPI=1", mpi_of(1)))
  end)
end)
