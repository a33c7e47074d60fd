-- option journal: a map killed mid-way resumes from its journal (items
-- journaled do not run again, every result equals a clean run's), a
-- different fn or item count is refused, a torn last record is dropped
-- and its item runs again; table and iterator input, ordered or not,
-- N = 1 and N = 2, exception modes.
local parmap = require "parmap"
local H = require "helpers"

local function slurp(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("a")
  f:close()
  return s
end

local function spit(path, s)
  local f = assert(io.open(path, "wb"))
  f:write(s)
  f:close()
end

-- runs[i]: how many times fn ran item i, from the log fn appends to
local function runs(log)
  local t, n = {}, 0
  for i in (slurp(log) or ""):gmatch("(%d+)\n") do
    i = tonumber(i)
    t[i] = (t[i] or 0) + 1
    n = n + 1
  end
  return t, n
end

-- the one fn of the in-process cases (one fingerprint): it logs each run
local LOG, FAIL
local function fn(x)
  local f = assert(io.open(LOG, "a"))
  f:write(x, "\n")
  f:close()
  if FAIL and FAIL[x] then error("fails on " .. x) end
  return x * 10, { sq = x * x }
end

local function iter(n)
  local k = 0
  return function()
    k = k + 1
    if k <= n then return k end
  end
end

local function fresh()
  local j, log = H.tmpname(), H.tmpname()
  os.remove(j)
  os.remove(log)
  LOG, FAIL = log, nil
  return j, log
end

local function check_all(got, n)
  for i = 1, n do
    assert.are.equal(i * 10, got[i] and got[i][1], "item " .. i)
    assert.are.equal(i * i, got[i][2].sq)
  end
end

-- The child of the kill cases: mode "kill" writes the indices it saw to
-- MARK once it saw K results and then waits to be killed; mode "resume"
-- prints every result. fn is the same (same line) in both runs.
local CHILD = [=[
local parmap = require "parmap"
local J, LOG, MARK, K, N, ordered, input, mode = %q, %q, %q, %d, %d, %s, %q, %q
local function fn(x)
  local f = assert(io.open(LOG, "a"))
  f:write(x, "\n")
  f:close()
  return x * 10, "r" .. x
end
local TOTAL = 40
local items
if input == "table" then
  items = {}
  for i = 1, TOTAL do items[i] = i end
else
  local k = 0
  items = function() k = k + 1; if k <= TOTAL then return k end end
end
local seen = {}
for i, a, b in parmap(fn, items, { N = N, ordered = ordered, journal = J,
    chunksize = 1 }) do
  if mode == "kill" then
    seen[#seen + 1] = i
    if #seen == K then
      local f = assert(io.open(MARK .. ".tmp", "w"))
      f:write(table.concat(seen, " "), "\n")
      f:close()
      os.rename(MARK .. ".tmp", MARK)
      os.execute("exec sleep 600") -- killed here, with its workers
    end
  else
    print(i, a, b)
  end
end
]=]

local function kill_and_resume(N, ordered, input)
  local j, log = fresh()
  local mark, pidf = H.tmpname(), H.tmpname()
  os.remove(mark)
  local function script(mode)
    return H.script(CHILD:format(j, log, mark, 8, N, tostring(ordered), input,
      mode))
  end
  local s1 = script("kill")
  -- its own session and process group: one kill -9 takes its workers too
  local cmd = H.lua_cmd(s1):gsub("'", "'\\''")
  assert(os.execute(string.format("setsid sh -c 'echo $$ > %q; exec env %s' "
    .. ">/dev/null 2>&1 &", pidf, cmd)))
  local t0 = parmap.now()
  while not tonumber(slurp(pidf) or "") and parmap.now() - t0 < 60 do
    os.execute("sleep 0.05")
  end
  local pid = assert(tonumber(slurp(pidf) or ""), "the child started")
  -- whatever happens, its process group goes (dash's kill: -PGID)
  local _ <close> = setmetatable({}, { __close = function()
    os.execute("kill -9 -" .. pid .. " 2>/dev/null")
  end })
  while not slurp(mark) and parmap.now() - t0 < 60 do
    os.execute("sleep 0.05")
  end
  assert(slurp(mark), "the child saw 8 results within 60 s")
  os.execute("kill -9 -" .. pid)
  while os.execute("kill -0 " .. pid .. " 2>/dev/null") and
      parmap.now() - t0 < 60 do
    os.execute("sleep 0.05")
  end
  local seen = {}
  for i in slurp(mark):gmatch("%d+") do seen[tonumber(i)] = true end
  local before = runs(log)
  -- the resumed run
  local s2 = script("resume")
  local p = io.popen(H.lua_cmd(s2) .. " 2>&1")
  local out = p:read("a")
  local ok = p:close()
  assert.is_true(ok, out)
  local function parse(o)
    local got, count = {}, 0
    for i, a, b in o:gmatch("(%d+)\t(%d+)\t(%S+)\n") do
      got[tonumber(i)] = { tonumber(a), b }
      count = count + 1
    end
    assert.are.equal(40, count, o)
    return got
  end
  local got = parse(out)
  for i = 1, 40 do
    assert.are.same({ i * 10, "r" .. i }, got[i])
  end
  local after = runs(log)
  local reran = 0
  for i = 1, 40 do
    local again = (after[i] or 0) - (before[i] or 0)
    if seen[i] then
      assert.are.equal(0, again, "item " .. i .. " was journaled: not run again")
    end
    assert.is_true((after[i] or 0) >= 1)
    reran = reran + again
  end
  assert.is_true(reran < 40 - 7, "the resumed run ran only the rest")
  -- and a third run runs nothing
  local p3 = io.popen(H.lua_cmd(s2) .. " 2>&1")
  local out3 = p3:read("a")
  p3:close()
  assert.are.same(got, parse(out3))
  local _, n3 = runs(log)
  local _, n2 = 0, 0
  for _, v in pairs(after) do n2 = n2 + v end
  assert.are.equal(n2, n3)
  for _, f in ipairs { j, log, mark, pidf, s1, s2 } do os.remove(f) end
end

describe("option journal", function()
  for _, input in ipairs { "table", "iterator" } do
    for _, ordered in ipairs { true, false } do
      for _, N in ipairs { 1, 2 } do
        it(string.format("resumes a run killed with kill -9 (%s, %s, N = %d)",
            input, ordered and "ordered" or "unordered", N), function()
          kill_and_resume(N, ordered, input)
        end)
      end
    end
  end

  it("a complete journal yields every result without running fn", function()
    for _, N in ipairs { 1, 3 } do
      local j, log = fresh()
      local r1 = parmap.map(fn, H.range(30), { N = N, journal = j })
      local _, n1 = runs(log)
      assert.are.equal(30, n1)
      local got = H.collect(parmap(fn, H.range(30), { N = N, journal = j,
        ordered = false }))
      check_all(got, 30)
      local _, n2 = runs(log)
      assert.are.equal(30, n2)
      assert.are.equal(30, #r1)
      os.remove(j); os.remove(log)
    end
  end)

  it("drops a torn last record: that item runs again, once", function()
    for _, input in ipairs { "table", "iterator" } do
      local j, log = fresh()
      local items = input == "table" and H.range(20) or iter(20)
      parmap.map(fn, items, { N = 2, journal = j })
      local s = slurp(j)
      -- killed mid-write of the last item's record (an iterator's journal
      -- ends with the count's record, 24 bytes, written at the end)
      spit(j, s:sub(1, #s - 3 - (input == "table" and 0 or 24)))
      items = input == "table" and H.range(20) or iter(20)
      local got = H.collect(parmap(fn, items, { N = 2, journal = j }))
      check_all(got, 20)
      local _, n = runs(log)
      assert.are.equal(21, n, input) -- 20, and the torn one again
      -- the file was cut back and appended to: a third run runs nothing
      items = input == "table" and H.range(20) or iter(20)
      check_all(H.collect(parmap(fn, items, { N = 2, journal = j })), 20)
      local _, n3 = runs(log)
      assert.are.equal(21, n3, input)
      os.remove(j); os.remove(log)
    end
  end)

  it("refuses a journal of a different fn, naming the journal", function()
    local j = fresh()
    parmap.map(fn, H.range(5), { N = 2, journal = j })
    local ok, err = pcall(parmap.map, function(x) return x end, H.range(5),
      { N = 2, journal = j })
    assert.is_false(ok)
    assert.matches("journal '" .. j:gsub("%p", "%%%0") .. "' was written by "
      .. "a different fn", err)
    os.remove(j)
  end)

  it("refuses a journal of a different item count", function()
    local j, log = fresh()
    parmap.map(fn, H.range(5), { N = 2, journal = j })
    local ok, err = pcall(parmap.map, fn, H.range(6), { N = 2, journal = j })
    assert.is_false(ok)
    assert.matches("was written for a map of 5 items, this one has 6", err)
    -- an iterator with total, known up front
    ok, err = pcall(parmap.map, fn, iter(6), { N = 2, journal = j, total = 6 })
    assert.is_false(ok)
    assert.matches("map of 5 items, this one has 6", err)
    -- an iterator without: refused once it goes past the count, and the
    -- journal is left as it was
    ok, err = pcall(parmap.map, fn, iter(7), { N = 2, journal = j })
    assert.is_false(ok)
    assert.matches("map of 5 items, and this map's items go on past them", err)
    ok, err = pcall(parmap.map, fn, iter(4), { N = 2, journal = j })
    assert.is_false(ok)
    assert.matches("map of 5 items, this one has 4", err)
    local _, n = runs(log)
    assert.are.equal(5, n) -- none of those ran an item
    -- an iterator's journal learns its count when the run completes
    os.remove(j)
    parmap.map(fn, iter(5), { N = 2, journal = j })
    ok, err = pcall(parmap.map, fn, H.range(6), { N = 2, journal = j })
    assert.is_false(ok)
    assert.matches("map of 5 items, this one has 6", err)
    os.remove(j); os.remove(log)
  end)

  it("failures are not journaled: a resumed run retries them", function()
    for _, N in ipairs { 1, 2 } do
      local j, log = fresh()
      FAIL = { [4] = true, [9] = true }
      local got = H.collect(parmap(fn, H.range(12), { N = N, journal = j,
        exception = "return" }))
      assert.is_true(parmap.iserror(got[4][1]))
      FAIL = nil
      got = H.collect(parmap(fn, H.range(12), { N = N, journal = j }))
      check_all(got, 12)
      local t, n = runs(log)
      assert.are.equal(14, n)
      assert.are.equal(2, t[4])
      assert.are.equal(2, t[9])
      os.remove(j); os.remove(log)
    end
  end)

  it("a map that raised resumes after what it had journaled", function()
    local j, log = fresh()
    FAIL = { [6] = true }
    local ok = pcall(function()
      for _ in parmap(fn, H.range(10), { N = 1, journal = j, chunksize = 1 }) do
      end
    end)
    assert.is_false(ok)
    FAIL = nil
    local before = runs(log)
    check_all(H.collect(parmap(fn, H.range(10), { N = 2, journal = j })), 10)
    local after = runs(log)
    for i = 1, 5 do assert.are.equal(before[i], after[i]) end -- not again
    assert.are.equal(2, after[6])
    os.remove(j); os.remove(log)
  end)

  it("an iterator that raises among journaled items: those come first",
    function()
      local j, log = fresh()
      parmap.map(fn, iter(10), { N = 2, journal = j })
      local k, seen = 0, 0
      local ok, err = pcall(function()
        for _ in parmap(fn, function()
          k = k + 1
          if k == 6 then error("boom") end
          return k
        end, { N = 2, journal = j }) do seen = seen + 1 end
      end)
      assert.is_false(ok)
      assert.matches("boom", err)
      assert.are.equal(5, seen)
      os.remove(j); os.remove(log)
    end)

  it("works with parmap.start, parmap.range and a stepped map", function()
    local j, log = fresh()
    local m = parmap.start(fn, parmap.range(8), { N = 2, journal = j })
    check_all(H.collect(m.next, m), 8)
    m:close()
    check_all(H.collect(parmap(fn, parmap.range(8), { N = 2, journal = j })), 8)
    local _, n = runs(log)
    assert.are.equal(8, n)
    os.remove(j); os.remove(log)
  end)

  it("refuses what is not a journal, and leaves it alone", function()
    local j = fresh()
    spit(j, "precious data\n")
    local ok, err = pcall(parmap.map, fn, H.range(3), { journal = j })
    assert.is_false(ok)
    assert.matches("is not a parmap journal", err)
    assert.are.equal("precious data\n", slurp(j))
    os.remove(j)
  end)

  it("refuses a journal in use by another map", function()
    local j = fresh()
    local f, s, c, closer = parmap(fn, H.range(3), { N = 2, journal = j })
    local ok, err = pcall(parmap.map, fn, H.range(3), { N = 2, journal = j })
    assert.is_false(ok)
    assert.matches("is in use by another run", err)
    for _ in f, s, c do end
    closer:close()
    parmap.map(fn, H.range(3), { N = 2, journal = j }) -- free again
    os.remove(j)
  end)

  it("checks the option and fn", function()
    local ok, err = pcall(parmap.map, fn, H.range(3), { journal = 5 })
    assert.is_false(ok)
    assert.matches("bad option 'journal' %(file name", err)
    local j = H.tmpname()
    local callable = setmetatable({}, { __call = function(_, x) return x end })
    assert.are.same({ 1, 2, 3 }, parmap.map(callable, H.range(3),
      { N = 2, journal = j })) -- by its __call
    os.remove(j)
    assert.are.same({ 1, 2 }, parmap.map(math.abs, H.range(2),
      { N = 2, journal = j })) -- a module's C function, by its name
    os.remove(j)
    ok, err = pcall(parmap.map, coroutine.wrap(function() end), H.range(3),
      { journal = H.tmpname() })
    assert.is_false(ok)
    assert.matches("bad option 'journal' %(a journal needs to know fn", err)
  end)
end)
