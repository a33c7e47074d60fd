-- retry_if and retry_delay under parmap-mpi: the predicate travels to the
-- agents with fn, sees the map's index (for fn's error in a worker and for
-- a death in the agent), and the delays hold. Scripts run under mpirun -n 3
-- parmap-mpi (spec/mpi_helpers.lua); pending without it.
local MH = require "mpi_helpers"
local mpirun = MH.mpirun
local describe_mpi = MH.describer(describe, pending)

describe_mpi("retry_if and retry_delay on the MPI backend", function()
  it("retry what retry_if accepts, after the delay, with the map's index", function()
    local out, code = mpirun([[
local parmap = require "parmap"
-- on a simulated cluster the agents' hosts share PARMAP_SPEC_SHARED only
local dir, shared = os.tmpname(), os.getenv("PARMAP_SPEC_SHARED")
os.remove(dir)
if shared then dir = shared .. "/" .. dir:match("[^/]+$") end
assert(os.execute("mkdir -p " .. dir))
local function note(name, line)
  local f = assert(io.open(dir .. "/" .. name, "a")); f:write(line, "\n"); f:close()
end
local function count(name)
  local n, f = 0, io.open(dir .. "/" .. name)
  if f then for _ in f:lines() do n = n + 1 end f:close() end
  return n
end
local function times(name)
  local t, f = {}, io.open(dir .. "/" .. name)
  if f then for l in f:lines() do t[#t + 1] = tonumber(l) end f:close() end
  return t
end
-- item 7 raises "flaky" in its first run, item 9 dies in its first, item 11
-- raises "bug" always; the items are spread over both agents
local r = parmap.map(function(x)
  local n = count("s" .. x) + 1
  note("s" .. x, string.format("%.6f", parmap.now()))
  if x == 7 and n == 1 then note("e" .. x, string.format("%.6f", parmap.now())); error("flaky") end
  if x == 9 and n == 1 then note("e" .. x, string.format("%.6f", parmap.now())); os.exit(3) end
  if x == 11 then error("bug") end
  return x * 10
end, (function() local t = {} for i = 1, 12 do t[i] = i end return t end)(),
  { backend = "mpi", N = 2, retries = 3, exception = "return", retry_delay = 0.3,
    chunksize = 1,
    retry_if = function(e)
      note("pred", string.format("%s %d %d", e.kind, e.index, e.attempts))
      return e.kind == "died" or tostring(e.err):find("flaky", 1, true) ~= nil
    end })
local bad = 0
for i = 1, 12 do
  if i ~= 11 and r[i] ~= i * 10 then bad = bad + 1; print("bad", i, tostring(r[i])) end
end
print("bug", r[11].kind, r[11].attempts, count("s11"))
print("runs", count("s7"), count("s9"))
local s7, e7, s9, e9 = times("s7"), times("e7"), times("s9"), times("e9")
print("gap7", s7[2] - e7[1] >= 0.3, "gap9", s9[2] - e9[1] >= 0.3)
local p = {}
for l in io.lines(dir .. "/pred") do p[#p + 1] = l end
table.sort(p)
print("pred", table.concat(p, ","))
print("bad", bad)
os.execute("rm -rf " .. dir)
-- a raising predicate: the item's message names it
local r2 = parmap.map(function() error("boom") end, { 1 }, { backend = "mpi",
  retries = 2, exception = "return", retry_if = function() error("pbug") end })
print("raised", r2[1].attempts, r2[1].message:find("option 'retry_if' raised", 1, true) ~= nil,
  r2[1].message:find("pbug", 1, true) ~= nil)
]])
    assert.are.equal(0, code, out)
    assert.matches("bug\terror\t1\t1\n", out, 1, true)
    assert.matches("runs\t2\t2\n", out, 1, true)
    assert.matches("gap7\ttrue\tgap9\ttrue\n", out, 1, true)
    assert.matches("pred\tdied 9 1,error 11 1,error 7 1\n", out, 1, true)
    assert.matches("bad\t0\n", out, 1, true)
    assert.matches("raised\t1\ttrue\ttrue\n", out, 1, true)
  end)
end)
