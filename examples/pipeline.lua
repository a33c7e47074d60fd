-- examples/pipeline.lua: a two-stage parallel pipeline over a text file.
--
--   lua5.4 examples/pipeline.lua [input.txt] > output.tsv
--
-- Reads the input line by line (io.lines: never the whole file at once),
-- stage 1 parses each line in parallel, stage 2 does the heavy part in
-- parallel, and the output is written in input order as results arrive.
-- Each stage is a parmap; parmap.values turns a stage's results into the
-- next stage's items, so memory stays bounded whatever the input size, an
-- error in any stage reaches this loop, and leaving the loop stops both.
local parmap = require "parmap"

local path = arg[1] or "README.md"

-- stage 1: words of a line (lower case), kept with its text
local function parse(line)
  local words = {}
  for w in line:lower():gmatch("[%a']+") do words[#words + 1] = w end
  return { text = line, words = words }
end

-- stage 2: something costly per line: a 32-bit FNV-1a hash of the line,
-- iterated 2,000 times, and its longest word
local function digest(rec)
  local h = 2166136261
  for _ = 1, 2000 do
    for k = 1, #rec.text do
      h = ((h ~ rec.text:byte(k)) * 16777619) & 0xffffffff
    end
  end
  local longest = ""
  for _, w in ipairs(rec.words) do
    if #w > #longest then longest = w end
  end
  return string.format("%d\t%08x\t%s\t%s", #rec.words, h, longest, rec.text)
end

local t0 = parmap.now()
local parsed = parmap.values(parmap.parmap(parse, io.lines(path)))
local n = 0
for i, out in parmap.parmap(digest, parsed) do
  io.write(i, "\t", out, "\n")
  n = n + 1
end
io.stderr:write(string.format("pipeline: %d lines of %s in %.2f s on %d cores\n",
  n, path, parmap.now() - t0, parmap.ncpu()))
