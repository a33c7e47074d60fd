-- spec/faults_helpers.lua: what the fault-injection specs (faults_*_spec.lua)
-- share: the test-only C module, "stopped" checks, subprocesses with a time
-- limit, and time bounds that stretch under ASan and valgrind.
local core = require "parmap.core"
local H = require "helpers"
local T = require "parmap_testhelper"
local assert = require "luassert"

local F = { T = T, H = H }

local preload = os.getenv("LD_PRELOAD") or ""
F.asan = preload:find("asan", 1, true) ~= nil
F.valgrind = os.getenv("PARMAP_VALGRIND") ~= nil and os.getenv("PARMAP_VALGRIND") ~= ""
-- "within a second" is checked as "within F.bound(1)": generous, and more
-- so under the sanitizers, so that a loaded 2-core machine does not fail it.
F.slow = F.valgrind and 20 or (F.asan and 3 or 1)
function F.bound(seconds) return 3 * seconds * F.slow end

F.now = core.now

-- The open fds of this process as {[fd] = target}, read without forking,
-- after a full collection (see H.fds).
function F.fds()
  collectgarbage()
  collectgarbage()
  local t = assert(T.fds())
  return t
end

-- What "stopped" is compared against: fds and children now.
function F.snapshot()
  return { fds = F.fds(), kids = H.children() }
end

local function fdlist(t)
  local out = {}
  for fd, target in pairs(t) do out[#out + 1] = fd .. "=" .. target end
  table.sort(out)
  return table.concat(out, " ")
end

-- Every worker reaped (no child at all, zombies included: /proc lists
-- them) and the same fds open as in `before`.
function F.assert_stopped(before)
  assert.same(before and before.kids or {}, H.children())
  if before then assert.equal(fdlist(before.fds), fdlist(F.fds())) end
end

-- Wait up to `limit` seconds for pred() to hold; returns it and the time.
function F.within(limit, pred)
  local t0 = core.now()
  repeat
    local v = pred()
    if v then return v, core.now() - t0 end
    T.sleep(0.01)
  until core.now() - t0 > limit
  return pred(), core.now() - t0
end

-- Markers between processes (the parent, workers, children): a file that
-- one side creates and the other waits for, asleep, so that an order of
-- events is certain instead of hoped for from timing.
function F.marker()
  local path = os.tmpname()
  os.remove(path)
  return path
end
function F.mark(path)
  assert(io.open(path, "w")):close()
end
function F.marked(path)
  local f = io.open(path)
  if f then f:close() end
  return f ~= nil
end
-- Wait asleep until path exists (true), or give up after `limit` seconds
-- (false): a generous limit, so that a regression fails instead of hanging.
function F.await(path, limit)
  local t0 = core.now()
  while not F.marked(path) do
    if core.now() - t0 > (limit or 60) then return false end
    T.sleep(0.005)
  end
  return true
end

-- Run Lua source in a new lua5.4 under `timeout` (seconds, default 120):
-- returns its output (stdout and stderr together), exit code and how long
-- it took. A run killed by timeout exits 124 or 137.
function F.run(src, limit)
  local path = H.script(src)
  local t0 = core.now()
  local p = io.popen(string.format("timeout -k 2 %d env %s 2>&1",
    limit or 120, H.lua_cmd(path)))
  local out = p:read("a")
  local _, _, code = p:close()
  os.remove(path)
  return out, code, core.now() - t0
end

-- Spawn Lua source on a pseudo-terminal: returns a handle with pid, fd,
-- read_until(pattern, limit), wait(limit) and close().
function F.pty(src)
  local path = H.script(src)
  local pid, fd = assert(T.pty_spawn("exec env " .. H.lua_cmd(path)))
  local h = { pid = pid, fd = fd, out = "" }
  function h.read_until(pattern, limit)
    local t0 = core.now()
    while not h.out:find(pattern) and core.now() - t0 < limit do
      local s = T.read(fd, 50)
      if s == nil then break end
      h.out = h.out .. s
    end
    return h.out:find(pattern) ~= nil
  end
  function h.drain()
    while true do
      local s = T.read(fd, 50)
      if s == nil or s == "" then break end
      h.out = h.out .. s
    end
    return h.out
  end
  function h.wait(limit)
    local how, code = T.wait(pid, math.floor(limit * 1000))
    if how then h.reaped = true end
    return how, code
  end
  function h.close()
    if not h.reaped then
      T.kill(pid, T.SIGKILL)
      T.wait(pid, -1)
      h.reaped = true
    end
    if h.fd then T.close(fd); h.fd = nil end
    os.remove(path)
  end
  return h
end

-- The pids listed after `tag` on a line of s: "WORKERS 12 13" -> {12, 13}.
function F.pids(s, tag)
  local line = s:match(tag .. "([%d ]*)")
  local t = {}
  for pid in (line or ""):gmatch("%d+") do t[#t + 1] = tonumber(pid) end
  return t
end

-- Run `src` on a pseudo-terminal; once it prints a line "<tag> pid...",
-- type Ctrl-C: it must exit with status 1 within F.bound(1), with Lua's
-- "interrupted!", and every pid it named must be gone within F.bound(1).
function F.ctrl_c(src, tag)
  local h = F.pty(src)
  local ok, why = pcall(function()
    assert.is_true(h.read_until(tag .. "[%d ]+\r?\n", F.bound(10)), h.out)
    local pids = F.pids(h.out, tag)
    assert.is_true(#pids >= 1)
    T.sleep(0.2)
    local t0 = core.now()
    assert(T.write(h.fd, "\3"))
    local how, code = h.wait(F.bound(1))
    local took = core.now() - t0
    h.drain()
    assert.equal("exit", how, h.out)
    assert.equal(1, code)
    assert.is_true(took < F.bound(1), "took " .. took)
    assert.matches("interrupted!", h.out)
    for _, pid in ipairs(pids) do
      assert.is_true(F.within(F.bound(1), function() return not T.alive(pid) end),
        "pid " .. pid .. " still alive")
    end
  end)
  h.close()
  if not ok then error(why, 0) end
end

-- Resident set size and its peak (VmHWM), in KiB, of this process.
function F.rss()
  local f = assert(io.open("/proc/self/status"))
  local s = f:read("a")
  f:close()
  return tonumber(s:match("VmRSS:%s*(%d+)")), tonumber(s:match("VmHWM:%s*(%d+)"))
end

-- From inside fn: the worker's own socket (its only one).
function F.my_socket()
  local found
  for fd, target in pairs(T.fds()) do
    if target:match("^socket:") then
      assert(not found, "a worker holds more than one socket")
      found = fd
    end
  end
  return assert(found, "no socket")
end

-- Busy-wait, so that the item really runs in a worker for that long.
function F.spin(seconds)
  local t0 = core.now()
  while core.now() - t0 < seconds do end
end

return F
