-- examples/luv_loop.lua: a parallel map driven by luv's event loop, with
-- no thread, while the loop goes on with its other work (a timer here).
--
--   lua5.4 examples/luv_loop.lua        (Debian: apt-get install lua-luv)
--
-- parmap.start returns the map object; m:fd() becomes readable whenever
-- the map has something for m:poll(), which never blocks: it returns the
-- next ready item (i, results...), false when none is ready yet, and
-- nothing once the map is over.
local uv = require "luv"
local parmap = require "parmap"

-- some CPU work per item (about 20 ms)
local function work(x)
  local t = os.clock()
  while os.clock() - t < 0.02 do end
  return x * x
end

local items = {}
for i = 1, 50 do items[i] = i end

local m = parmap.start(work, items, { N = 2 })

local ticks, results, sum = 0, 0, 0
local timer = uv.new_timer()
timer:start(10, 10, function() ticks = ticks + 1 end) -- the loop's own work

local poll = uv.new_poll(m:fd())
poll:start("r", function(err)
  assert(not err, err)
  while true do
    local i, r = m:poll() -- an item's error is raised here, as in a for loop
    if i == nil then -- over: stop watching before closing the map
      poll:stop()
      poll:close()
      timer:close()
      m:close()
      return
    end
    if not i then return end -- nothing more for now: back to the loop
    results, sum = results + 1, sum + r
  end
end)

uv.run()
print(string.format("%d results, sum %d; the timer ticked %d times meanwhile",
  results, sum, ticks))
