-- option journal on the MPI backend: rank 0's coordinator journals the
-- records agents send and hands out the journaled ones itself. A journal
-- cut mid-way (as a kill leaves it) resumes: the items it still holds do
-- not run again, the results equal a clean run's; a fork backend's journal
-- resumes under MPI; a different fn or count is refused. Scripts run under
-- mpirun -n 3 parmap-mpi (spec/mpi_helpers.lua); pending without it.
local MH = require "mpi_helpers"
local H = require "helpers"
local mpirun = MH.mpirun
local describe_mpi = MH.describer(describe, pending)

describe_mpi("option journal under parmap-mpi", function()
  it("resumes a cut journal, table and iterator, ordered or not", function()
    local j, log = H.tmpname(), H.tmpname()
    local out, code = mpirun(string.format([[
local parmap = require "parmap"
local J, LOG = %q, %q
local function fn(x)
  local f = assert(io.open(LOG, "a")); f:write(x, "\n"); f:close()
  return x * 10, "r" .. x
end
local function runs()
  local f = io.open(LOG); local n = 0
  if f then for _ in f:lines() do n = n + 1 end f:close() end
  return n
end
local function cut(frac)
  local f = assert(io.open(J, "rb")); local s = f:read("a"); f:close()
  f = assert(io.open(J, "wb")); f:write(s:sub(1, math.floor(#s * frac))); f:close()
end
local function iter(n) local k = 0
  return function() k = k + 1; if k <= n then return k end end end
for _, input in ipairs { "table", "iterator" } do
  for _, ordered in ipairs { true, false } do
    for _, backend in ipairs { "mpi", "fork" } do -- who wrote the journal
      os.remove(J); os.remove(LOG)
      local function items()
        if input == "table" then local t = {} for i = 1, 60 do t[i] = i end return t end
        return iter(60)
      end
      parmap.map(fn, items(), { journal = J, backend = backend, N = 2 })
      assert(runs() == 60)
      cut(0.5)
      local got, n = {}, 0
      for i, a, b in parmap(fn, items(), { journal = J, ordered = ordered,
          backend = "mpi" }) do
        assert(a == i * 10 and b == "r" .. i, "item " .. i)
        assert(not got[i]); got[i] = true; n = n + 1
      end
      local reran = runs() - 60
      assert(n == 60, n)
      assert(reran > 0 and reran < 60, "reran " .. reran)
      local again = parmap.map(fn, items(), { journal = J, backend = "mpi" })
      assert(#again == 60 and again[60] == 600 and runs() == 60 + reran)
      print("ok", input, ordered, backend, reran)
    end
  end
end
-- refusals
os.remove(J)
parmap.map(fn, iter(5), { journal = J, backend = "mpi" })
local ok, err = pcall(parmap.map, function(x) return x end, iter(5), { journal = J })
print("fn", ok, err)
ok, err = pcall(parmap.map, fn, { 1, 2, 3, 4, 5, 6 }, { journal = J })
print("count", ok, err)
ok, err = pcall(parmap.map, fn, iter(7), { journal = J })
print("past", ok, err)
-- an iterator that raises among journaled items: those before it come,
-- then its error (nothing waits for items that never got a result)
local function bad(n) local k = 0
  return function() k = k + 1; if k == n then error("boom") end return k end end
local seen = 0
ok, err = pcall(function()
  for _ in parmap(fn, bad(4), { journal = J }) do seen = seen + 1 end
end)
print("raised", seen, ok, err)
os.remove(J); os.remove(LOG)
]], j, log), 3)
    assert.are.equal(0, code, out)
    local oks = 0
    for _ in out:gmatch("\nok\t") do oks = oks + 1 end
    if out:sub(1, 3) == "ok\t" then oks = oks + 1 end
    assert.are.equal(8, oks, out)
    assert.matches("fn\tfalse\t[^\n]*was written by a different fn", out)
    assert.matches("count\tfalse\t[^\n]*map of 5 items, this one has 6", out)
    assert.matches("past\tfalse\t[^\n]*go on past them", out)
    assert.matches("raised\t3\tfalse\t[^\n]*boom", out)
  end)
end)
