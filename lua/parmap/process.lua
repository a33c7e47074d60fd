-- parmap.process: ReturnProcess, ParEval and pipeline helpers.
-- Loaded by lua/parmap.lua, which passes its module table, the C core and
-- its private helpers; adds its functions to the module table.
return function(M, core, private)
  local _ = M, core, private
end
