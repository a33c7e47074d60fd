-- The README's option table and the options a map takes
-- (parmap.check's OPTIONS, which drives the unknown-option check and its
-- did-you-mean) name the same options: a new option is documented, and a
-- documented one exists.
local Check = require "parmap.check"

local function readme_rows()
  local f = assert(io.open("README.md"))
  local rows, intable = {}, false
  for line in f:lines() do
    if line == "| option | default | meaning |" then
      intable = true
    elseif intable then
      if not line:match("^|") then break end
      local name = line:match("^| `([%w_]+)` |")
      if name then rows[name] = true end
    end
  end
  f:close()
  return rows
end

describe("the README's option table", function()
  it("has a row for every option a map takes, and no other", function()
    local rows = readme_rows()
    local missing, unknown = {}, {}
    for name in pairs(Check.OPTIONS) do
      if not rows[name] then missing[#missing + 1] = name end
    end
    for name in pairs(rows) do
      if not Check.OPTIONS[name] then unknown[#unknown + 1] = name end
    end
    table.sort(missing)
    table.sort(unknown)
    assert.same({}, missing)
    assert.same({}, unknown)
    assert.is_true(next(rows) ~= nil, "no option table found in README.md")
  end)
end)
