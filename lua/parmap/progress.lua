-- parmap/progress.lua: what parmap shows of a map's progress (the option
-- progress = true or a label), parmap.print, and the filter in front of a
-- progress callback. Private to parmap: lua/parmap.lua requires it.
--
-- On a terminal (stderr), one line redrawn in place at most every 0.1 s as
-- "\r<line>\27[K", the cursor left at its end (as tqdm does). The line is
-- fitted to the terminal's width at every redraw, so that it never wraps,
-- and leaves room for the "^C" the terminal echoes. When the map ends the
-- line is ended with "\n"; when it is closed early (break, an error from
-- the loop, Ctrl-C) the line is ended too, so that what comes next (lua.c's
-- error message) starts at column 0.
-- Not on a terminal (a log file, CI, nohup): a plain line at each 10% step
-- of a known total (at most one every 2 s), one every 30 s when the total is
-- unknown, and the final line.

local core = require "parmap.core"

local floor, ceil, exp, huge = math.floor, math.ceil, math.exp, math.huge
local format, rep, concat = string.format, string.rep, table.concat
local select, tostring, setmetatable, ipairs, io = select, tostring, setmetatable, ipairs, io
local ulen = utf8.len

local P = {}

-- The timings; a spec may change them (in its own process).
P.redraw = 0.1       -- seconds between two redraws on a terminal
P.log_step = 2       -- seconds at least between two lines, known total
P.log_unknown = 30   -- seconds between two lines, unknown total
P.smooth = 3         -- time constant (s) of the rate's moving average
P.bar_max, P.bar_min = 30, 10 -- the bar's width, before it must shrink
P.margin = 3         -- columns left free: the last one (no wrap) and "^C"

-- The bar whose line is open on the terminal now (parmap.print clears it
-- and draws it again).
local active

local function clock(s)
  s = floor(s + 0.5)
  if s >= 3600 then
    return format("%d:%02d:%02d", s // 3600, s % 3600 // 60, s % 60)
  end
  return format("%02d:%02d", s // 60, s % 60)
end
P._clock = clock

local function width_of(s)
  return ulen(s) or #s
end

local function rate_text(rate)
  if rate == nil then return "-- items/s" end
  return format(rate < 9.95 and "%.1f items/s" or "%.0f items/s", rate)
end

-- The line for a state, at most maxlen columns: the label goes first, then
-- the rate, then the ETA, then the bar narrows and goes, then the percent.
-- st: label, done, total, rate (nil: not known yet), elapsed, finished.
local function render(st, maxlen)
  local done, total = st.done, st.total
  local label = st.label ~= "" and st.label or false
  local rate = rate_text(st.rate)
  local known = total ~= nil and total > 0 and done <= total
  local parts -- lists of fields, widest first; "BAR" is the bar
  if known then
    local tail
    if st.finished then
      tail = "in " .. clock(st.elapsed)
    elseif done >= total then
      tail = "ETA 00:00"
    elseif st.rate == nil or st.rate <= 0 then
      tail = "ETA --:--"
    else
      local eta = ceil((total - done) / st.rate)
      tail = "ETA " .. clock(eta < 1 and 1 or eta)
    end
    local count = done .. "/" .. total
    local pct = format("%3d%%", floor(done * 100 / total))
    parts = {
      { label, "BAR", count, pct, rate, tail },
      { "BAR", count, pct, rate, tail },
      { "BAR", count, pct, tail },
      { "BAR", count, pct },
      { count, pct },
      { count },
    }
  else
    local count = done .. (done == 1 and " item" or " items")
    local tail = st.finished and ("in " .. clock(st.elapsed)) or clock(st.elapsed)
    parts = {
      { label, count, rate, tail },
      { count, rate, tail },
      { count, tail },
      { count },
    }
  end
  local last
  for k, fields in ipairs(parts) do
    local out, len, hasbar = {}, 0, false
    for _, f in ipairs(fields) do
      if f == "BAR" then
        hasbar = true
        out[#out + 1] = f
        len = len + 2 -- the brackets
      elseif f then
        out[#out + 1] = f
        len = len + width_of(f)
      end
    end
    len = len + #out - 1 -- the spaces between fields
    local room = maxlen - len
    local barw
    if hasbar then
      barw = room < P.bar_max and room or P.bar_max
      -- the bar narrows below its minimum only once nothing else can go
      local least = parts[k + 1] and parts[k + 1][1] == "BAR" and P.bar_min or 1
      if barw < least then barw = nil end
    end
    if (not hasbar and room >= 0) or barw then
      for i, f in ipairs(out) do
        if f == "BAR" then
          local fill = floor(done / total * barw)
          out[i] = "[" .. rep("#", fill) .. rep(".", barw - fill) .. "]"
        end
      end
      return concat(out, " ")
    end
    last = fields
  end
  return last[1]:sub(1, maxlen > 0 and maxlen or 0) -- not even the count fits
end
P._render = render

local Bar = { __name = "parmap.ProgressBar" }
Bar.__index = Bar

-- Draw the bar's state on its open line again (at the current width).
function Bar:redraw(final)
  local maxlen = self.width() - P.margin
  self.write("\r" .. render(self, maxlen) .. "\27[K" .. (final and "\n" or ""))
  self.open = not final
  if final then
    if active == self then active = nil end
  else
    active = self
  end
end

-- The rate: the average since the start for the first P.smooth seconds,
-- then an exponential moving average with time constant P.smooth.
function Bar:sample(now, done)
  local el = now - self.t0
  if el < 0.2 then return end -- too early to tell
  if el < P.smooth or self.rate == nil then
    self.rate = done / el
  else
    local dt = now - self.st
    if dt <= 0 then return end
    local a = 1 - exp(-dt / P.smooth)
    self.rate = self.rate + a * ((done - self.sd) / dt - self.rate)
  end
  self.st, self.sd = now, done
end

-- progress(done, total, finished), the function the engine calls.
function Bar:update(done, total, finished)
  local now = self.now()
  self.done, self.total, self.elapsed, self.finished = done, total, now - self.t0,
    finished
  if self.tty then
    if not finished and now - self.last < P.redraw then return end
    self.last = now
    self:sample(now, done)
    self:redraw(finished)
    return
  end
  local known = total ~= nil and total > 0 and done <= total
  if not finished then
    if known then
      -- a line when a step is crossed, unless the last one was too recent;
      -- 100% waits for the final line
      local step = floor(done * 10 / total)
      if step <= self.step or done >= total then return end
      self.step = step
      if now - self.last < P.log_step then return end
    elseif now - self.last < P.log_unknown then
      return
    end
  end
  self.last = now
  self:sample(now, done)
  self.write(render(self, huge) .. "\n")
end

-- The map is closed: a line still open is ended, so that whatever comes
-- next (an error message, the shell prompt) starts at column 0.
function Bar:close()
  if self.open then
    self.open = false
    if active == self then active = nil end
    self.write("\n")
  end
end
Bar.__close = Bar.close

--- A bar with an optional label. io (for specs) may replace what it uses:
--- now(), tty (boolean), width() and write(s).
function P.bar(label, io_)
  io_ = io_ or {}
  local tty = io_.tty
  if tty == nil then tty = core.isatty(2) end
  local now = io_.now or core.now
  local t0 = now()
  local self = setmetatable({
    label = label, now = now, tty = tty, t0 = t0, st = t0, sd = 0,
    last = tty and -huge or t0, step = 0, open = false,
    width = io_.width or function() return core.termwidth(2) end,
    write = io_.write or function(s) io.stderr:write(s) end,
  }, Bar)
  self.fn = function(done, total, finished) self:update(done, total, finished) end
  return self
end

--- The user's progress(done, total), called once for each new count: the
--- engine's final call repeats the last count.
function P.callback(user)
  local last
  return function(done, total)
    if done ~= last then
      last = done
      user(done, total)
    end
  end
end

--- parmap.print(...): print's values, tab-separated, on stdout; with a bar
--- on the terminal, on a line above it.
function P.print(...)
  local n = select("#", ...)
  local t = {}
  for i = 1, n do t[i] = tostring((select(i, ...))) end
  local bar = active
  if bar and bar.open then
    bar.write("\r\27[K")
    io.stdout:write(concat(t, "\t"), "\n")
    io.stdout:flush()
    bar:redraw(false)
  else
    io.stdout:write(concat(t, "\t"), "\n")
    io.stdout:flush()
  end
end

--- output = "lines" | "item": the engine writes a worker's text (whole
--- lines) on stream 1 (stdout) or 2 (stderr); with a bar on the
--- terminal, above it.
function P.relay(stream, text)
  local f = stream == 1 and io.stdout or io.stderr
  local bar = active
  if bar and bar.open then
    bar.write("\r\27[K")
    f:write(text)
    f:flush()
    bar:redraw(false)
  else
    f:write(text)
    f:flush()
  end
end

return P
