-- The differential fuzz (spec/difffuzz.lua): random fn behaviours, items
-- and options, each map against the serial reference the driver computes,
-- in child processes (a crash or a hang there fails this spec, not the
-- suite). PARMAP_DFUZZ_SEED=<n> picks the seed (default: a fresh one, or
-- 20261207 under CI); a failure prints the line that replays its case:
--   PARMAP_DFUZZ_SEED=<s> PARMAP_DFUZZ_CASE=<k> lua5.4 spec/difffuzz.lua
-- (LUA_PATH and LUA_CPATH as spec/run.sh sets them; under parmap-mpi for
-- the MPI cases: mpirun -n 3 build/parmap-mpi spec/difffuzz.lua).
local H = require "helpers"

local BATCHES, PER_BATCH = 3, 1000 -- fork backend, N = 1..4 drawn per case
local MPI_CASES = 500

local seed = require("difffuzz").seed()

local M = require "mpi_helpers"
local BIN, MPIRUN, FLAGS, have_mpi = M.BIN, M.MPIRUN, M.FLAGS, M.have

local function slurp(path)
  local f = io.open(path)
  local s = f and f:read("a") or ""
  if f then f:close() end
  return s
end

-- Run the cases first..last through `cmd` (a command prefix that runs a
-- Lua script); bounded, so a hang fails the spec instead of stopping it.
local function batch(cmd, first, last)
  local path = H.script(string.format(
    "os.exit(require('difffuzz').run({ seed = %d, first = %d, last = %d, caselog = true }) == 0 and 0 or 1)",
    seed, first, last))
  local errpath = os.tmpname()
  local p = io.popen(string.format("%s %q 2>%s", cmd, path, errpath))
  local out = p:read("a")
  local _, how, code = p:close()
  os.remove(path)
  local err = slurp(errpath)
  os.remove(errpath)
  return out, how, code, err, path
end

local function verdict(out, how, code, err, first, last)
  local done = out:match("DFUZZ%-DONE[^\n]*")
  if done and how == "exit" and code == 0 and done:match(" fails=0 ") then
    print("# " .. done)
    return
  end
  local report, last_case = {}, nil
  for line in out:gmatch("[^\n]+") do
    if (line:match("^DFUZZ%-FAIL") or line:match("^  replay:")) and #report < 24 then
      report[#report + 1] = line
    end
    if line:match("^case %d+") then last_case = line end
  end
  error(string.format("seed %d, cases %d..%d: the fuzz %s (%s %s; last: %s)\n%s\n%s\nstderr: ...%s",
    seed, first, last, done and "found failures" or "did not finish (crash or hang)",
    tostring(how), tostring(code), tostring(last_case), table.concat(report, "\n"),
    done or "", err:sub(-1500)), 0)
end

describe("the differential fuzz", function()
  print(string.format("# difffuzz seed %d (replay: PARMAP_DFUZZ_SEED=%d)", seed, seed))
  for b = 1, BATCHES do
    local first, last = (b - 1) * PER_BATCH + 1, b * PER_BATCH
    it(string.format("fork backend, N = 1..4: cases %d..%d match the serial reference "
      .. "and leave no child", first, last), function()
      local cmd = string.format("timeout -s KILL 600 env LUA_PATH=%q LUA_CPATH=%q lua5.4",
        package.path, package.cpath)
      local out, how, code, err = batch(cmd, first, last)
      verdict(out, how, code, err, first, last)
      assert.same({}, H.children())
    end)
  end

  local it_mpi = have_mpi and it or pending
  it_mpi(string.format("MPI backend (mpirun -n 3 parmap-mpi): cases 1..%d match the "
    .. "serial reference and leave no process", MPI_CASES), function()
    -- LD_PRELOAD (check-asan's libasan) stays out of mpirun, as in the MPI spec
    local cmd = string.format("env -u LD_PRELOAD LUA_PATH=%q LUA_CPATH=%q timeout -s KILL 600 %s %s -n 3 %s",
      package.path, package.cpath, MPIRUN, FLAGS, BIN)
    local out, how, code, err, path = batch(cmd, 1, MPI_CASES)
    verdict(out, how, code, err, 1, MPI_CASES)
    -- no process of the job is left (the agents' workers die with them)
    M.assert_none_left(path)
  end)
end)
