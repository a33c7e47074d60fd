-- The MPI backend keeps the fork backend's promises: buffersize bounds
-- what rank 0 pulls ahead of the loop, an iterator's total reaches
-- progress, the globals fn reads are the ones rank 0 has (and do not
-- outlive the map on the agents), and refusals name the caller's line and
-- the value's place. Scripts run under mpirun -n 3 parmap-mpi, as in
-- spec/mpi_backend_spec.lua (spec/mpi_helpers.lua); pending without it.
local H = require "helpers"
local MH = require "mpi_helpers"
local mpirun = MH.mpirun
local describe_mpi = MH.describer(describe, pending)

describe_mpi("the MPI backend keeps the fork backend's options", function()
  it("buffersize bounds the items pulled and not yet taken by the loop",
    function()
      local out, code = mpirun([[
local parmap = require "parmap"
for _, ordered in ipairs {true, false} do
  local pulled, n, worst = 0, 0, 0
  local function it() pulled = pulled + 1; return pulled end
  for i in parmap(function(x) return x end, it,
      {buffersize = 10, N = 2, ordered = ordered, backend = "mpi"}) do
    n = n + 1
    if pulled - n > worst then worst = pulled - n end
    -- time for agents that are not held back to run far ahead
    if n == 1 then os.execute("sleep 1") end
    if n == 5 then break end
  end
  print("ahead", ordered, worst, pulled)
end
-- down to buffersize = 1, every index once, both orders; with seed the
-- agents take the items boxed with their index, through another path
for _, ordered in ipairs {true, false} do
  for _, b in ipairs {1, 3} do
    local bad = 0
    for _, seed in ipairs {false, 5} do
      local k, n, seen = 0, 0, {}
      for i, r in parmap(function(x) return x * 2 end,
          function() k = k + 1; if k <= 300 then return k end end,
          {buffersize = b, ordered = ordered, backend = "mpi", seed = seed or nil}) do
        n = n + 1 -- k counts the iterator's calls, its last nil too
        if seen[i] or r ~= 2 * i or k - n > b + 1 then bad = bad + 1 end
        seen[i] = true
      end
      for i = 1, 300 do if not seen[i] then bad = bad + 1 end end
    end
    print("small", ordered, b, bad)
  end
end
]])
      assert.are.equal(0, code, out)
      for _, o in ipairs { "true", "false" } do
        local worst, pulled = out:match("ahead\t" .. o .. "\t(%d+)\t(%d+)")
        assert.is_truthy(worst, out)
        assert.is_true(tonumber(worst) <= 10, out)
        assert.is_true(tonumber(pulled) <= 15, out)
        for _, b in ipairs { 1, 3 } do
          assert.matches("small\t" .. o .. "\t" .. b .. "\t0\n", out, 1, true)
        end
      end
    end)

  it("gives progress an iterator's total, as the fork backend does", function()
    local out, code = mpirun([[
local parmap = require "parmap"
for _, backend in ipairs {"fork", "mpi"} do
  local k, totals = 0, {}
  for _ in parmap(function(x) return x end,
      function() k = k + 1; if k <= 8 then return k end end,
      {total = 8, backend = backend,
       progress = function(done, total) totals[#totals + 1] = tostring(total) end}) do
  end
  print(backend, table.concat(totals, ","))
end
]])
    assert.are.equal(0, code, out)
    local fork = out:match("fork\t([^\n]*)")
    assert.matches("^8[8,]*$", fork)
    assert.matches("^8[8,]*$", out:match("mpi\t([^\n]*)")) -- progress is paced
  end)
end)

describe_mpi("the MPI backend's globals", function()
  it("are rank 0's at each map, nil included, and do not outlive it",
    function()
      local out, code = mpirun([[
local parmap = require "parmap"
local function one(f) return parmap.map(f, {1}, {backend = "mpi"})[1] end
G1 = 5
print("set", one(function() return G1 end))
G1 = nil
print("unset", one(function() return G1 end))
G2 = 6
print("read", one(function() return G2 end))
-- a later map that does not read G2 statically finds the agent's own _G
print("left", tostring(one(function() return rawget(_G, "G2") end)))
-- the agent's driver does not run on the script's globals
math = {floor = math.floor}
print("math", one(function(x) return math.floor(x + 0.5) end),
  parmap.map(function(x) return math.floor(x + 0.5) end, {1.5},
    {backend = "mpi", seed = 3})[1])
]])
      assert.are.equal(0, code, out)
      assert.matches("set\t5\n", out, 1, true)
      assert.matches("unset\tnil\n", out, 1, true)
      assert.matches("read\t6\n", out, 1, true)
      assert.matches("left\tnil\n", out, 1, true)
      assert.matches("math\t1\t2\n", out, 1, true)
    end)

  it("are read through _G.k and through a sandbox _ENV whose __index is _G",
    function()
      local out, code = mpirun([[
local parmap = require "parmap"
CONFIG = {k = 7}
local function both(name, f)
  local a = parmap.map(f, {1}, {backend = "fork"})[1]
  local b = parmap.map(f, {1}, {backend = "mpi"})[1]
  print(name, a, b)
end
both("static", function() return _G.CONFIG.k end)
both("call", function() return tostring(_G.CONFIG.k) end)
local sandbox = setmetatable({}, {__index = _G})
both("sandbox", load("return function() return CONFIG.k end", "=sb", "t", sandbox)())
local own = setmetatable({}, {__index = _G})
own._G = own
both("own _G", load("return function() return _G.CONFIG.k end", "=sb", "t", own)())
local two = setmetatable({LOCALV = 1}, {__index = setmetatable({}, {__index = _G})})
both("chain", load("return function() return CONFIG.k + LOCALV end", "=sb", "t", two)())
]])
      assert.are.equal(0, code, out)
      assert.matches("static\t7\t7\n", out, 1, true)
      assert.matches("call\t7\t7\n", out, 1, true)
      assert.matches("sandbox\t7\t7\n", out, 1, true)
      assert.matches("own _G\t7\t7\n", out, 1, true)
      assert.matches("chain\t8\t8\n", out, 1, true)
    end)
end)

describe_mpi("the MPI backend's refusals", function()
  it("name the caller's line and the place of an args or kwargs value",
    function()
      local out, code = mpirun([[
local parmap = require "parmap"
local function try(opts)
  local ok, err = pcall(function()
    local r = parmap.map(function(x) return x end, {1}, opts) -- line 4
    return r
  end)
  print(ok, err)
end
try({args = {1, io.stdout}, backend = "mpi"})
try({kwargs = {db = {h = io.stdout}}, backend = "mpi"})
try({args = {1, {2, {print}}}, backend = "mpi"})
]])
      assert.are.equal(0, code, out)
      local lines = {}
      for l in out:gmatch("false\t([^\n]*)") do lines[#lines + 1] = l end
      assert.are.equal(3, #lines, out)
      for _, l in ipairs(lines) do
        assert.matches("^[^\n]*:4: parmap: bad option '%a+'", l)
      end
      assert.matches("cannot send a userdata at args[2]", lines[1], 1, true)
      assert.matches("cannot send a userdata at kwargs.db.h", lines[2], 1, true)
      assert.matches("cannot send a function at args[2][2][1]", lines[3], 1, true)
    end)

  it("name the caller's line for a second MPI map while one is open", function()
    local out, code = mpirun([[
local parmap = require "parmap"
local f, s = parmap.parmap(function(x) return x end, {1, 2, 3}, {backend = "mpi"})
local ok, err = pcall(function()
  local r = parmap.map(function(x) return x end, {1}, {backend = "mpi"}) -- line 4
  return r
end)
print(ok, err)
print("first", f(s))
]])
    assert.are.equal(0, code, out)
    assert.matches("false\t[^\n]*:4: parmap: backend 'mpi' runs one map at a time", out)
    assert.matches("first\t1\t1\n", out, 1, true)
  end)

  it("name a module the agents cannot load once, with require's reason and the rank",
    function()
      local out, code = mpirun([[
local parmap = require "parmap"
package.preload.fakemod = function() return {f = function() return 1 end} end
local fm = require "fakemod"
local ok, err = pcall(parmap.map, function() return fm.f() end, {1}, {backend = "mpi"})
print(ok)
print(err)
print("next map", parmap.map(function(x) return x end, {4}, {backend = "mpi"})[1])
]])
      assert.are.equal(0, code, out)
      assert.matches("\nfalse\n", "\n" .. out, 1, true)
      assert.matches("parmap: the map failed on rank %d %(.-%): the function needs "
        .. "module 'fakemod', which does not load %(module 'fakemod' not found:", out)
      local _, n = out:gsub("fakemod' not found", "")
      assert.are.equal(1, n, out)
      assert.matches("no field package.preload['fakemod']", out, 1, true)
      assert.matches("next map\t4\n", out, 1, true)
    end)
end)

describe_mpi("the MPI backend with a small buffersize", function()
  -- an agent's engine took a failure (raise, death, timeout) and pumped
  -- its workers before the failure's result was queued for rank 0: it
  -- waited for input while rank 0 waited for that result (buffersize)
  it("relays a failure before it waits for more items", function()
    local out, code = mpirun([[
local parmap = require "parmap"
local bad = 0
for _, ordered in ipairs {true, false} do
  for _, seed in ipairs {false, 5} do
    for _, chunksize in ipairs {false, 100} do
      for _, b in ipairs {1, 2} do
        local k, n, errs = 0, 0, 0
        for i, r in parmap(function(x)
              if x % 3 == 2 then error("no " .. x) end
              if x == 4 then os.exit(3) end
              return x
            end,
            function() k = k + 1; if k <= 6 then return k end end,
            {buffersize = b, ordered = ordered, backend = "mpi", N = 2,
             exception = "return", retries = 1, chunksize = chunksize or nil,
             seed = seed or nil}) do
          n = n + 1
          if parmap.iserror(r) then errs = errs + 1
          elseif r ~= i then bad = bad + 1 end
        end
        if n ~= 6 or errs ~= 3 then bad = bad + 1 end
      end
    end
  end
end
print("bad", bad)
]], 3, "timeout 60 " .. MH.BIN)
    assert.are.equal(0, code, out)
    assert.matches("bad\t0\n", out, 1, true)
  end)
end)

describe_mpi("the MPI backend's error objects", function()
  it("name the map's index in a death's err, and leave fn's own message alone",
    function()
      local out, code = mpirun([[
local parmap = require "parmap"
local items = {}
for i = 1, 20 do items[i] = i end
local function fn(x)
  if x == 10 or x == 20 then os.exit(3) end
  if x == 7 then error("item 1 said no", 0) end
  return x
end
local bad = {}
for i, r in parmap(fn, items, {backend = "mpi", N = 1, exception = "return"}) do
  if parmap.iserror(r) then
    if r.kind == "died" then
      local want = "while running item " .. i
      if r.err:sub(-#want) ~= want or r.message ~= r.err then
        bad[#bad + 1] = i .. ": " .. r.err
      end
    elseif r.message ~= "item 1 said no" or r.err ~= "item 1 said no" then
      bad[#bad + 1] = i .. ": " .. r.message
    end
  end
end
-- what exception = "proc" raises: the err
local ok, e = pcall(function()
  for _ in parmap(fn, {1, 2, 3, 20}, {backend = "mpi", N = 1, exception = "proc",
    ordered = true}) do end
end)
if ok or not tostring(e):find("while running item 4", 1, true) then
  bad[#bad + 1] = "proc: " .. tostring(e)
end
print("bad", table.concat(bad, " | "))
]], 3, "timeout 60 " .. MH.BIN)
      assert.are.equal(0, code, out)
      assert.matches("bad\t\n", out, 1, true)
    end)
end)

describe_mpi("the MPI backend's items", function()
  it("fail one by one when an items table's access raises, as on the fork backend",
    function()
      local out, code = mpirun([[
local parmap = require "parmap"
local items = setmetatable({}, {__len = function() return 6 end,
  __index = function(_, k)
    if k == 2 or k == 5 then error({code = k}) end
    if k == 4 then return nil end -- a hole: the items go boxed
    return type(k) == "number" and k * 10 or nil
  end})
for _, retries in ipairs {0, 2} do
  for _, seed in ipairs {false, 3} do
    local out = {}
    for _, backend in ipairs {"fork", "mpi"} do
      local s = {}
      local ok, e = pcall(function()
        for i, r in parmap(function(x) return x end, items, {backend = backend,
            N = 2, exception = "return", retries = retries, seed = seed or nil}) do
          if parmap.iserror(r) then
            s[#s + 1] = table.concat({i, r.kind, type(r.err) == "table" and r.err.code or "?",
              r.message, r.attempts}, ":")
          else
            s[#s + 1] = i .. ":" .. tostring(r)
          end
        end
      end)
      table.sort(s)
      out[backend] = table.concat(s, " ") .. " end " .. tostring(ok) .. " " .. tostring(e)
    end
    print(retries, seed, out.fork == out.mpi and "same" or "differ: " .. out.mpi,
      out.fork)
  end
end
]], 3, "timeout 60 " .. MH.BIN)
      assert.are.equal(0, code, out)
      local n = 0
      for line in out:gmatch("[^\n]+") do
        if line:match("^%d\t") then
          n = n + 1
          assert.matches("^%d\t%w+\tsame\t1:10 2:error:2:", line)
        end
      end
      assert.are.equal(4, n, out)
    end)
end)

describe_mpi("the MPI backend's bad shapes", function()
  it("raise at their turn naming the map's index, with seed too, as on the fork backend",
    function()
      local out, code = mpirun([[
local parmap = require "parmap"
for _, o in ipairs {{star = true}, {kwstar = true}} do
  for _, seed in ipairs {false, 3} do
    for _, from in ipairs {"table", "iter"} do
      local out = {}
      for _, backend in ipairs {"fork", "mpi"} do
        local items = {{1, 2}, {3}, 5, {6}}
        if o.kwstar then items = {{1, {a = 1}}, {3, {a = 3}}, 5, {6, {a = 6}}} end
        local src = items
        if from == "iter" then
          local k = 0
          src = function() k = k + 1; return items[k] end
        end
        local s = {}
        local ok, e = pcall(function()
          for i, r in parmap(function(a) return a end, src, {backend = backend,
              N = 2, exception = "return", star = o.star, kwstar = o.kwstar,
              seed = seed or nil, retries = 1}) do
            s[#s + 1] = i .. ":" .. (parmap.iserror(r) and "E" or tostring(r))
          end
        end)
        out[backend] = table.concat(s, " ") .. " end " .. tostring(ok) .. " " .. tostring(e)
      end
      print("shape", out.fork == out.mpi and "same" or "differ: " .. out.mpi, out.fork)
    end
  end
end
]], 3, "timeout 60 " .. MH.BIN)
      assert.are.equal(0, code, out)
      local n = 0
      for line in out:gmatch("shape\t[^\n]*") do
        n = n + 1
        assert.matches("^shape\tsame\t1:1 2:3 end false parmap: item 3: ", line)
      end
      assert.are.equal(8, n, out)
    end)
end)

describe_mpi("the MPI backend's end of a map", function()
  it("comes after every worker's finish, recycled ones included", function()
    -- the log every host's workers append to: a file all hosts see
    local out, code = mpirun("local log = " .. string.format("%q", H.tmpname()) .. [[

local parmap = require "parmap"
local function count(what)
  local n, f = 0, io.open(log)
  for line in f:lines() do if line == what then n = n + 1 end end
  f:close()
  return n
end
for _, ordered in ipairs {true, false} do
  for _, from in ipairs {"table", "iter"} do
    io.open(log, "w"):close()
    local items = {1, 2, 3, 4, 5, 6}
    local src = items
    if from == "iter" then
      local k = 0
      src = function() k = k + 1; return items[k] end
    end
    local n = 0
    for _ in parmap(function(x) return x end, src, {backend = "mpi", N = 2,
        maxtasks = 1, ordered = ordered,
        init = function()
          local f = io.open(log, "a"); f:write("init\n"); f:close()
        end,
        finish = function()
          os.execute("sleep 0.3") -- a slow finish: the loop must wait for it
          local f = io.open(log, "a"); f:write("finish\n"); f:close()
        end}) do
      n = n + 1
    end
    print("ends", ordered, from, n, count("init"), count("finish"))
  end
end
os.remove(log)
]], 3, "timeout 90 " .. MH.BIN)
    assert.are.equal(0, code, out)
    local k = 0
    for n, inits, fins in out:gmatch("ends\t%a+\t%a+\t(%d+)\t(%d+)\t(%d+)") do
      k = k + 1
      assert.are.equal("6", n, out)
      assert.are.equal(inits, fins, out)
      assert.is_true(tonumber(inits) >= 6, out) -- maxtasks = 1: one per item
    end
    assert.are.equal(4, k, out)
  end)
end)
