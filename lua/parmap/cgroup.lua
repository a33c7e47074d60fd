-- parmap/cgroup.lua: what this process's control group allows: the CPU
-- quota (cgroup v2 cpu.max, v1 cpu.cfs_quota_us / cpu.cfs_period_us, the
-- lowest over the group and its ancestors) for the default N, and the OOM
-- killer's count (v2 memory.events, v1 memory.oom_control) to tell a worker
-- the OOM killer took. The group is found as the kernel names it in
-- /proc/self/cgroup, under the mount /proc/self/mountinfo gives. Every path
-- is read under a root (opts.root, else $PARMAP_CGROUP_ROOT, else "/"), so
-- a spec can fake the files. Private to parmap.

local core = require "parmap.core"
require("parmap.errors").own()

local open, getenv, tonumber, type, next, error = io.open, os.getenv, tonumber,
  type, next, error
local ceil, huge = math.ceil, math.huge

local G = {}

local function slurp(path)
  local f = open(path, "r")
  if not f then return nil end
  local s = f:read("a")
  f:close()
  return s
end

-- The root the files are read under ("" for the real one).
local function root_of(opts)
  local r = opts and opts.root or getenv("PARMAP_CGROUP_ROOT") or ""
  if r == "/" then r = "" end
  return (r:gsub("/+$", ""))
end

local function split(s, sep)
  local out = {}
  for part in s:gmatch("[^" .. sep .. "]+") do out[#out + 1] = part end
  return out
end

-- mountinfo's cgroup mounts: {v2 = {root, point}, cpu = ..., memory = ...}
local function mounts(root)
  local m = {}
  local text = slurp(root .. "/proc/self/mountinfo")
  if not text then
    return { v2 = { "/", "/sys/fs/cgroup" }, cpu = { "/", "/sys/fs/cgroup/cpu" },
      memory = { "/", "/sys/fs/cgroup/memory" } }
  end
  for line in text:gmatch("[^\n]+") do
    local f = split(line, " ")
    local dash
    for i = 7, #f do if f[i] == "-" then dash = i; break end end
    if dash then
      local fstype, opts = f[dash + 1], f[dash + 3] or ""
      local where = { f[4], f[5] }
      if fstype == "cgroup2" then
        m.v2 = m.v2 or where
      elseif fstype == "cgroup" then
        for _, o in next, split(opts, ",") do
          if o == "cpu" then m.cpu = m.cpu or where end
          if o == "memory" then m.memory = m.memory or where end
        end
      end
    end
  end
  return m
end

-- The group's directory under a mount {root, point} for the kernel's path:
-- the path relative to the mount's root (a container sees its own group
-- as its mount's root).
local function dir_of(root, mount, path)
  if not mount then return nil end
  local mroot, point = mount[1], mount[2]
  if mroot ~= "/" then
    if path:sub(1, #mroot) == mroot then
      path = path:sub(#mroot + 1)
    else
      path = "/"
    end
  end
  if path == "" then path = "/" end
  return root .. point, path
end

-- The controllers' groups, found once per process and root: {cpu = {v,
-- base, path}, memory = {v, base, path}}.
local cache = {}
local function groups(root)
  local key = root .. "\0" .. core.pid()
  local g = cache[key]
  if g then return g end
  g = {}
  local text = slurp(root .. "/proc/self/cgroup")
  if text then
    local m = mounts(root)
    for line in text:gmatch("[^\n]+") do
      local id, ctl, path = line:match("^(%d+):([^:]*):(.*)$")
      if id then
        if id == "0" and ctl == "" then
          local base, rel = dir_of(root, m.v2, path)
          if base then
            g.cpu = g.cpu or { 2, base, rel }
            g.memory = g.memory or { 2, base, rel }
          end
        else
          for _, c in next, split(ctl, ",") do
            if c == "cpu" or c == "memory" then
              local base, rel = dir_of(root, m[c], path)
              if base then g[c] = { 1, base, rel } end -- v1 wins where set
            end
          end
        end
      end
    end
  end
  cache[key] = g
  return g
end

-- The group's directory and each of its ancestors up to the mount, deepest
-- first.
local function lineage(grp)
  local base, path, out = grp[2], grp[3], {}
  while true do
    out[#out + 1] = path == "/" and base or base .. path
    if path == "/" then break end
    path = path:match("^(.*)/[^/]*$")
    if path == "" then path = "/" end
  end
  return out
end

--- The CPU quota of this process's group as a CPU count, ceil(quota /
--- period), the lowest over the group and its ancestors; nil when none.
function G.quota(opts)
  local root = root_of(opts)
  local grp = groups(root).cpu
  if not grp then return nil end
  local best = huge
  for _, d in next, lineage(grp) do
    local q, p
    if grp[1] == 2 then
      local s = slurp(d .. "/cpu.max")
      if s then q, p = s:match("^%s*(%d+)%s+(%d+)") end
    else
      q = tonumber(slurp(d .. "/cpu.cfs_quota_us") or "")
      p = tonumber(slurp(d .. "/cpu.cfs_period_us") or "")
    end
    q, p = tonumber(q), tonumber(p)
    if q and p and q > 0 and p > 0 then
      local n = ceil(q / p)
      if n < best then best = n end
    end
  end
  if best == huge then return nil end
  return best
end

--- CPUs this process may use: min(affinity, the group's quota), at least 1.
function G.ncpu(opts)
  if opts ~= nil and type(opts) ~= "table" then
    error("parmap.ncpu: bad argument #1 'opts' (table or nil expected, got "
      .. type(opts) .. ")", 2)
  end
  if opts and opts.root ~= nil and type(opts.root) ~= "string" then
    error("parmap.ncpu: bad option 'root' (string expected, got "
      .. type(opts.root) .. ")", 2)
  end
  local n = core.ncpu()
  local q = G.quota(opts)
  if q and q < n then n = q end
  if n < 1 then n = 1 end
  return n
end

--- The OOM killer's count of kills in this process's group (and those
--- below it), or nil where it is not to be read.
function G.oom_kills(opts)
  local root = root_of(opts)
  local grp = groups(root).memory
  if not grp then return nil end
  local d = lineage(grp)[1]
  local s = slurp(d .. (grp[1] == 2 and "/memory.events" or "/memory.oom_control"))
  return s and tonumber(s:match("oom_kill%s+(%d+)")) or nil
end

--- A watch over the OOM count from now on: returns a function that tells,
--- for a worker killed by SIGKILL, whether the OOM killer did it (the
--- count grew past the kills already put down to it).
function G.oom_watch()
  local base = G.oom_kills()
  local seen = 0
  if not base then return function() return false end end
  return function()
    local now = G.oom_kills()
    if now and now - base > seen then
      seen = seen + 1
      return true
    end
    return false
  end
end

return G
