-- parmap/errors.lua: parmap's error objects (parmap.Error), where a raised
-- one was consumed, and why a value cannot travel between processes.
-- Private to parmap: lua/parmap.lua and its other files require it.

local core = require "parmap.core"

local type, select, tostring, setmetatable, getmetatable, next, error, pcall =
  type, select, tostring, setmetatable, getmetatable, next, error, pcall
local math_type = math.type
local format, concat = string.format, table.concat

local E = {}

local Error = {}
Error.__index = Error
Error.__name = "parmap.Error"
E.Error = Error

function Error.__tostring(e)
  local s
  if e.kind == "init" then -- a worker's init raised: no item ran there
    s = format("parmap: init failed in worker %d (pid %d)%s: %s", e.worker,
      e.pid, e.rank and format(" on %s (rank %d)", tostring(e.host), e.rank)
      or "", e.message)
  elseif e.index == nil then -- a ReturnProcess
    s = format("parmap: process %d failed: %s", e.pid, e.message)
  elseif e.rank then -- the MPI backend: a worker of a node agent
    s = format("parmap: item %d failed in worker %d on %s (rank %d): %s",
      e.index, e.pid, tostring(e.host), e.rank, e.message)
  else
    s = format("parmap: item %d failed in %s %d: %s", e.index,
      e.pid == core.pid() and "process" or "worker", e.pid, e.message)
  end
  if e.where then s = s .. "\n(raised to the loop at " .. e.where .. ")" end
  if e.traceback ~= "" then s = s .. "\n" .. e.traceback end
  return s
end

-- kind: "error" (fn raised), "value" (a result cannot travel), "died" (the
-- worker ended), "timeout" (the item ran past opts.timeout), "init" (the
-- init option raised; the field worker names the worker). index is nil for
-- a ReturnProcess and for "init". attempts: how many times the item ran (1
-- without the retries option).
function E.make_error(index, kind, err, message, traceback, pid, attempts)
  return setmetatable({ index = index, kind = kind, err = err,
    message = message, traceback = traceback or "", pid = pid,
    attempts = attempts or 1 }, Error)
end
local make_error = E.make_error

--- Is v an error object of parmap?
function E.iserror(v)
  return getmetatable(v) == Error
end

-- "file:line" of the code that consumed a failed item: the first frame
-- above where(level)'s caller at `level` that is neither C nor parmap's own
-- Lua code (the loop, or the call of parmap.map). nil without a debug library.
local getinfo = debug and debug.getinfo
local OWN = {} -- the sources of parmap's own Lua files

-- Each of parmap's Lua files calls E.own() once: where() passes over it.
function E.own()
  if getinfo then OWN[getinfo(2, "S").source] = true end
end
E.own()

function E.where(level)
  if not getinfo then return nil end
  level = level + 1
  while true do
    local info = getinfo(level, "Sl")
    if info == nil then return nil end
    if info.what ~= "C" and info.currentline > 0 and not OWN[info.source] then
      return info.short_src .. ":" .. info.currentline
    end
    level = level + 1
  end
end
local where = E.where

---------------------------------------------------------------- the policy

-- The one error policy, for every path (a map's workers, the serial loop,
-- ReturnProcess's join, ParEval): what the failure e becomes.
--   kind "shape" (an item or a result of the wrong shape): its message is
--     raised, whatever exception says;
--   kind "init" (a worker's init raised; no item ran there): e is raised,
--     whatever exception says;
--   exception "proc": e.err is raised, as fn raised it;
--   exception "raise": e is raised, naming the loop (e.where) when loop;
--   exception "return": e is returned.
function E.apply(exception, loop, e)
  local kind = e.kind
  if kind == "shape" then error(e.message, 0) end
  if kind ~= "init" then
    if exception == "return" then return e end
    if exception == "proc" then error(e.err, 0) end
  end
  if loop then e.where = where(1) end
  error(e, 0)
end
local apply = E.apply

-- A map's failure handler, built once per map: the C core (and the serial
-- loop) hand it a failure record (index, kind, err, message, traceback,
-- pid[, attempts[, fields]]) once the map is stopped or may go on; it
-- raises, or returns the error object for the loop.
-- oom: nil, or a function telling whether a worker's SIGKILL was the OOM
-- killer's (cgroup.lua's oom_watch).
function E.handler(exception, oom)
  return function(index, kind, err, message, traceback, pid, attempts,
                  fields)
    local e = make_error(index, kind, err, message, traceback, pid, attempts)
    if fields ~= nil then -- {worker = id} for init; {signal = s} for died;
      for k, v in next, fields do e[k] = v end -- MPI: {host =, rank =}
    end
    if kind == "died" and e.signal == 9 and oom and oom() then
      e.oom = true
      e.message = message:gsub("%(Killed%)", "(Killed, by the kernel's OOM killer)", 1)
      if err == message then e.err = e.message end
    end
    return apply(exception, true, e)
  end
end

-- The retry_if option as the engines call it, in a worker, the parent or
-- the serial loop: (index, kind, err, message, traceback, pid, attempts[,
-- fields]) -> whether the item runs again, and when pred raised (or
-- yielded: it runs under a C call) the item's new message, which names
-- retry_if. pred gets the error object the policy would get.
function E.retry_check(pred)
  return function(index, kind, err, message, traceback, pid, attempts, fields)
    local e = make_error(index, kind, err, message, traceback, pid, attempts)
    if fields ~= nil then
      for k, v in next, fields do e[k] = v end
    end
    local ok, r = pcall(pred, e)
    if ok then return not not r end
    return false, format("parmap: option 'retry_if' raised (so the item ran no "
      .. "more): %s; the item's failure: %s", tostring(r), tostring(message))
  end
end

---------------------------------------------------------------- values

local SCALAR = { ["nil"] = true, boolean = true, number = true, string = true }

local function keypath(k)
  if type(k) == "string" then
    if k:match("^[%a_][%w_]*$") then return "." .. k end
    return format("[%q]", k)
  elseif math_type(k) == "float" then
    return format("[%.17g]", k)
  elseif type(k) == "table" then
    return "[<table>]"
  end
  return "[" .. tostring(k) .. "]"
end

-- Where, breadth first, the first value that cannot travel sits in v.
-- A table's path is kept as (parent, step) and spelt out only once found:
-- building every path string would cost O(depth^2) on deep nesting.
local function find_unsendable(v)
  local t = type(v)
  if SCALAR[t] then return nil end
  if t ~= "table" then return "", t end
  local seen, queue, parent, step, head = { [v] = true }, { v }, { 0 }, { "" }, 1
  local function path(i, last)
    local parts = { last }
    while i > 1 do parts[#parts + 1] = step[i]; i = parent[i] end
    local n = #parts
    for j = 1, n // 2 do parts[j], parts[n + 1 - j] = parts[n + 1 - j], parts[j] end
    if n > 24 then -- the first and last steps of a deep path
      return concat(parts, "", 1, 12) .. format("...(%d levels)...", n - 24)
        .. concat(parts, "", n - 11, n)
    end
    return concat(parts)
  end
  while queue[head] do
    local tbl, me = queue[head], head
    head = head + 1
    for k, x in next, tbl do
      local kt, xt = type(k), type(x)
      if kt == "table" then
        if not seen[k] then
          seen[k] = true
          local q = #queue + 1
          queue[q], parent[q], step[q] = k, me, "[<table>]"
        end
      elseif not SCALAR[kt] then
        return path(me, ""), kt .. " (as a key)"
      end
      if xt == "table" then
        if not seen[x] then
          seen[x] = true
          local q = #queue + 1
          queue[q], parent[q], step[q] = x, me, keypath(k)
        end
      elseif not SCALAR[xt] then
        return path(me, keypath(k)), xt
      end
    end
  end
end

-- path, type of the first value in v that cannot travel (nil if none);
-- keypath(k): how a key reads in a path (".db", "[2]")
E.find_unsendable, E.keypath = find_unsendable, keypath

-- describe("result"|"item", index, values...): why they cannot travel.
function E.describe(what, index, ...)
  local n = select("#", ...)
  for j = 1, n do
    local path, t = find_unsendable((select(j, ...)))
    if path then
      local head
      if index == nil then -- a ReturnProcess
        head = n > 1 and format("result %d", j) or "result"
      elseif what == "item" then
        head = format("parmap: item %d", index)
      elseif n > 1 then
        head = format("result %d of item %d", j, index)
      else
        head = format("result of item %d", index)
      end
      return format("%s: cannot send a %s%s", head, t,
        path ~= "" and (" at " .. path) or "")
    end
  end
  if index == nil then return what .. ": cannot send this value" end
  return format("%s of item %d: cannot send this value", what, index)
end

return E
