-- spec/progress_spec.lua: the progress display (lua/parmap/progress.lua),
-- parmap.print, and where a raised item error names the loop. The display
-- is checked twice: line by line with a fake clock and terminal (no
-- timing), and as a person sees it, on a tmux screen of 40 and 80 columns.
local parmap = require "parmap"
local core = require "parmap.core"
local P = require "parmap.progress"
local H = require "helpers"
local T = require "parmap_testhelper"

-- A bar on a fake terminal (or not): returns it, a clock to advance and
-- the list of what it wrote.
local function fake_bar(label, tty, width)
  local t, out = 0, {}
  local bar = P.bar(label, {
    tty = tty, now = function() return t end,
    width = function() return width or 80 end,
    write = function(s) out[#out + 1] = s end,
  })
  return bar, function(dt) t = t + dt end, out
end

local function state(t)
  t.label = t.label or false
  t.elapsed = t.elapsed or 12
  return t
end

local function cols(s) return utf8.len(s) or #s end

describe("the progress line", function()
  it("fits every width from 10 to 200 columns, leaving 3 columns free", function()
    local states = {
      state { label = "squares", done = 1234, total = 100000, rate = 123.4 },
      state { label = "ünïcödé label", done = 5, total = 10, rate = 0.5 },
      state { label = "lines", done = 98765, rate = 2000 },
      state { done = 11, total = 10, rate = 5 },
      state { label = "x", done = 10, total = 10, rate = 5, finished = true },
    }
    for w = 10, 200 do
      for _, st in ipairs(states) do
        local line = P._render(st, w - P.margin)
        assert.is_true(cols(line) <= w - 3, w .. " columns: " .. line)
      end
    end
  end)

  it("shows label, bar, count, percent, rate and ETA at 80 columns", function()
    local line = P._render(state { label = "squares", done = 25, total = 100, rate = 10 }, 77)
    assert.equal("squares [#######.......................] 25/100  25% 10 items/s ETA 00:08", line)
  end)

  it("drops the label and the rate first when narrow, and keeps the count and percent", function()
    local st = state { label = "squares", done = 25, total = 100, rate = 10 }
    assert.equal("[###..........] 25/100  25% ETA 00:08", P._render(st, 37))
    assert.equal("[#...] 25/100  25%", P._render(st, 18))
    assert.equal("25/100  25%", P._render(st, 12))
  end)

  it("never shows ETA 00:00 while work remains, and --:-- while the rate is unknown", function()
    assert.matches("ETA 00:01$", P._render(state { done = 999, total = 1000, rate = 1e6 }, 77))
    assert.matches("ETA %-%-:%-%-$", P._render(state { done = 1, total = 1000 }, 77))
    assert.matches("ETA %-%-:%-%-$", P._render(state { done = 1, total = 1000, rate = 0 }, 77))
  end)

  it("switches to a count when more items come than the total said", function()
    local line = P._render(state { done = 12, total = 10, rate = 3 }, 77)
    assert.equal("12 items 3.0 items/s 00:12", line)
  end)

  it("shows a recent rate, not the average since the start", function()
    local bar, tick, out = fake_bar(nil, true)
    local done = 0
    for _ = 1, 200 do done = done + 10; tick(0.1); bar.fn(done, 100000, false) end -- 100/s
    for _ = 1, 200 do done = done + 1; tick(1); bar.fn(done, 100000, false) end   -- then 1/s
    local rate = tonumber(out[#out]:match("([%d.]+) items/s"))
    assert.is_true(rate < 2, out[#out])
  end)
end)

describe("the progress bar on a terminal", function()
  it("is redrawn in place and ends its line when the map ends", function()
    local bar, tick, out = fake_bar("x", true)
    bar.fn(1, 3, false)
    tick(1)
    bar.fn(3, 3, true)
    assert.matches("^\rx %[#+%.+%] 1/3  33%% .*\27%[K$", out[1])
    assert.matches("^\rx %[#+%] 3/3 100%% .* in 00:01\27%[K\n$", out[2])
    bar:close()
    assert.equal(2, #out)
  end)

  it("ends its line when the map is closed early", function()
    local bar, _, out = fake_bar("x", true)
    bar.fn(1, 3, false)
    bar:close()
    assert.equal("\n", out[#out])
    bar:close()
    assert.equal(2, #out)
  end)
end)

describe("progress on a non-terminal", function()
  it("writes a line at each 10% step, at most one every 2 s, and the final line", function()
    local bar, tick, out = fake_bar("job", false)
    for i = 1, 1000 do tick(1 / 64); bar.fn(i, 1000, false) end -- 10% every 1.56 s
    bar.fn(1000, 1000, true)
    local pct = {}
    for _, line in ipairs(out) do pct[#pct + 1] = line:match(" (%d+)%% ") end
    assert.same({ "20", "40", "60", "80", "100" }, pct)
    assert.matches("^job %[#+%] 1000/1000 100%% 64 items/s in 00:16\n$", out[5])
  end)

  it("writes every 10% step of a slow map", function()
    local bar, tick, out = fake_bar(nil, false)
    for i = 1, 10 do tick(3); bar.fn(i, 10, false) end
    bar.fn(10, 10, true)
    assert.equal(10, #out)
    assert.matches("^%[###%.+%] 1/10  10%% 0%.3 items/s ETA 00:2%d\n$", out[1])
  end)

  it("writes a line every 30 s when the total is unknown", function()
    local bar, tick, out = fake_bar("lines", false)
    for i = 1, 100 do tick(1); bar.fn(i, nil, false) end
    bar.fn(100, nil, true)
    assert.same({ "lines 30 items 1.0 items/s 00:30\n", "lines 60 items 1.0 items/s 01:00\n",
      "lines 90 items 1.0 items/s 01:30\n", "lines 100 items 1.0 items/s in 01:40\n" }, out)
  end)
end)

describe("a progress callback", function()
  it("is called once for each new count, the last one being the total", function()
    for _, N in ipairs({ 1, 2 }) do
      local seen = {}
      parmap.map(function(x) return x end, H.range(20), { N = N, progress = function(done, total)
        assert.equal(20, total)
        seen[#seen + 1] = done
      end })
      for k = 2, #seen do assert.is_true(seen[k] > seen[k - 1], "N = " .. N) end
      assert.equal(20, seen[#seen])
    end
  end)

  it("is called once for an empty input", function()
    local seen = {}
    parmap.map(function(x) return x end, {}, { N = 2, progress = function(done, total)
      seen[#seen + 1] = { done, total }
    end })
    assert.same({ { 0, 0 } }, seen)
  end)
end)

describe("parmap.print", function()
  it("is print to stdout when no bar is drawn", function()
    local out = H.run_lua([[
      local parmap = require "parmap"
      parmap.print("a", 1, true, nil)
      for i in parmap(function(x) return x end, { 1 }, { N = 2, progress = true }) do
        parmap.print("in the loop", i)
      end
    ]])
    assert.matches("^a\t1\ttrue\tnil\nin the loop\t1\n", out)
  end)
end)

-- Run Lua source in a child; returns its output and the script's path
-- (removed by then).
local function run_script(src)
  local path = H.script(src)
  local p = io.popen(H.lua_cmd(path) .. " 2>&1")
  local out = p:read("a")
  p:close()
  os.remove(path)
  return out, path
end

describe("an item error raised to the loop", function()
  local function check(body, line)
    local out, path = run_script([[
local parmap = require "parmap"
local function f(x)
  if x == 3 then error("boom") end
  return x
end
]] .. body)
    assert.matches("parmap: item 3 failed in %a+ %d+: [^\n]*boom\n%(raised to the loop at "
      .. path:gsub("%p", "%%%0") .. ":" .. line .. "%)\nstack traceback:", out)
  end

  it("names the line of the loop that consumed it, when uncaught", function()
    check([[
for _ in parmap(f, { 1, 2, 3, 4 }, { N = 2 }) do
end
]], 6)
  end)

  it("names the line of the loop with N = 1 and exception = 'raise'", function()
    check([[
local function run()
  for _ in parmap(f, { 1, 2, 3, 4 }, { N = 1, exception = "raise" }) do end
end
run()
]], 7)
  end)

  it("names the line of the parmap.map call", function()
    check([[

local t = parmap.map(f, { 1, 2, 3 }, { N = 2 })
]], 7)
  end)

  it("names the user's loop for an item of an upstream stage of a pipeline", function()
    check([[
local stage1 = parmap.values(parmap(f, { 1, 2, 3, 4 }, { N = 2 }))
for _ in parmap(function(x) return x end, stage1, { N = 2 }) do end
]], 7)
  end)

  it("is in the error object's field where", function()
    local ok, e = pcall(function()
      for _ in parmap(function(x) if x == 2 then error("x") end end, { 1, 2 }, { N = 2 }) do end
    end)
    assert.is_false(ok)
    assert.matches("^spec/progress_spec%.lua:%d+$", e.where)
    local got = H.collect(parmap(function() error("x") end, { 1 }, { N = 2, exception = "return" }))
    assert.is_nil(got[1][1].where) -- not raised: no loop to name
  end)
end)

---------------------------------------------------------------- on screen

-- A tmux server of our own (its own socket), one pane of `width` x 20
-- running Lua source `src`; the pane stays after the program ends.
local function tmux_screen(src, width)
  local path = H.script(src)
  local sock = "parmap-spec-" .. core.pid()
  local env = {}
  for _, k in ipairs({ "LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS" }) do
    local v = os.getenv(k)
    if v and v ~= "" then env[#env + 1] = k .. "=" .. string.format("%q", v) end
  end
  local function q(s) return "'" .. s:gsub("'", "'\\''") .. "'" end
  local function tmux(args)
    local p = assert(io.popen("env -u LD_PRELOAD tmux -L " .. sock .. " " .. args .. " 2>&1"))
    local out = p:read("a")
    p:close()
    return out
  end
  local s = {}
  local conf = H.script("set -g remain-on-exit on\n") -- read before the pane starts
  tmux(string.format("-f %s new-session -d -x %d -y 20 %s", q(conf), width,
    q("exec env " .. table.concat(env, " ") .. " " .. H.lua_cmd(path))))
  os.remove(conf)
  local socket = tmux("display -p '#{socket_path}'"):match("^(/[^\n]+)")
  -- the screen's lines (with those scrolled off it), wrapped ones joined,
  -- without blank lines at the ends and tmux's "Pane is dead" notice
  function s.lines()
    local lines = {}
    for line in tmux("capture-pane -p -J -S -"):gmatch("([^\n]*)\n") do
      if #lines > 0 or line:match("%S") then
        lines[#lines + 1] = (line:gsub("%s+$", ""))
      end
    end
    while #lines > 0 and (lines[#lines] == "" or lines[#lines]:match("^Pane is dead")) do
      lines[#lines] = nil
    end
    return lines
  end
  function s.text() return table.concat(s.lines(), "\n") end
  function s.dead() return tmux("display -p '#{pane_dead}'"):match("^1") ~= nil end
  function s.keys(k) tmux("send-keys " .. k) end
  -- wait (polling, 30 s at most) until pred() holds
  function s.wait(pred)
    local t0 = core.now()
    while not pred() and core.now() - t0 < 30 do T.sleep(0.05) end
    return pred()
  end
  function s.close()
    tmux("kill-server")
    if socket then os.remove(socket) end -- kill-server may leave it
    os.remove(path)
  end
  return s
end

local SCRIPT = [[
local parmap = require "parmap"
local T = require "parmap_testhelper"
local n, label, N = %d, %s, %d
for i in parmap(function(x) T.sleep(0.05) return x end,
    (function() local t = {} for k = 1, n do t[k] = k end return t end)(),
    { N = N, progress = label }) do
  %s
end
print("done")
]]

local function script(n, label, body, N)
  return string.format(SCRIPT, n, label and string.format("%q", label) or "true", N or 2, body)
end

describe("the progress bar on a terminal (tmux)", function()
  for _, width in ipairs({ 40, 80 }) do
    it("fits " .. width .. " columns, with parmap.print's lines above it", function()
      local s = tmux_screen(script(30, "squares",
        'if i % 10 == 0 then parmap.print("item " .. i) end'), width)
      finally(s.close)
      assert.is_true(s.wait(s.dead), s.text())
      local lines = s.lines()
      assert.equal(5, #lines, s.text())
      assert.same({ "item 10", "item 20", "item 30" }, { lines[1], lines[2], lines[3] })
      if width == 80 then
        assert.matches("^squares %[#+%] 30/30 100%% [%d.]+ items/s in %d%d:%d%d$", lines[4])
      else
        assert.matches("^%[#+%] 30/30 100%% in %d%d:%d%d$", lines[4])
      end
      assert.is_true(#lines[4] <= width - 1, lines[4])
      assert.equal("done", lines[5])
    end)
  end

  it("lets an error from the loop start on a line of its own", function()
    local s = tmux_screen(script(30, "squares", [[
  if i == 10 then parmap.print("item " .. i) end
  if i == 20 then error("boom from the loop") end]]), 40)
    finally(s.close)
    assert.is_true(s.wait(s.dead), s.text())
    local lines = s.lines()
    assert.equal("item 10", lines[1], s.text())
    assert.matches("^%[[#.]+%] %d+/30 +%d+%% ", lines[2], s.text())
    assert.is_true(#lines[2] <= 39, lines[2])
    assert.matches("^lua5%.4: [^ ]+:8: boom from the loop$", lines[3], s.text())
  end)

  -- N = 1: no worker to be killed by the terminal's SIGINT and replaced
  -- (the engine's business, see faults_*_spec.lua); the bar is the same
  it("lets Ctrl-C's 'interrupted!' start on a line of its own", function()
    local s = tmux_screen(script(400, "squares",
      'if i == 5 then parmap.print("READY") end', 1), 40)
    finally(s.close)
    assert.is_true(s.wait(function() return s.text():find("READY", 1, true) ~= nil end), s.text())
    s.keys("C-c")
    assert.is_true(s.wait(s.dead), s.text())
    local lines = s.lines()
    assert.equal("READY", lines[1], s.text())
    assert.matches("^%[[#.]+%] %d+/400 +%d+%% ", lines[2], s.text())
    assert.is_true(#lines[2] <= 39, lines[2])
    assert.matches("^lua5%.4: [^\n]*interrupted!$", lines[3], s.text())
  end)
end)
