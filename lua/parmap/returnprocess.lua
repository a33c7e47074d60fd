-- parmap/returnprocess.lua: parmap.ReturnProcess, one call in a forked
-- child and its values on join (the child and its object are in
-- src/process.c). Private to parmap: lua/parmap.lua requires it.

local core = require "parmap.core"
local Check = require "parmap.check"
local Errors = require "parmap.errors"
Errors.own()

local next = next
local apply = Errors.apply

local OPTIONS = { args = true, kwargs = true, exception = true }
local WHO = "parmap.ReturnProcess"

--- p = parmap.ReturnProcess(target, {args = {...}, kwargs = {...},
---   exception = "raise" | "return" | "proc"}); p:start(); p:join()
return function(target, opts)
  local bad
  opts, bad = Check.constructor(2, WHO, "target", target, opts)
  for k in next, opts do
    if not OPTIONS[k] then bad("%s", Check.unknown(k, OPTIONS)) end
  end
  local args, nargs = Check.args(2, WHO, opts.args)
  local kwargs = Check.kwargs(2, WHO, opts.kwargs)
  local exception = Check.exception(2, WHO, opts.exception, "raise")
  return core.process({ target = target, args = args,
    nargs = nargs, kwargs = kwargs, has_kw = kwargs ~= nil,
    make_error = Errors.make_error, describe = Errors.describe,
    -- join: the policy applied to the settled error object
    fail = function(e) return apply(exception, false, e) end })
end
