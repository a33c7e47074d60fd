-- examples/host_sigchld.lua: run by `host --sigchld examples/host_sigchld.lua`
-- (or `--sigchld=ignore`). The host's SIGCHLD handler reaps every child that
-- ends with waitpid(-1), parmap's workers included (or the kernel does, with
-- SIGCHLD ignored). parmap must neither hang nor lose a result, and a worker
-- that died holding an item is reported, however it was reaped. Prints one
-- line per check and ends with "host: ok".
local parmap = require "parmap"

local function check(ok, what)
  if not ok then error("host_sigchld: " .. what, 2) end
end

local function squares(n)
  local t = {}
  for i = 1, n do t[i] = i * i end
  return t
end

-- Many maps, of every shape: each ends with its workers exiting, each
-- exit a SIGCHLD the host's handler answers by reaping.
local offset = 7 -- an upvalue of the mapped closures
local maps = 0
for round = 1, 40 do
  local n = round * 13
  local items = {}
  for i = 1, n do items[i] = i end
  local out = parmap.map(function(x) return x * x + offset end, items, { N = 2 })
  for i = 1, n do check(out[i] == i * i + offset, "map " .. round .. " item " .. i) end
  local seen, count = {}, 0
  local k = 0
  local function gen()
    k = k + 1
    if k <= n then return k end
  end
  for i, r in parmap(function(x) return x * x end, gen, { N = 2, ordered = false }) do
    check(r == i * i and not seen[i], "unordered map " .. round .. " item " .. i)
    seen[i] = true
    count = count + 1
  end
  check(count == n, "unordered map " .. round .. " lost results")
  maps = maps + 2
end
print("maps: " .. maps .. " maps, every result delivered")

-- break stops the workers at once; they are reaped by one side or the other
for _ = 1, 10 do
  for i in parmap(function(x) return x end, squares(1000), { N = 2 }) do
    if i == 3 then break end
  end
end
print("break: ok")

-- A worker that dies while it holds items (item 6, in the middle of a
-- chunk): the item it ran fails with kind "died", whoever took its exit
-- status; the items it held besides are run again, and every other result
-- is delivered.
local reaped_msgs, status_msgs = 0, 0
for _ = 1, 20 do
  local out = parmap.map(function(x)
    if x == 36 then os.exit(7) end
    return x + 1
  end, squares(60), { N = 2, exception = "return", chunksize = 4 })
  for i = 1, 60 do
    local r = out[i]
    if i == 6 then
      check(parmap.iserror(r) and r.kind == "died", "item 6 did not fail")
      if r.message:find("was reaped by someone else", 1, true) then
        reaped_msgs = reaped_msgs + 1
      elseif r.message:find("exited with status 7", 1, true) then
        status_msgs = status_msgs + 1
      else
        error("host_sigchld: unexpected message: " .. r.message)
      end
    else
      check(r == i * i + 1, "item " .. i .. " of a map with a death")
    end
  end
end
print("deaths: item 6 failed 20 times, every other result delivered")
io.stderr:write(string.format("deaths seen as reaped by the host: %d, as exit status: %d\n",
  reaped_msgs, status_msgs))

-- A timed-out worker is killed; the host reaps it, and the item still
-- fails with kind "timeout".
local out = parmap.map(function(x)
  if x == 3 then
    local t = os.clock() + 30
    while os.clock() < t do end
  end
  return x
end, { 1, 2, 3, 4 }, { N = 2, exception = "return", timeout = 1 })
check(parmap.iserror(out[3]) and out[3].kind == "timeout", "item 3 did not time out")
check(out[1] == 1 and out[2] == 2 and out[4] == 4, "a timeout lost results")
print("timeout: ok")

-- ReturnProcess: one call in a forked child, its values on join.
for _ = 1, 10 do
  local p = parmap.ReturnProcess(function(a) return a * offset end, { args = { 6 } })
  p:start()
  check(p:join() == 42, "ReturnProcess lost its result")
end
print("ReturnProcess: ok")

if host.sigchld == "reap" then
  check(host.reaped() > 0, "the host's handler reaped no worker")
  io.stderr:write("children reaped by the host's handler: " .. host.reaped() .. "\n")
end
print("host: ok")
