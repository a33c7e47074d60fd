-- output = "direct" | "lines" | "item": where the workers' stdout and
-- stderr go. "lines": whole lines (optionally prefixed) through the engine,
-- above a progress bar; "item": each item's text with its result, in the
-- loop's order. A death keeps what was written.
local parmap = require "parmap"
local H = require "helpers"
local F = require "faults_helpers"

-- Run src in a fresh lua5.4; returns its stdout, its stderr and the
-- exit status.
local function run(src)
  local path, errpath = H.script(src), os.tmpname()
  local p = io.popen(H.lua_cmd(path) .. " 2>" .. errpath)
  local out = p:read("a")
  local _, _, code = p:close()
  local f = assert(io.open(errpath))
  local err = f:read("a")
  f:close()
  os.remove(path)
  os.remove(errpath)
  return out, err, code
end

local function lines_of(s)
  local t = {}
  for l in s:gmatch("([^\n]*)\n") do t[#t + 1] = l end
  return t
end

-- Two workers write 40-character lines one character at a time (each
-- flushed: a byte a write), with small sleeps between: with "direct" their
-- bytes mix mid-line.
local WRITER = [[
local parmap = require "parmap"
local core = require "parmap.core"
local function nap() local t = core.now() while core.now() - t < 0.0002 do end end
local function fn(x)
  local c = string.char(64 + parmap.worker())
  for _ = 1, 5 do
    for _ = 1, 40 do io.write(c) io.flush() nap() end
    io.write("\n") io.flush()
    io.stderr:write("e", c, "\n")
  end
  return x
end
local n = 0
for i in parmap(fn, {1, 2, 3, 4, 5, 6}, {N = 2, chunksize = 1, OPTS}) do
  n = n + 1
end
print("done", n)
]]

describe("output = 'lines'", function()
  it("writes every line whole, each of one worker", function()
    local out, err, code = run((WRITER:gsub("OPTS", "output = 'lines'")))
    assert.equal(0, code, err)
    local ls = lines_of(out)
    assert.equal("done\t6", ls[#ls])
    assert.equal(31, #ls) -- 6 items x 5 lines, and "done"
    for k = 1, 30 do
      assert.truthy(ls[k]:match("^A+$") or ls[k]:match("^B+$"), ls[k])
      assert.equal(40, #ls[k])
    end
    local e = lines_of(err)
    assert.equal(30, #e)
    for _, l in ipairs(e) do assert.truthy(l == "eA" or l == "eB", l) end
  end)

  it("prefixes each line as asked: true is '[%d] ', a string its own", function()
    local out, err, code = run((WRITER:gsub("OPTS",
      "output = 'lines', output_prefix = true")))
    assert.equal(0, code, err)
    local ls = lines_of(out)
    for k = 1, 30 do
      local w, text = ls[k]:match("^%[(%d)%] (%u+)$")
      assert.truthy(w, ls[k])
      assert.equal(string.char(64 + tonumber(w)), text:sub(1, 1))
      assert.equal(text:sub(1, 1):rep(40), text)
    end
    for _, l in ipairs(lines_of(err)) do assert.truthy(l:match("^%[%d%] e%u$"), l) end
    out, err, code = run((WRITER:gsub("OPTS",
      "output = 'lines', output_prefix = 'w%%d 100%%%%: '")))
    assert.equal(0, code, err)
    assert.truthy(lines_of(out)[1]:match("^w[12] 100%%: [AB]+$"), out)
  end)

  it("writes a partial last line at the end, and a dead worker's", function()
    local out, err, code = run([[
      local parmap = require "parmap"
      local ok, e = pcall(function()
        for _ in parmap(function(x)
          io.write("item ", x, " no newline")
          if x == 3 then
            io.stdout:flush()
            os.execute("kill -9 " .. require("parmap.core").pid())
          end
          return x
        end, {1, 2, 3}, {N = 1, output = "lines", exception = "raise"}) do end
      end)
      print(ok, type(e) == "table" and e.kind)
    ]])
    assert.equal(0, code, err)
    assert.truthy(out:find("item 1 no newlineitem 2 no newlineitem 3 no newline\n", 1, true), out)
    assert.truthy(out:find("false\tdied\n", 1, true), out)
  end)

  it("ends though a process the worker forked holds its pipes", function()
    local pidfile = H.tmpname()
    local t0 = F.now()
    local out, err, code = run(([[
      local parmap = require "parmap"
      for _ in parmap(function(x)
        print("before")
        -- the shell's background sleep keeps fd 1 and 2 open for 60 s
        os.execute("sleep 60 & echo $! > %s")
        print("after")
        return x
      end, {1}, {N = 1, output = "lines"}) do end
      print("done")
    ]]):format(pidfile))
    local f = io.open(pidfile)
    local pid = f and f:read("n")
    if f then f:close() end
    os.remove(pidfile)
    if pid then os.execute("kill " .. math.tointeger(pid) .. " 2>/dev/null") end
    assert.equal(0, code, err)
    assert.equal("before\nafter\ndone\n", out)
    assert.truthy(F.now() - t0 < 40, "the map waited for the grandchild")
  end)

  it("keeps the progress bar whole on a terminal (tmux)", function()
    if os.execute("command -v tmux >/dev/null 2>&1") ~= true then
      pending("tmux is not installed")
      return
    end
    local done = H.tmpname()
    local path = H.script(([[
      local parmap = require "parmap"
      local core = require "parmap.core"
      for _ in parmap(function(x)
        local t = core.now() while core.now() - t < 0.02 do end
        print("line " .. x)
        return x
      end, (function() local t = {} for i = 1, 40 do t[i] = i end return t end)(),
      {N = 2, chunksize = 1, output = "lines", progress = "bar"}) do
        local t = core.now() while core.now() - t < 0.01 do end
      end
      io.open(%q, "w"):close()
    ]]):format(done))
    local sock = "parmap-output-spec-" .. require("parmap.core").pid()
    local function tmux(args)
      return os.execute("tmux -L " .. sock .. " " .. args .. " >/dev/null 2>&1")
    end
    assert(tmux("new-session -d -x 120 -y 60 " .. ("%q"):format(
      H.lua_cmd(path) .. "; sleep 60")))
    local ok, screen = pcall(function()
      local deadline = F.now() + 30 * F.slow
      while not io.open(done) do
        assert(F.now() < deadline, "the script did not end")
        os.execute("sleep 0.1")
      end
      local p = io.popen("tmux -L " .. sock .. " capture-pane -p -J")
      local s = p:read("a")
      p:close()
      return s
    end)
    tmux("kill-server")
    os.remove(path)
    os.remove(done)
    assert(ok, screen)
    local seen = {}
    for _, l in ipairs(lines_of(screen)) do
      local n = l:match("^line (%d+)$")
      if n then
        seen[tonumber(n)] = true
      else
        -- anything else is the bar's line (only the last one is left)
        assert.truthy(l == "" or l:match("^bar "), "a mixed line: " .. l)
      end
    end
    for i = 1, 40 do assert.truthy(seen[i], "line " .. i .. "\n" .. screen) end
    assert.truthy(screen:find("bar [", 1, true) and screen:find("40/40", 1, true), screen)
  end)

  it("wakes m:fd() for a line while no result is ready", function()
    local gate = H.tmpname()
    local out, err, code = run(([[
      local parmap = require "parmap"
      local T = require "parmap_testhelper"
      local m = parmap.start(function(x)
        print("hello from " .. x)
        while not io.open(%q) do os.execute("sleep 0.05") end
        return x
      end, {1}, {N = 1, output = "lines"})
      local fd = m:fd()
      local t0 = require("parmap.core").now()
      -- the line alone wakes the fd: the item waits for the gate
      assert(T.poll(fd, 20000), "m:fd() stayed quiet")
      assert(m:poll() == false, "no result can be ready yet")
      io.stderr:write("woke\n")
      io.open(%q, "w"):close()
      while true do
        assert(T.poll(fd, 20000))
        local i, v = m:poll()
        if i == nil then break end
        if i then io.stderr:write("got ", i, " ", v, "\n") end
      end
    ]]):format(gate, gate))
    os.remove(gate)
    assert.equal(0, code, err)
    assert.equal("hello from 1\n", out)
    assert.truthy(err:find("woke\ngot 1 1\n", 1, true), err)
  end)
end)

describe("output = 'item'", function()
  it("writes each item's text with its result, in the loop's order", function()
    local out, err, code = run([[
      local parmap = require "parmap"
      local core = require "parmap.core"
      for i, r in parmap(function(x)
        -- later items finish first: the order comes from the loop
        local t = core.now() while core.now() - t < (20 - x) * 0.002 do end
        io.write("out ", x, "\n")
        print("print", x)
        io.stderr:write("err ", x, "\n")
        return x * 10
      end, (function() local t = {} for i = 1, 20 do t[i] = i end return t end)(),
      {N = 3, chunksize = 1, output = "item"}) do
        print("result", i, r)
      end
    ]])
    assert.equal(0, code, err)
    local want, werr = {}, {}
    for i = 1, 20 do
      want[#want + 1] = "out " .. i
      want[#want + 1] = "print\t" .. i
      want[#want + 1] = "result\t" .. i .. "\t" .. i * 10
      werr[#werr + 1] = "err " .. i
    end
    assert.same(want, lines_of(out))
    assert.same(werr, lines_of(err))
  end)

  it("puts what a dying item wrote in its error (output) and shows it", function()
    local out, err, code = run([[
      local parmap = require "parmap"
      local core = require "parmap.core"
      for i, a, b in parmap(function(x)
        io.write("before ", x, "\n")
        io.stderr:write("warn ", x, "\n")
        if x == 2 then
          io.write("last words")
          io.stdout:flush()
          io.stderr:flush()
          os.execute("kill -9 " .. core.pid())
        end
        return x
      end, {1, 2, 3}, {N = 2, chunksize = 1, output = "item", exception = "return"}) do
        if type(a) == "table" then
          print("error", i, a.kind, a.signal, ("%q"):format(a.output),
                ("%q"):format(a.output_stderr))
        else
          print("result", i, a)
        end
      end
    ]])
    assert.equal(0, code, err)
    -- %q writes a newline as backslash-newline
    assert.same({ "before 1", "result\t1\t1", "before 2",
      'last wordserror\t2\tdied\t9\t"before 2\\', 'last words"\t"warn 2\\', '"',
      "before 3", "result\t3\t3" }, lines_of(out))
    assert.same({ "warn 1", "warn 2", "warn 3" }, lines_of(err))
  end)

  it("writes what init wrote before its error", function()
    local out, err, code = run([[
      local parmap = require "parmap"
      local ok, e = pcall(function()
        for _ in parmap(function(x) return x end, {1, 2}, {N = 1, output = "item",
          init = function() print("init here") error("no") end}) do end
      end)
      print(ok, e.kind)
    ]])
    assert.equal(0, code, err)
    assert.equal("init here\nfalse\tinit\n", out)
  end)

  it("works with an iterator, unordered, stats and retries", function()
    local out, err, code = run([[
      local parmap = require "parmap"
      local seen = {}
      local n = 0
      local function gen()
        n = n + 1
        if n <= 30 then return n end
      end
      local m = parmap.start(function(x)
        io.write("item ", x, "\n")
        return x
      end, gen, {N = 2, ordered = false, stats = true, output = "item", retries = 1})
      for i, v in m.next, m do
        io.write("got ", i, "\n")
      end
      print(m:stats().items)
    ]])
    assert.equal(0, code, err)
    local ls = lines_of(out)
    assert.equal(61, #ls)
    for k = 1, 60, 2 do
      local a, b = ls[k]:match("^item (%d+)$"), ls[k + 1]:match("^got (%d+)$")
      assert.truthy(a and a == b, ls[k] .. " / " .. ls[k + 1])
    end
    assert.equal("30", ls[61])
  end)

  it("writes what an item wrote before it raised, before its error", function()
    local out, err, code = run([[
      local parmap = require "parmap"
      local ok, e = pcall(function()
        for i in parmap(function(x)
          io.write("pre ", x, "\n")
          if x == 2 then error("boom") end
          return x
        end, {1, 2, 3}, {N = 2, chunksize = 1, output = "item"}) do
          print("got", i)
        end
      end)
      print(ok, e.kind, e.index)
    ]])
    assert.equal(0, code, err)
    assert.same({ "pre 1", "got\t1", "pre 2", "false\terror\t2" }, lines_of(out))
  end)
end)

describe("output options", function()
  it("runs N = 1 in a worker process, as timeout does", function()
    local out, _, code = run([[
      local parmap = require "parmap"
      local core = require "parmap.core"
      local me = core.pid()
      for i, pid in parmap(function() print("x") return core.pid() end, {1},
          {N = 1, output = "item"}) do
        print(pid ~= me)
      end
    ]])
    assert.equal(0, code)
    assert.equal("x\ntrue\n", out)
  end)

  it("rejects bad values with the option's name", function()
    local function msg(opts)
      local ok, e = pcall(parmap.parmap, function() end, {1}, opts)
      assert.is_false(ok)
      return tostring(e)
    end
    assert.truthy(msg({ output = "line" }):find("bad option 'output'", 1, true))
    assert.truthy(msg({ output = true }):find("bad option 'output'", 1, true))
    assert.truthy(msg({ output_prefix = true }):find("needs output = 'lines'", 1, true))
    assert.truthy(msg({ output = "lines", output_prefix = 3 }):find(
      "bad option 'output_prefix'", 1, true))
    assert.truthy(msg({ output = "lines", output_prefix = "%s" }):find(
      "'%d'", 1, true))
    assert.truthy(msg({ output = "lines", output_prefix = ("x"):rep(64) }):find(
      "at most 63", 1, true))
  end)

  it("leaks no fd: lines, item, a death, a break", function()
    local _, before = H.fds()
    for _, mode in ipairs { "lines", "item" } do
      for _ in parmap(function(x) return x end, H.range(50), { N = 2, output = mode }) do end
      for i in parmap(function(x) return x end, H.range(50), { N = 2, output = mode }) do
        if i == 3 then break end
      end
      local ok = pcall(function()
        for _ in parmap(function(x)
          if x == 5 then os.exit(1) end
          return x
        end, H.range(10), { N = 2, output = mode, chunksize = 1 }) do end
      end)
      assert.is_false(ok)
    end
    local _, after = H.fds()
    assert.equal(before, after)
  end)
end)

local MPI = require "mpi_helpers"
local describe_mpi = MPI.describer(describe, pending)

describe_mpi("output under parmap-mpi", function()
  it("refuses 'lines' and 'item' with a clear error; 'direct' runs", function()
    local out, code = MPI.mpirun([[
      local parmap = require "parmap"
      for _, mode in ipairs { "lines", "item" } do
        local ok, e = pcall(function()
          for _ in parmap(function(x) return x end, {1, 2}, {output = mode}) do end
        end)
        print(mode, ok, e)
      end
      local n = 0
      for _ in parmap(function(x) return x end, {1, 2, 3}, {output = "direct"}) do
        n = n + 1
      end
      print("direct", n)
    ]], 2)
    assert.equal(0, code, out)
    for _, mode in ipairs { "lines", "item" } do
      assert.truthy(out:find(mode .. "\tfalse\t[^\n]*option 'output' = '" .. mode
        .. "' needs the fork backend"), out)
    end
    assert.truthy(out:find("direct\t3", 1, true), out)
  end)
end)
