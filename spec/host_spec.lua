-- spec/host_spec.lua: a C program that embeds Lua and links libparmap.a
-- (examples/host.c, built by `make hosts` into $PARMAP_BUILD/examples).
local build = os.getenv("PARMAP_BUILD") or "build"

local function exists(path)
  local f = io.open(path, "rb")
  if f then f:close() end
  return f ~= nil
end

local root
do -- closed at once: an unclosed popen leaves a child the other specs would see
  local p = assert(io.popen("pwd"))
  root = p:read("l")
  p:close()
end
local host = root .. "/" .. build .. "/examples/host"

-- Run the host in an empty directory; returns stdout, stderr, exit code.
local function run_host(args)
  assert(exists(host), host .. " is missing: run `make hosts` (make test does)")
  local dir = os.tmpname()
  os.remove(dir)
  assert(os.execute("mkdir " .. dir))
  local errf = dir .. "/stderr"
  local p = io.popen(string.format("cd %q && timeout 300 %q %s 2>%q", dir, host, args, errf))
  local out = p:read("a")
  local _, _, code = p:close()
  local f = io.open(errf)
  local err = f and f:read("a") or ""
  if f then f:close() end
  os.execute("rm -rf " .. dir)
  return out, err, code
end

local script = root .. "/examples/host_sigchld.lua"

describe("a C host linked with libparmap.a", function()
  it("gets the whole module from one luaL_requiref, with no module file on disk", function()
    -- the host empties package.path and package.cpath before registering
    local out, err, code = run_host("")
    assert.are.equal("", err)
    assert.are.equal(0, code)
    assert.are.equal("101 104 109 116 125 136 149 164 181 200\nB\n", out)
  end)

  it("serves parmap.progress from memory too: a progress line and parmap.print", function()
    local path = os.tmpname()
    local f = assert(io.open(path, "w"))
    f:write([[
local parmap = require 'parmap'
local out = parmap.map(function(x) return x + 1 end, { 1, 2, 3 }, { N = 2, progress = 'host' })
parmap.print('sum', out[1] + out[2] + out[3])
]])
    f:close()
    local out, err, code = run_host(string.format("%q", path))
    os.remove(path)
    assert.are.equal(0, code, err)
    assert.are.equal("sum\t9\n", out)
    assert.matches("^host %[#+%] 3/3 100%% .* in %d%d:%d%d\n$", err)
  end)

  local expected = "maps: 80 maps, every result delivered\n" ..
    "break: ok\n" ..
    "deaths: item 6 failed 20 times, every other result delivered\n" ..
    "timeout: ok\n" ..
    "ReturnProcess: ok\n" ..
    "host: ok\n"

  it("reports a worker's death with its exit status when nobody else reaps", function()
    local out, err, code = run_host(string.format("%q", script))
    assert.are.equal(expected, out, err)
    assert.are.equal(0, code)
    assert.is_truthy(err:find("deaths seen as reaped by the host: 0, as exit status: 20", 1, true), err)
  end)

  describe("with its own SIGCHLD handler reaping with waitpid(-1)", function()
    it("neither hangs nor loses results, and a death still fails its item", function()
      local out, err, code = run_host(string.format("--sigchld %q", script))
      assert.are.equal(expected, out, err)
      assert.are.equal(0, code)
      local n = tonumber(err:match("children reaped by the host's handler: (%d+)"))
      assert.is_true(n ~= nil and n > 0, err)
    end)
  end)

  describe("with SIGCHLD ignored (the kernel reaps every child)", function()
    it("names the worker reaped by someone else, and loses nothing", function()
      local out, err, code = run_host(string.format("--sigchld=ignore %q", script))
      assert.are.equal(expected, out, err)
      assert.are.equal(0, code)
      assert.is_truthy(err:find("deaths seen as reaped by the host: 20, as exit status: 0", 1, true), err)
    end)
  end)
end)
