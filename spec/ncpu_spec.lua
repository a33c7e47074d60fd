-- parmap.ncpu() and the default N: the affinity mask lowered to the CPU
-- quota of the process's control group (cgroup v2 cpu.max, v1
-- cpu.cfs_quota_us / cpu.cfs_period_us, over the group and its ancestors).
-- The cgroup files are faked under a root (opts.root, PARMAP_CGROUP_ROOT).
local parmap = require "parmap"
local core = require "parmap.core"
local H = require "helpers"
local M = require "mpi_helpers"

local function mkdirs(path) assert(os.execute("mkdir -p '" .. path .. "'")) end
local function write(path, text)
  mkdirs(path:match("^(.*)/[^/]*$"))
  local f = assert(io.open(path, "w"))
  f:write(text)
  f:close()
end

local roots = {}
local function fake_root()
  local r = os.tmpname()
  os.remove(r)
  mkdirs(r)
  roots[#roots + 1] = r
  return r
end

-- A cgroup v2 machine: the process in /a/b, with cpu.max per level.
local function v2(levels, opts)
  opts = opts or {}
  local r = fake_root()
  write(r .. "/proc/self/cgroup", "0::" .. (opts.path or "/a/b") .. "\n")
  write(r .. "/proc/self/mountinfo",
    "24 30 0:22 " .. (opts.mroot or "/") .. " /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
    .. "25 30 0:23 / /proc rw - proc proc rw\n")
  for dir, max in pairs(levels) do
    write(r .. "/sys/fs/cgroup" .. dir .. "/cpu.max", max .. "\n")
  end
  return r
end

-- A cgroup v1 machine (cpu,cpuacct mounted together).
local function v1(levels)
  local r = fake_root()
  write(r .. "/proc/self/cgroup",
    "5:memory:/docker/c1\n4:cpu,cpuacct:/docker/c1\n0::/\n")
  write(r .. "/proc/self/mountinfo",
    "30 25 0:26 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
    .. "31 25 0:27 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n")
  for dir, qp in pairs(levels) do
    local base = r .. "/sys/fs/cgroup/cpu,cpuacct" .. dir
    write(base .. "/cpu.cfs_quota_us", qp[1] .. "\n")
    write(base .. "/cpu.cfs_period_us", qp[2] .. "\n")
  end
  return r
end

describe("parmap.ncpu and cgroup CPU quotas", function()
  local affinity = core.ncpu()

  teardown(function()
    for _, r in ipairs(roots) do os.execute("rm -rf '" .. r .. "'") end
  end)

  it("without a cgroup (no files under the root) is the affinity count", function()
    assert.equal(affinity, parmap.ncpu({ root = fake_root() }))
    assert.equal(affinity, parmap.ncpu())
  end)

  it("v2: a quota of one and a half CPUs gives 2, of half a CPU 1", function()
    assert.equal(math.min(affinity, 2),
      parmap.ncpu({ root = v2({ ["/a/b"] = "150000 100000" }) }))
    assert.equal(1, parmap.ncpu({ root = v2({ ["/a/b"] = "50000 100000" }) }))
    assert.equal(1, parmap.ncpu({ root = v2({ ["/a/b"] = "1000 100000" }) }))
  end)

  it("v2: 'max' is no limit; the lowest quota over the ancestors wins", function()
    assert.equal(affinity, parmap.ncpu({ root = v2({ ["/a/b"] = "max 100000" }) }))
    assert.equal(1, parmap.ncpu({ root = v2({ ["/a/b"] = "max 100000",
      ["/a"] = "100000 100000", [""] = "max 100000" }) }))
  end)

  it("v2 in a container whose mount root is its own group", function()
    -- the kernel names the group /kube/pod1; the container's mount root
    -- is that group, so its files are at the mount point itself
    local r = v2({ [""] = "100000 100000" }, { path = "/kube/pod1", mroot = "/kube/pod1" })
    assert.equal(1, parmap.ncpu({ root = r }))
  end)

  it("v1: cfs_quota_us / cfs_period_us, -1 is no limit", function()
    assert.equal(1, parmap.ncpu({ root = v1({ ["/docker/c1"] = { 100000, 100000 } }) }))
    assert.equal(affinity, parmap.ncpu({ root = v1({ ["/docker/c1"] = { -1, 100000 } }) }))
    assert.equal(1, parmap.ncpu({ root = v1({ ["/docker/c1"] = { -1, 100000 },
      ["/docker"] = { 20000, 100000 } }) }))
  end)

  it("a bad opts or root is an error naming it", function()
    assert.has_error(function() parmap.ncpu(3) end,
      "parmap.ncpu: bad argument #1 'opts' (table or nil expected, got number)")
    assert.has_error(function() parmap.ncpu({ root = 3 }) end,
      "parmap.ncpu: bad option 'root' (string expected, got number)")
  end)

  it("garbage in cpu.max is no limit, not an error", function()
    assert.equal(affinity, parmap.ncpu({ root = v2({ ["/a/b"] = "lots\n" }) }))
    assert.equal(affinity, parmap.ncpu({ root = v2({ ["/a/b"] = "0 0" }) }))
  end)

  it("is the default N of a map (PARMAP_CGROUP_ROOT)", function()
    local r = v2({ ["/a/b"] = "100000 100000" })
    local out = H.run_lua([[
      local parmap = require "parmap"
      local ns = {}
      for _, n in parmap(function() local _, n = parmap.worker(); return n end,
          {1, 2, 3, 4, 5, 6, 7, 8}, { timeout = 60 }) do ns[n] = true end
      io.write("ncpu ", parmap.ncpu(), "\n")
      for n in pairs(ns) do io.write("workers ", n, "\n") end
    ]], "PARMAP_CGROUP_ROOT='" .. r .. "'")
    assert.equal("ncpu 1\nworkers 1\n", out)
  end)

  it("under parmap-mpi: each agent reports (and runs) its quota's CPUs", function()
    if not M.have then
      pending("PARMAP_MPI_BIN not set (make test, make check-mpi)")
      return
    end
    local r = v2({ ["/a/b"] = "100000 100000" })
    local src = [[
      local mpi = package.loaded["parmap.mpi"]
      local parmap = require "parmap"
      local ids = {}
      for _, id in parmap(function() return (parmap.worker()) end, parmap.range(40),
          { chunksize = 1 }) do ids[id] = true end
      local n = 0
      for _ in pairs(ids) do n = n + 1 end
      io.write("agents")
      for rank = 1, 2 do io.write(" ", mpi.hosts()[rank].ncpu) end
      io.write(" workers ", n, "\n")
    ]]
    local out = M.mpirun(src, 3, nil, string.format("PARMAP_CGROUP_ROOT=%q", r),
      "-x PARMAP_CGROUP_ROOT")
    assert.equal("agents 1 1 workers 2\n", out)
  end)
end)
