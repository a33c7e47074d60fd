-- bench/mpi.lua: the MPI backend against the fork backend on the same
-- machine (issue 13). Run by `make bench-mpi` under
--   mpirun -n $(MPI_BENCH_RANKS) parmap-mpi bench/mpi.lua
-- (default 2 ranks: rank 0 and one agent, which uses every core as the
-- fork backend does). Medians of 3 runs; timings are printed, never asserted.
local parmap = require "parmap"

local RUNS = 3
local function median(f)
  local t = {}
  for r = 1, RUNS do
    local t0 = parmap.now()
    f()
    t[r] = parmap.now() - t0
  end
  table.sort(t)
  return t[(RUNS + 1) // 2]
end

local function cpu(x)
  local s = 0
  for i = 1, 200000 do s = s + (i * x) % 7 end
  return s
end
local heavy = {}
for i = 1, 400 do heavy[i] = i end
local TINY = 1000000
local tiny = {}
for i = 1, TINY do tiny[i] = i end
local function id(x) return x end

local cases = {
  { "CPU-bound, 400 items of ~1 ms", function(b) parmap.map(cpu, heavy, { backend = b }) end, 400 },
  { "tiny items from a table (1M)", function(b) parmap.map(id, tiny, { backend = b }) end, TINY },
  { "tiny items from an iterator (1M)", function(b)
      local i = 0
      for _ in parmap(id, function() i = i + 1; if i <= TINY then return i end end,
        { backend = b }) do end
    end, TINY },
}

local hosts = require("parmap.mpi").hosts()
print(string.format("ranks: %d (agents: %d, %d CPUs on rank 1)", #hosts + 1,
  #hosts, hosts[1] and hosts[1].ncpu or 0))
print(string.format("%-36s %12s %12s %8s", "case", "fork", "mpi", "mpi/fork"))
for _, c in ipairs(cases) do
  local tf = median(function() c[2]("fork") end)
  local tm = median(function() c[2]("mpi") end)
  print(string.format("%-36s %9.3f s  %9.3f s  %7.2fx   (%.2f / %.2f M items/s)",
    c[1], tf, tm, tf / tm, c[3] / tf / 1e6, c[3] / tm / 1e6))
  print(string.format("BENCH mpi case=%q fork_s=%.4f mpi_s=%.4f", c[1], tf, tm))
end
