-- The argument fuzzer (spec/fuzz_run.lua) at every entry point, in child
-- lua5.4 processes: a crash or a hang there fails this spec and prints the
-- seed to replay. PARMAP_FUZZ_SEED=<n> picks the seed (default: the
-- time, or 20261129 under CI); PARMAP_FUZZ_CASE=<k> runs case k alone
-- (with the seed given).
local H = require "helpers"

local BATCHES, PER_BATCH, FORKS_PER_BATCH = 4, 1000, 40

-- A new seed each run explores; CI (CI set) uses one fixed seed, so that a
-- gate's outcome does not depend on the draw of the day.
local seed = tonumber(os.getenv("PARMAP_FUZZ_SEED") or "")
  or (os.getenv("CI") and 20261129) or os.time()
local only = tonumber(os.getenv("PARMAP_FUZZ_CASE") or "")

-- Run cases first..last in a new lua5.4; a bounded wait (a hang is a
-- failure, not a stuck suite): its output and exit status.
local function batch(first, last)
  local path = H.script(string.format(
    "os.exit(require('fuzz_run')(%d, %d, %d, %d) == 0 and 0 or 1)",
    seed, first, last, FORKS_PER_BATCH))
  local errpath = os.tmpname()
  local p = io.popen("timeout -s KILL 600 env " .. H.lua_cmd(path) .. " 2>" .. errpath)
  local out = p:read("a")
  local _, how, code = p:close()
  os.remove(path)
  local f = io.open(errpath)
  local err = f and f:read("a") or ""
  if f then f:close() end
  os.remove(errpath)
  return out, how, code, err
end

describe("fuzzing the arguments of every entry point", function()
  print(string.format("# fuzz seed %d (replay: PARMAP_FUZZ_SEED=%d)", seed, seed))
  local ranges = {}
  if only then
    ranges[1] = { only, only }
  else
    for b = 1, BATCHES do ranges[b] = { (b - 1) * PER_BATCH + 1, b * PER_BATCH } end
  end
  for _, r in ipairs(ranges) do
    it(string.format("cases %d..%d give a result or an error naming the bad argument, and leave no child",
      r[1], r[2]), function()
      local out, how, code, err = batch(r[1], r[2])
      local done = out:match("FUZZ%-DONE[^\n]*")
      if not (done and how == "exit" and code == 0) then
        -- the failures, and the case that was running when it ended
        local report, last = {}, nil
        for line in out:gmatch("[^\n]+") do
          if line:match("^FUZZ%-FAIL") and #report < 20 then report[#report + 1] = line end
          if line:match("^case %d+") then last = line end
        end
        -- its stderr (progress bars, warnings; a sanitizer's report) ends it
        error(string.format("seed %d, cases %d..%d: the fuzzer %s (%s %s; last: %s)\n%s\n%s\nstderr: ...%s",
          seed, r[1], r[2], done and "found failures" or "did not finish (crash or hang)",
          tostring(how), tostring(code), tostring(last), table.concat(report, "\n"),
          done or "", err:sub(-1500)))
      end
      assert.same({}, H.children())
    end)
  end
end)
