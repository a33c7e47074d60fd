-- spec/helpers.lua: shared helpers for the specs.
local core = require "parmap.core"

local H = {}

-- Open fds of this process, as a set of numbers, and their count. Read in
-- this process (spec/testhelper.c): `ls /proc/PID/fd` through io.popen raced
-- with popen itself, which closes its own pipe end while ls runs. Garbage is
-- collected first: a handle another spec dropped would otherwise close (or
-- not) at the whim of the collector, between two counts.
function H.fds()
  collectgarbage()
  collectgarbage()
  local set, n = {}, 0
  for fd in pairs(assert(require("parmap_testhelper").fds())) do
    set[fd] = true
    n = n + 1
  end
  return set, n
end

-- Child processes of this process (pids), zombies included.
function H.children()
  local kids = {}
  local f = io.open("/proc/" .. core.pid() .. "/task/" .. core.pid() .. "/children")
  if f then
    for pid in f:read("a"):gmatch("%d+") do kids[#kids + 1] = tonumber(pid) end
    f:close()
  end
  return kids
end

-- The command line that runs a Lua 5.4 script with this build's paths.
function H.lua_cmd(script_path)
  return string.format("LUA_PATH=%q LUA_CPATH=%q lua5.4 %q",
    package.path, package.cpath, script_path)
end

-- Write src to a temporary file and return its path.
-- A fresh path (nothing there) that every simulated host sees too.
function H.tmpname()
  local path = os.tmpname()
  local shared = os.getenv("PARMAP_SPEC_SHARED")
  os.remove(path)
  if not shared then return path end
  return shared .. "/" .. path:match("[^/]+$")
end

function H.script(src)
  local path = os.tmpname()
  -- a directory every simulated host sees (.ci/cluster.sh: each has its
  -- own /tmp)
  local shared = os.getenv("PARMAP_SPEC_SHARED")
  if shared then
    os.remove(path)
    path = shared .. "/" .. path:match("[^/]+$")
  end
  local f = assert(io.open(path, "w"))
  f:write(src)
  f:close()
  return path
end

-- Run a Lua script (source text) in a new lua5.4, after the environment
-- assignments env (a string, optional); returns its output (stdout and
-- stderr together) and its exit status.
function H.run_lua(src, env)
  local path = H.script(src)
  local p = io.popen((env and env .. " " or "") .. H.lua_cmd(path) .. " 2>&1")
  local out = p:read("a")
  local _, _, code = p:close()
  os.remove(path)
  return out, code
end

-- A fresh empty directory (under /tmp), and its removal.
function H.tmpdir()
  local path = os.tmpname()
  os.remove(path)
  assert(os.execute("mkdir " .. path))
  return path
end

function H.rmdir(dir) os.execute("rm -rf " .. dir) end

function H.range(n)
  local t = {}
  for i = 1, n do t[i] = i end
  return t
end

-- Collect a parmap loop into {[i] = table.pack(results...)} and the order
-- in which indices came.
function H.collect(iter, s, c, closer)
  local got, order = {}, {}
  local _ <close> = closer
  local function take(i, ...)
    if i == nil then return nil end
    got[i] = table.pack(...)
    order[#order + 1] = i
    return i
  end
  while take(iter(s, c)) do end
  return got, order
end

return H
