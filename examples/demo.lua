-- examples/demo.lua: a CPU-bound closure mapped over rows, serially and on
-- every core, with the speed-up printed. Run it with `make demo`.
local parmap = require "parmap"

-- The closure's upvalues (the picture's size and depth) reach the workers
-- through fork: nothing is serialized but each row's result.
local W, H, DEPTH = 600, 240, 400

local function mandel_row(y)
  local ci = (y / H) * 2.4 - 1.2
  local row = {}
  for x = 1, W do
    local cr = (x / W) * 3.5 - 2.5
    local zr, zi, n = 0.0, 0.0, 0
    while n < DEPTH and zr * zr + zi * zi < 4 do
      zr, zi = zr * zr - zi * zi + cr, 2 * zr * zi + ci
      n = n + 1
    end
    row[x] = n
  end
  return table.concat(row, ",")
end

local rows = {}
for y = 1, H do rows[y] = y end

local function timed(N)
  local t0 = parmap.now()
  local out = parmap.map(mandel_row, rows, { N = N })
  return parmap.now() - t0, out
end

local cores = parmap.ncpu()
local t1, serial = timed(1)
local tn, parallel = timed(cores)
for y = 1, H do
  assert(serial[y] == parallel[y], "row " .. y .. " differs")
end

-- A coarse picture, to show the rows came back in order.
local shades = " .:-=+*#%@"
for y = 1, H, 24 do
  local line, x = {}, 1
  for n in parallel[y]:gmatch("%d+") do
    if x % 10 == 1 then
      local k = math.min(#shades, 1 + (tonumber(n) * (#shades - 1)) // DEPTH)
      line[#line + 1] = shades:sub(k, k)
    end
    x = x + 1
  end
  print(table.concat(line))
end
print(string.format("%d rows of %d pixels: N=1 %.3f s, N=%d %.3f s, speed-up %.2fx",
  H, W, t1, cores, tn, t1 / tn))
