-- What the MPI specs share (spec/mpi_backend_spec.lua,
-- spec/mpi_trust_spec.lua): the parmap-mpi binary and launcher from the
-- environment that `make test` and `make check-mpi` set, a runner for a
-- script under mpirun, and describe_mpi (pending without them).
local H = require "helpers"
local assert = require "luassert"

local M = {}
M.BIN = os.getenv("PARMAP_MPI_BIN") or "build/parmap-mpi"
M.MPIRUN = os.getenv("MPIRUN") or "mpirun"
M.FLAGS = os.getenv("MPIRUN_FLAGS")
  or "--allow-run-as-root --oversubscribe --bind-to none"

-- under `make test` and `make check-mpi`, which build parmap-mpi and set
-- PARMAP_MPI_BIN; the sanitizer, collector and valgrind runs leave them out
local have = os.getenv("PARMAP_MPI_BIN") and io.open(M.BIN, "r")
if have then have:close() end
M.have = have and true or false

-- Run src under mpirun with n ranks; returns output (stdout and stderr),
-- exit status, and the script's path (already removed).
function M.mpirun(src, n, cmd, env, flags)
  local path = H.script(src)
  -- LD_PRELOAD (make check-asan's libasan for lua5.4) stays out of mpirun:
  -- an ASan parmap-mpi links it itself, and Open MPI's daemons hang under it
  local p = io.popen(string.format("env -u LD_PRELOAD %s timeout 120 %s %s %s -n %d %s %q 2>&1",
    env or "", M.MPIRUN, M.FLAGS, flags or "", n or 3, cmd or M.BIN, path))
  local out = p:read("a")
  local _, _, code = p:close()
  os.remove(path)
  return out, code, path
end

-- No process whose command line names the script is left: polled for up
-- to 10 s (the workers of a killed agent die with it, by PR_SET_PDEATHSIG,
-- but a loaded machine may take a moment to reap them).
function M.assert_none_left(path)
  local left
  for _ = 1, 100 do
    left = 0
    local p = io.popen("env -u LD_PRELOAD ps -eo args") -- ps hangs under libasan
    for line in p:lines() do
      if line:find(path, 1, true) then left = left + 1 end
    end
    p:close()
    if left == 0 then break end
    os.execute("sleep 0.1")
  end
  assert.are.equal(0, left)
end

-- The launcher's flags that keep the job alive after a rank's death:
-- MPIRUN_RESILIENT_FLAGS, by default --enable-recovery with Open MPI's
-- mpirun; false when there are none.
function M.resilient_flags()
  local vp = io.popen(M.MPIRUN .. " --version 2>&1")
  local openmpi = vp:read("a"):find("Open MPI", 1, true) ~= nil
  vp:close()
  local keep = os.getenv("MPIRUN_RESILIENT_FLAGS")
  if keep == "" then keep = nil end
  return keep or (openmpi and "--enable-recovery")
end

-- describe_mpi = M.describer(describe, pending) in a spec file (busted's
-- describe and pending live in the spec's environment): describe, or a
-- pending block without parmap-mpi
function M.describer(describe, pending)
  if M.have then return describe end
  return function(name)
    describe(name, function()
      pending("the MPI specs run under make test and make check-mpi")
    end)
  end
end

return M
