-- A worker's life in the fork engine: init and finish, their bounds
-- (init_timeout, finish_timeout), the timeout clock around init, the runs
-- an item had wherever they happened (retries), one live process per
-- worker number under maxtasks, and forking under RLIMIT_NPROC.
local parmap = require "parmap"
local core = require "parmap.core"
local H = require "helpers"
local F = require "faults_helpers"
local T = F.T

local tmpdir, rmdir = H.tmpdir, H.rmdir

-- Count one more run of item x in dir; returns the count (this one included).
local function bump(dir, x)
  local path = dir .. "/" .. tostring(x)
  local f = io.open(path)
  local n = f and #f:read("a") or 0
  if f then f:close() end
  f = assert(io.open(path, "a"))
  f:write("x")
  f:close()
  return n + 1
end
local function runs(dir, x)
  local f = io.open(dir .. "/" .. tostring(x))
  if not f then return 0 end
  local n = #f:read("a")
  f:close()
  return n
end

describe("an init that dies", function()
  for _, how in ipairs({ "exits", "is killed" }) do
    it("fails the map as an init failure when it " .. how .. ", not an item", function()
      local dir = tmpdir()
      local before = F.snapshot()
      local ok, e = pcall(parmap.map, function(x)
        bump(dir, x)
        return x
      end, H.range(6), {
        N = 2, chunksize = 1, exception = "return",
        init = function(id)
          if id == 1 then
            if how == "exits" then os.exit(7) end
            T.kill(core.pid(), 9)
          end
        end,
      })
      F.assert_stopped(before)
      assert.is_false(ok)
      assert.is_true(parmap.iserror(e), tostring(e))
      assert.equal("init", e.kind)
      assert.equal(1, e.worker)
      assert.is_nil(e.index)
      assert.matches(how == "exits" and "exited with status 7 while running init"
        or "killed by signal 9 .* while running init", e.message)
      assert.matches("^parmap: init failed in worker 1 %(pid %d+%)", tostring(e))
      rmdir(dir)
    end)
  end
  it("names the worker under maxtasks too (a fresh process's init)", function()
    local dir = tmpdir()
    local ok, e = pcall(parmap.map, function(x) return x end, H.range(8), {
      N = 2, chunksize = 1, maxtasks = 2, exception = "return",
      init = function(id)
        -- the second process to hold a number dies in its init (8 items,
        -- 2 a process: some number has a second one)
        local mark = dir .. "/had" .. id
        if F.marked(mark) then os.exit(5) end
        F.mark(mark)
      end,
    })
    rmdir(dir)
    assert.is_false(ok)
    assert.equal("init", e.kind)
    assert.is_true(e.worker == 1 or e.worker == 2)
    assert.matches("exited with status 5 while running init", e.message)
  end)
end)

describe("retries count every run of an item, wherever it ran", function()
  local dir
  before_each(function() dir = tmpdir() end)
  after_each(function() rmdir(dir) end)

  it("raise, then die: R + 1 runs at most, attempts exact", function()
    -- run 1 raises (the worker retries it), run 2 kills the worker, run 3
    -- raises: that is all 3 runs of retries = 2
    local got = H.collect(parmap.parmap(function(x)
      local n = bump(dir, x)
      if x == 2 and n == 2 then os.exit(3) end
      if x == 2 then error("flaky " .. n) end
      return x
    end, H.range(3), { N = 2, chunksize = 1, retries = 2, exception = "return" }))
    assert.equal(3, runs(dir, 2))
    local e = got[2][1]
    assert.is_true(parmap.iserror(e))
    assert.equal("error", e.kind)
    assert.equal(3, e.attempts)
    assert.equal(1, got[1][1])
    assert.equal(3, got[3][1])
  end)
  it("raise, raise, then die: the death is the last run", function()
    local got = H.collect(parmap.parmap(function(x)
      local n = bump(dir, x)
      if x == 1 and n == 3 then os.exit(3) end
      if x == 1 then error("flaky " .. n) end
      return x
    end, H.range(2), { N = 2, chunksize = 1, retries = 2, exception = "return" }))
    assert.equal(3, runs(dir, 1))
    local e = got[1][1]
    assert.equal("died", e.kind)
    assert.equal(3, e.attempts)
    assert.equal(2, got[2][1])
  end)
  it("raise, then a result that cannot travel: attempts counts the raise", function()
    local got = H.collect(parmap.parmap(function(x)
      local n = bump(dir, x)
      if x == 1 and n == 1 then error("flaky") end
      if x == 1 then return print end
      return x
    end, H.range(2), { N = 2, chunksize = 1, retries = 3, exception = "return" }))
    assert.equal(2, runs(dir, 1))
    local e = got[1][1]
    assert.equal("value", e.kind)
    assert.equal(2, e.attempts)
  end)
  it("raise, then time out: the timeout is the last run", function()
    local got = H.collect(parmap.parmap(function(x)
      local n = bump(dir, x)
      if x == 1 and n == 1 then error("flaky") end
      if x == 1 then T.sleep(60) end
      return x
    end, H.range(2), { N = 2, chunksize = 1, retries = 1, timeout = F.slow,
                       exception = "return" }))
    assert.equal(2, runs(dir, 1))
    local e = got[1][1]
    assert.equal("timeout", e.kind)
    assert.equal(2, e.attempts)
  end)
end)

describe("timeout and init", function()
  it("does not count init: the first item's clock starts when init ended", function()
    local t = 2 * F.slow
    local got = parmap.map(function(x) return x * 2 end, H.range(6), {
      N = 2, chunksize = 1, timeout = t, exception = "return",
      init = function() T.sleep(t + 1) end, -- past the timeout
    })
    for i = 1, 6 do assert.equal(i * 2, got[i]) end
  end)
  it("nor for every fresh process under maxtasks", function()
    local t = 2 * F.slow
    local got = parmap.map(function(x) return x * 2 end, H.range(4), {
      N = 2, chunksize = 1, maxtasks = 1, timeout = t, exception = "return",
      init = function() T.sleep(t + 1) end,
    })
    for i = 1, 4 do assert.equal(i * 2, got[i]) end
  end)
  it("still times out an item after a slow init", function()
    local t = F.slow
    local got = parmap.map(function(x)
      if x == 2 then T.sleep(60) end
      return x
    end, H.range(3), {
      N = 2, chunksize = 1, timeout = t, exception = "return",
      init = function() T.sleep(t / 2) end,
    })
    assert.equal("timeout", got[2].kind)
    assert.equal(1, got[1])
    assert.equal(3, got[3])
  end)
end)

describe("init_timeout", function()
  it("bounds init: the map raises an init failure naming the bound", function()
    local before = F.snapshot()
    local t0 = core.now()
    local ok, e = pcall(parmap.map, function(x) return x end, H.range(4), {
      N = 2, init_timeout = 0.5, exception = "return",
      init = function(id) if id == 2 then T.sleep(60) end end,
    })
    assert.is_true(core.now() - t0 < 20 * F.slow)
    F.assert_stopped(before)
    assert.is_false(ok)
    assert.equal("init", e.kind)
    assert.equal(2, e.worker)
    assert.matches("init did not end within 0.5 s %(init_timeout", e.message)
  end)
  it("applies with N = 1 too (a worker process runs the items)", function()
    local ok, e = pcall(parmap.map, function(x) return x end, H.range(2), {
      N = 1, init_timeout = 0.5, init = function() T.sleep(60) end,
    })
    assert.is_false(ok)
    assert.equal("init", e.kind)
  end)
  it("leaves an init within it alone", function()
    assert.same({ 1, 2 }, parmap.map(function(x) return x end, { 1, 2 }, {
      N = 2, init_timeout = 30, init = function() end }))
  end)
end)

describe("finish_timeout", function()
  it("bounds a hung finish at the end of the map: SIGTERM, then SIGKILL", function()
    local out, code, took = F.run([[
      local parmap = require "parmap"
      local T = require "parmap_testhelper"
      local r = parmap.map(function(x) return x + 1 end, { 1, 2, 3, 4 }, {
        N = 2, finish_timeout = 0.5,
        finish = function(id)
          if id == 1 then T.ignore(15) end -- SIGTERM does nothing: SIGKILL then
          T.sleep(60)
        end })
      print("results " .. table.concat(r, ","))
    ]], 60)
    assert.equal(0, code, out)
    assert.matches("results 2,3,4,5", out)
    assert.matches("parmap worker [12] %(pid %d+%): finish did not end within 0.5 s", out)
    assert.is_true(took < 20 * F.slow, "took " .. took)
  end)
  it("bounds a recycled worker's finish: its replacement is not held for ever", function()
    local out, code, took = F.run([[
      local parmap = require "parmap"
      local T = require "parmap_testhelper"
      local r = parmap.map(function(x) return x + 1 end, { 1, 2, 3, 4, 5, 6 }, {
        N = 2, maxtasks = 1, chunksize = 1, finish_timeout = 0.5,
        finish = function() T.sleep(60) end })
      print("results " .. table.concat(r, ","))
    ]], 100)
    assert.equal(0, code, out)
    assert.matches("results 2,3,4,5,6,7", out)
    assert.is_true(took < 40 * F.slow, "took " .. took)
  end)
  -- SIGKILL: a sanitizer would catch SIGSEGV and abort instead
  it("a finish killed by a signal is said on stderr; the results stand", function()
    local out, code = F.run([[
      local parmap = require "parmap"
      local T = require "parmap_testhelper"
      local core = require "parmap.core"
      local r = parmap.map(function(x) return x end, { 1, 2, 3, 4 }, {
        N = 2, maxtasks = 1, chunksize = 1,
        finish = function(id) if id == 1 then T.kill(core.pid(), 9) end end })
      print("results " .. table.concat(r, ","))
    ]], 60)
    assert.equal(0, code, out)
    assert.matches("results 1,2,3,4", out)
    assert.matches("parmap worker 1 %(pid %d+%): killed by signal 9 [^\n]* in finish", out)
  end)
  it("lets a finish within it write what the loop reads", function()
    local dir = tmpdir()
    parmap.map(function(x) return x end, H.range(4), { N = 2, finish_timeout = 30,
      finish = function(id)
        T.sleep(0.2)
        assert(io.open(dir .. "/" .. id, "w")):close()
      end })
    assert.is_true(F.marked(dir .. "/1") and F.marked(dir .. "/2"))
    rmdir(dir)
  end)
end)

describe("worker numbers under maxtasks", function()
  it("are never held by two live processes: a replacement waits for finish", function()
    -- each process holds a lock file named by its number from init to the
    -- end of finish; a second holder finds it there
    local dir = tmpdir()
    local got = parmap.map(function(x) return { x, (parmap.worker()) } end, H.range(8), {
      N = 2, chunksize = 1, maxtasks = 1,
      init = function(id)
        local lock = dir .. "/lock" .. id
        if F.marked(lock) then assert(io.open(dir .. "/clash" .. id, "w")):close() end
        assert(io.open(lock, "w")):close()
      end,
      finish = function(id)
        T.sleep(0.3) -- a window a replacement that did not wait would hit
        os.remove(dir .. "/lock" .. id)
      end,
    })
    for i = 1, 8 do
      assert.equal(i, got[i][1])
      assert.is_true(got[i][2] == 1 or got[i][2] == 2)
    end
    assert.is_false(F.marked(dir .. "/clash1"), "two live processes were worker 1")
    assert.is_false(F.marked(dir .. "/clash2"), "two live processes were worker 2")
    rmdir(dir)
  end)
end)

describe("maxtasks under RLIMIT_NPROC", function()
  -- root ignores RLIMIT_NPROC: run the map as an unused uid whose only
  -- processes are the script's, with room for the script and N workers
  local uid = 40000 + core.pid() % 20000
  local function as_user(src, nproc)
    local path = H.script(src)
    os.execute("chmod 644 " .. path)
    local cmd = string.format("timeout -k 2 100 prlimit --nproc=%d:%d setpriv "
      .. "--reuid=%d --regid=%d --clear-groups env LUA_PATH=%q LUA_CPATH=%q "
      .. "lua5.4 %q 2>&1", nproc, nproc, uid, uid, package.path, package.cpath, path)
    local p = io.popen(cmd)
    local out = p:read("a")
    local _, _, code = p:close()
    os.remove(path)
    return out, code
  end
  local probe = as_user("print('ok')", 4)
  local can = probe:match("^ok") ~= nil

  it("does not fail the map: a replacement forks once the old one is reaped", function()
    if not can then
      pending("cannot run as another uid here: " .. probe)
      return
    end
    local out, code = as_user([[
      local parmap = require "parmap"
      local T = require "parmap_testhelper"
      local r = parmap.map(function(x) return x * 2 end, { 1, 2, 3, 4, 5, 6, 7, 8 }, {
        N = 2, maxtasks = 1, chunksize = 1,
        finish = function() T.sleep(0.1) end })
      print("results " .. table.concat(r, ","))
    ]], 3) -- lua5.4 and two workers
    assert.equal(0, code, out)
    assert.matches("results 2,4,6,8,10,12,14,16", out)
  end)
  it("nor when N asks for more than there is room for: a failed fork waits for a reap", function()
    if not can then
      pending("cannot run as another uid here: " .. probe)
      return
    end
    local out, code = as_user([[
      local parmap = require "parmap"
      local T = require "parmap_testhelper"
      local r = parmap.map(function(x) return x * 2 end, { 1, 2, 3, 4, 5, 6, 7, 8 }, {
        N = 3, maxtasks = 1, chunksize = 1,
        finish = function() T.sleep(0.1) end })
      print("results " .. table.concat(r, ","))
    ]], 3) -- lua5.4 and two workers: the third fork fails
    assert.equal(0, code, out)
    assert.matches("results 2,4,6,8,10,12,14,16", out)
  end)
end)

describe("the new options are checked", function()
  for _, name in ipairs({ "init_timeout", "finish_timeout" }) do
    it(name .. " is a positive number of seconds", function()
      for bad, shown in pairs({ [0] = "0", [-1] = "-1", x = 'string "x"', [true] = "boolean" }) do
        assert.error_matches(function()
          parmap.map(tostring, { 1 }, { N = 2, [name] = bad })
        end, "bad option '" .. name .. "' %(positive number of seconds expected, got "
          .. shown:gsub("%p", "%%%0") .. "%)")
      end
      assert.same({ "1" }, parmap.map(tostring, { 1 }, { N = 2, [name] = math.huge }))
    end)
  end
  it("a misspelt one gets the closest name", function()
    assert.error_matches(function()
      parmap.map(tostring, { 1 }, { finish_timout = 1 })
    end, "unknown option 'finish_timout' %(did you mean 'finish_timeout'%?%)")
    assert.error_matches(function()
      parmap.map(tostring, { 1 }, { inittimeout = 1 })
    end, "unknown option 'inittimeout' %(did you mean 'init_timeout'%?%)")
  end)
end)
