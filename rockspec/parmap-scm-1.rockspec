-- parmap, the development version: `luarocks --lua-version=5.4 make
-- rockspec/parmap-scm-1.rockspec` from a checkout builds and installs it.
-- build.modules["parmap.core"].sources must list the Makefile's CORE_SRC
-- (spec/packaging_spec.lua checks it).
rockspec_format = "3.0"
package = "parmap"
version = "scm-1"
source = {
   url = "git+https://github.com/parmap-lua/parmap.git",
   branch = "main",
}
description = {
   summary = "A parallel map for Lua 5.4 on forked worker processes",
   detailed = [[
parmap maps a Lua function over a sequence or an iterator on N forked
worker processes: the function's upvalues, loaded modules and open C
userdata are simply there in each worker, and only items and results
travel (integers, bit-exact floats, binary strings, tables with cycles).
Ordered or unordered results, Python parmapper's star/kwstar/args/kwargs,
progress, per-item timeouts, and workers that die are reported with the
item they held. Linux (POSIX with Linux extras).
]],
   homepage = "https://github.com/parmap-lua/parmap",
   license = "MIT",
   labels = { "parallel", "multiprocessing", "fork", "map" },
}
supported_platforms = { "linux" }
dependencies = {
   "lua >= 5.4",
}
build = {
   type = "builtin",
   modules = {
      parmap = "lua/parmap.lua",
      ["parmap.cgroup"] = "lua/parmap/cgroup.lua",
      ["parmap.check"] = "lua/parmap/check.lua",
      ["parmap.errors"] = "lua/parmap/errors.lua",
      ["parmap.pareval"] = "lua/parmap/pareval.lua",
      ["parmap.pipeline"] = "lua/parmap/pipeline.lua",
      ["parmap.progress"] = "lua/parmap/progress.lua",
      ["parmap.returnprocess"] = "lua/parmap/returnprocess.lua",
      ["parmap.core"] = {
         sources = {
            "src/buf.c", "src/codec.c", "src/proc.c", "src/child.c", "src/call.c",
            "src/worker.c",
            "src/map.c", "src/process.c", "src/core.c", "src/fnenc.c", "src/range.c", "src/journal.c",
         },
      },
   },
   copy_directories = { "doc", "examples" },
}
