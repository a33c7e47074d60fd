-- The MPI backend's liveness: rank 0 leaving with a map open, an agent
-- that goes quiet (SIGSTOP: no heartbeat, no result), in the default and
-- the resilient mode. Scripts run under
--   timeout 90 mpirun <MPIRUN_FLAGS> -n 3 build/parmap-mpi script.lua
-- (make test and make check-mpi set PARMAP_MPI_BIN; elsewhere pending).
-- Each spec would hang without its fix: the bound of `timeout` (status
-- 124) tells a hang from an end.
local H = require "helpers"
local M = require "mpi_helpers"

local BIN, MPIRUN, FLAGS = M.BIN, M.MPIRUN, M.FLAGS

-- Run src under mpirun (3 ranks); returns output, exit status, the
-- script's path (removed) and the seconds it took.
local function mpirun(src, env, flags)
  local path = H.script(src)
  local t0 = os.time()
  local p = io.popen(string.format("env -u LD_PRELOAD %s timeout 90 %s %s %s -n 3 %s %q 2>&1",
    env or "", MPIRUN, FLAGS, flags or "", BIN, path))
  local out = p:read("a")
  local _, _, code = p:close()
  os.remove(path)
  return out, code, path, os.time() - t0
end

local assert_none_left = M.assert_none_left

local describe_mpi = M.describer(describe, pending)

-- The items of rank 1 from item 3 on stop their agent (SIGSTOP: its
-- heartbeat thread too); the worker's parent is the agent. Only rank 1's:
-- a resilient map sends them to rank 2 again, which must not stop.
local STOPPER = [[
local parmap = require "parmap"
local function stopper(x)
  local rank = os.getenv("OMPI_COMM_WORLD_RANK") or os.getenv("PMI_RANK")
  if rank == "1" and x >= 3 then
    os.execute("kill -STOP $(ps -o ppid= -p $PPID)")
  end
  os.execute("sleep 0.05")
  return x * 2
end
local items = {}
for i = 1, 40 do items[i] = i end
]]

describe_mpi("the MPI backend's liveness", function()
  local th_path = package.searchpath("parmap_testhelper", package.cpath)

  -- an item that sleeps 60 s without a child process (a `sleep` child
  -- would outlive its killed worker)
  local LONG = [[
local parmap = require "parmap"
local th = require "parmap_testhelper"
local f, s = parmap.parmap(function(x)
  if x > 1 then th.sleep(60) end
  return x
end, {1, 2, 3, 4, 5, 6}, {N = 2})
print("first", f(s))
io.stdout:flush()
]]

  local it_th = th_path and it or pending
  it_th("os.exit with an MPI map open stops the agents' items, as a break "
    .. "does, and ends the job", function()
    local out, code, path, secs = mpirun(LONG .. 'os.exit(0)\n')
    assert.are.equal(0, code, out)
    assert.matches("first\t1\t1\n", out, 1, true)
    assert.is_true(secs < 50, out)
    assert_none_left(path)
  end)

  it_th("the end of the script with an MPI map open stops the agents' "
    .. "items and ends the job", function()
    local out, code, path, secs = mpirun(LONG .. 'print("end")\n')
    assert.are.equal(0, code, out)
    assert.matches("first\t1\t1\nend\n", out, 1, true)
    assert.is_true(secs < 50, out)
    assert_none_left(path)
  end)

  it("an agent that goes quiet ends a default job after PARMAP_MPI_DEAD_AFTER "
    .. "with a message naming its rank and host", function()
    local out, code, path = mpirun(STOPPER .. [[
parmap.map(stopper, items)
print("finished")
]], "env PARMAP_MPI_DEAD_AFTER=5")
    assert.are_not.equal(0, code, out)
    assert.are_not.equal(124, code, out) -- ended by itself, not by the bound
    assert.not_matches("finished", out)
    assert.matches("parmap%-mpi: rank 1 on %S+ sent nothing for %d+ s [^\n]*the "
      .. "job ends [^\n]*PARMAP_MPI_DEAD_AFTER=5 s", out)
    assert_none_left(path)
  end)

  it("a map's timeout bounds a quiet agent's work: the job ends after "
    .. "timeout + 3 s, not PARMAP_MPI_DEAD_AFTER", function()
    local out, code, path = mpirun(STOPPER .. [[
parmap.map(stopper, items, {timeout = 1})
print("finished")
]], "env PARMAP_MPI_DEAD_AFTER=600")
    assert.are_not.equal(0, code, out)
    assert.are_not.equal(124, code, out)
    assert.not_matches("finished", out)
    assert.matches("rank 1 on %S+ sent nothing for %d+ s [^\n]*the job ends "
      .. "[^\n]*the map's timeout %+ 3 s", out)
    assert_none_left(path)
  end)

  local keep = M.resilient_flags()
  local it_resilient = keep and it or pending

  it_resilient("resilient = true goes on without a quiet agent, and the job "
    .. "ends by itself when the script ends (" .. (keep or "MPIRUN_RESILIENT_FLAGS")
    .. ")", function()
    local out, code, path = mpirun(STOPPER .. [[
local r = parmap.map(stopper, items, {resilient = true})
local ok = 0
for i = 1, 40 do if r[i] == 2 * i then ok = ok + 1 end end
print("resilient", ok)
print("next map", #parmap.map(function(x) return x end, items))
io.stdout:flush()
]], "env PARMAP_MPI_DEAD_AFTER=3", keep)
    assert.are_not.equal(124, code, out)
    if not MPIRUN:match("srun$") then assert.are.equal(0, code, out) end
    assert.matches("rank 1 on %S+ sent nothing for 3 s: given up", out)
    assert.matches("resilient\t40\nnext map\t40\n", out, 1, true)
    assert_none_left(path)
  end)

  local it_rth = (keep and th_path) and it or pending
  it_rth("resilient = true: a quiet agent's items go to an agent still "
    .. "taking segments, and none is lost (" .. (keep or "MPIRUN_RESILIENT_FLAGS")
    .. ")", function()
    -- rank 1 stops at once; rank 2 alone needs ~10 s, so its input is still
    -- open when rank 1 is given up
    local out, code, path = mpirun([[
local parmap = require "parmap"
local th = require "parmap_testhelper"
local items = {}
for i = 1, 200 do items[i] = i end
local r = parmap.map(function(x)
  if (os.getenv("OMPI_COMM_WORLD_RANK") or os.getenv("PMI_RANK")) == "1" then
    os.execute("kill -STOP $(ps -o ppid= -p $PPID)")
  end
  th.sleep(0.1)
  return x * 2
end, items, {resilient = true, N = 2})
local ok = 0
for i = 1, 200 do if r[i] == 2 * i then ok = ok + 1 end end
print("resilient", ok)
io.stdout:flush()
]], "env PARMAP_MPI_DEAD_AFTER=3", keep)
    assert.are_not.equal(124, code, out)
    if not MPIRUN:match("srun$") then assert.are.equal(0, code, out) end
    assert.matches("rank 1 on %S+ sent nothing for 3 s: given up", out)
    assert.matches("resilient\t200\n", out)
    assert_none_left(path)
  end)

  it("agents that share a host share its CPUs when N is not given; an N "
    .. "above an agent's CPUs warns once", function()
    local out, code = mpirun([[
local parmap = require "parmap"
local h = require("parmap.mpi").hosts()
local want = 0
for r = 1, 2 do
  local same = h[1].host == h[2].host and 2 or 1
  want = want + math.max(1, h[r].ncpu // same)
end
local r = parmap.map(function() local _, total = parmap.worker(); return total end, {1, 2, 3, 4})
print("workers", r[1] == want, r[1], want)
parmap.map(function(x) return x end, {1, 2}, {N = 1000})
parmap.map(function(x) return x end, {1, 2}, {N = 1000})
]])
    assert.are.equal(0, code, out)
    assert.matches("workers\ttrue\t", out)
    local _, warnings = out:gsub("warning: N = 1000 workers on each agent", "")
    assert.are.equal(1, warnings, out)
  end)
end)
