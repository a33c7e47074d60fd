-- maxmemory: a worker whose RSS passes the limit after an item is replaced
-- (as maxtasks replaces one); a worker the OOM killer took is reported as
-- kind "died" with signal 9 and oom = true (the cgroup's OOM count grew).
local parmap = require "parmap"
local core = require "parmap.core"
local Check = require "parmap.check"
local H = require "helpers"
local M = require "mpi_helpers"

local function rss()
  local f = assert(io.open("/proc/self/statm"))
  local _, res = f:read("a"):match("(%d+)%s+(%d+)")
  f:close()
  return tonumber(res) * 4096
end

-- Run src in a fresh lua5.4 with the environment env (a string of
-- assignments); returns its output.
local function run_env(env, src)
  return (H.run_lua(src, env))
end

describe("the maxmemory option", function()
  it("replaces a worker whose RSS passed it, under the same number", function()
    -- a worker's RSS as it starts (the caller's resident pages it shares)
    local base = 0
    for _, r in ipairs(parmap.map(rss, { 1, 2 }, { N = 2, chunksize = 1 })) do
      if r > base then base = r end
    end
    local limit = base + (20 << 20)
    local leak = {}
    local function grow(x)
      leak[#leak + 1] = string.rep(string.char(65 + x % 26), 10 << 20)
      local id = parmap.worker()
      return core.pid() * 100 + id
    end
    local got = parmap.map(grow, H.range(12), { N = 2, chunksize = 1, maxmemory = limit })
    local per, pids = {}, 0
    for i = 1, 12 do
      local pid, id = got[i] // 100, got[i] % 100
      assert.is_true(id == 1 or id == 2)
      if not per[pid] then pids = pids + 1 end
      per[pid] = (per[pid] or 0) + 1
    end
    -- 10 MB an item: past the limit after the third at the latest; a
    -- worker may hold one more item already handed to it
    for pid, n in pairs(per) do assert.is_true(n <= 4, pid .. " ran " .. n) end
    assert.is_true(pids >= 3, "only " .. pids .. " processes")
    -- without it, the two workers run everything
    got = parmap.map(function() return core.pid() end, H.range(12), { N = 2, chunksize = 1 })
    local seen, k = {}, 0
    for i = 1, 12 do if not seen[got[i]] then seen[got[i]] = true; k = k + 1 end end
    assert.is_true(k <= 2)
  end)

  it("is not reached by a worker that stays small", function()
    local got = parmap.map(function() return core.pid() end, H.range(200),
      { N = 2, maxmemory = "4G" })
    local seen, k = {}, 0
    for i = 1, 200 do if not seen[got[i]] then seen[got[i]] = true; k = k + 1 end end
    assert.is_true(k <= 2)
  end)

  it("takes bytes or a size with a unit; anything else is a clear error", function()
    assert.equal(2 * 1024 ^ 3, Check.bytes(1, "maxmemory", "2G"))
    assert.equal(512 * 1024 ^ 2, Check.bytes(1, "maxmemory", "512M"))
    assert.equal(512 * 1024 ^ 2, Check.bytes(1, "maxmemory", "512MiB"))
    assert.equal(1536 * 1024 ^ 2, Check.bytes(1, "maxmemory", "1.5g"))
    assert.equal(100 * 1024, Check.bytes(1, "maxmemory", "100k"))
    assert.equal(1000, Check.bytes(1, "maxmemory", "1000"))
    assert.equal(1000000000, Check.bytes(1, "maxmemory", 1e9))
    local what = "positive number of bytes or a size such as \"512M\" or \"2G\" expected"
    for v, shown in pairs({ [0] = "0", [-5] = "-5", [1.5] = "1.5", ["2X"] = 'string "2X"',
        ["G"] = 'string "G"', [""] = 'string ""', [true] = "boolean" }) do
      assert.has_error(function() parmap.map(print, {}, { maxmemory = v }) end,
        "parmap: bad option 'maxmemory' (" .. what .. ", got " .. shown .. ")")
    end
    assert.has_error(function() parmap.map(print, {}, { maxmemroy = 1 }) end,
      "parmap: unknown option 'maxmemroy' (did you mean 'maxmemory'?)")
  end)
end)

describe("a worker the OOM killer took", function()
  -- a fake cgroup v2 root whose memory.events fn itself bumps before it
  -- SIGKILLs its own process, as the kernel's OOM killer would
  local root
  setup(function()
    root = os.tmpname()
    os.remove(root)
    assert(os.execute("mkdir -p '" .. root .. "/proc/self' '" .. root .. "/sys/fs/cgroup/job'"))
    local f = assert(io.open(root .. "/proc/self/cgroup", "w"))
    f:write("0::/job\n")
    f:close()
    f = assert(io.open(root .. "/sys/fs/cgroup/job/memory.events", "w"))
    f:write("low 0\nhigh 0\nmax 3\noom 1\noom_kill 0\n")
    f:close()
  end)
  teardown(function() os.execute("rm -rf '" .. root .. "'") end)

  local function script(bump, sig)
    return string.format([[
      local parmap = require "parmap"
      local core = require "parmap.core"
      local events = %q
      for i, r in parmap(function(x)
        if x == 3 then
          if %s then
            local f = assert(io.open(events, "w"))
            f:write("low 0\nhigh 0\nmax 4\noom 2\noom_kill 1\n")
            f:close()
          end
          os.execute("kill -%s " .. core.pid())
          while true do end
        end
        return x
      end, {1, 2, 3, 4}, { N = 2, chunksize = 1, exception = "return" }) do
        if parmap.iserror(r) then
          print(i, r.kind, r.signal, r.oom, r.message)
        end
      end
    ]], root .. "/sys/fs/cgroup/job/memory.events", tostring(bump), sig)
  end

  it("is kind died with signal 9 and oom = true", function()
    local out = run_env("PARMAP_CGROUP_ROOT='" .. root .. "'", script(true, "KILL"))
    assert.matches("^3\tdied\t9\ttrue\tworker %d+ killed by signal 9 %(Killed, by the kernel's OOM killer%) while running item 3\n$", out)
  end)

  it("a SIGKILL from elsewhere is not the OOM killer's", function()
    local out = run_env("PARMAP_CGROUP_ROOT='" .. root .. "'", script(false, "KILL"))
    assert.matches("^3\tdied\t9\tnil\tworker %d+ killed by signal 9 %(Killed%) while running item 3\n$", out)
    out = run_env("PARMAP_CGROUP_ROOT='" .. root .. "'", script(false, "TERM"))
    assert.matches("^3\tdied\t15\tnil\t", out)
  end)

  it("under parmap-mpi: the agent's error object keeps signal and oom", function()
    if not M.have then
      pending("PARMAP_MPI_BIN not set (make test, make check-mpi)")
      return
    end
    local f = assert(io.open(root .. "/sys/fs/cgroup/job/memory.events", "w"))
    f:write("oom_kill 0\n") -- the script bumps it to 1
    f:close()
    local out = M.mpirun(script(true, "KILL"), 2, nil,
      string.format("PARMAP_CGROUP_ROOT=%q", root), "-x PARMAP_CGROUP_ROOT")
    assert.matches("^3\tdied\t9\ttrue\tworker %d+ killed by signal 9 %(Killed, by the kernel's OOM killer%) while running item 3\n$", out)
  end)

  -- The real thing where this machine lets us make a memory cgroup (root,
  -- cgroup v1's memory controller or v2 with it): a worker past the
  -- group's limit is killed by the kernel.
  it("in a real memory cgroup (when one can be made here)", function()
    if os.getenv("LD_PRELOAD") or os.getenv("PARMAP_VALGRIND") then
      pending("not under a sanitizer or valgrind: their own memory would meet the limit")
      return
    end
    local f = io.open("/proc/self/cgroup")
    local text = f and f:read("a") or ""
    if f then f:close() end
    local v1 = text:match("%d+:memory:([^\n]*)")
    local base, limit_file, swap_file
    if v1 then
      base = "/sys/fs/cgroup/memory" .. v1
      limit_file, swap_file = "memory.limit_in_bytes", "memory.memsw.limit_in_bytes"
    else
      local v2 = text:match("0::([^\n]*)")
      base = v2 and "/sys/fs/cgroup" .. v2
      limit_file, swap_file = "memory.max", "memory.swap.max"
    end
    local dir = base and (base:gsub("/$", "") .. "/parmap-spec-" .. core.pid())
    if not dir or not os.execute("mkdir '" .. dir .. "' 2>/dev/null") then
      pending("cannot make a memory cgroup here")
      return
    end
    local function put(file, v)
      local h = io.open(dir .. "/" .. file, "w")
      if not h then return false end
      local ok = h:write(v)
      return h:close() and ok and true
    end
    local ok = put(limit_file, "67108864")
    put(swap_file, v1 and "67108864" or "0")
    local out = ""
    if ok then
      local path = H.script([[
        local parmap = require "parmap"
        for i, r in parmap(function(x)
          if x == 2 then local t = {} for k = 1, 40 do t[k] = string.rep("y", 10 * 2^20 // 1) end end
          return x
        end, {1, 2, 3}, { N = 2, chunksize = 1, exception = "return" }) do
          if parmap.iserror(r) then print(i, r.kind, r.signal, r.oom) end
        end
      ]])
      local p = io.popen("sh -c 'echo $$ > " .. dir .. "/cgroup.procs && exec env "
        .. H.lua_cmd(path):gsub("'", "'\\''") .. "' 2>&1")
      out = p:read("a")
      p:close()
      os.remove(path)
    end
    os.execute("rmdir '" .. dir .. "'")
    if not ok then
      pending("cannot set a memory limit here")
      return
    end
    assert.equal("2\tdied\t9\ttrue\n", out)
  end)
end)
