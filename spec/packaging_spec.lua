-- spec/packaging_spec.lua: the rockspecs and `make install` ship what the
-- build builds. (.ci/packaging.sh installs for real and runs a smoke spec.)
local rockspecs = { "rockspec/parmap-scm-1.rockspec", "rockspec/parmap-0.1.0-1.rockspec" }

local function lines_of(cmd)
  local p = assert(io.popen(cmd))
  local out = p:read("a")
  assert(p:close(), cmd .. " failed")
  return out
end

local function words(s)
  local t = {}
  for w in s:gmatch("%S+") do t[#t + 1] = w end
  return t
end

local function load_rockspec(path)
  local env = {}
  assert(loadfile(path, "t", env))()
  return env
end

-- The modules under lua/, by name ("parmap", "parmap.process", ...).
local function lua_modules()
  local mods = {}
  for path in lines_of("cd lua && find . -name '*.lua' | sort"):gmatch("[^\n]+") do
    local name = path:gsub("^%./", ""):gsub("%.lua$", ""):gsub("/", ".")
    mods[name] = "lua/" .. path:gsub("^%./", "")
  end
  return mods
end

local function make(args)
  return lines_of("make -s --no-print-directory " .. args .. " 2>&1")
end

describe("the rockspecs", function()
  local core_src = words(make("print-core-src"))

  for _, path in ipairs(rockspecs) do
    describe(path, function()
      local spec = load_rockspec(path)

      it("builds parmap.core from the Makefile's CORE_SRC", function()
        assert.are.same(core_src, spec.build.modules["parmap.core"].sources)
      end)

      it("installs every Lua module of lua/, and nothing else", function()
        local mods = {}
        for name, src in pairs(spec.build.modules) do
          if name ~= "parmap.core" then mods[name] = src end
        end
        assert.are.same(lua_modules(), mods)
      end)

      it("depends on Lua 5.4 only", function()
        assert.are.same({ "lua >= 5.4" }, spec.dependencies)
      end)
    end)
  end

  it("name the release by the module's _VERSION, built from its git tag", function()
    local spec = load_rockspec(rockspecs[2])
    assert.are.equal(require("parmap")._VERSION .. "-1", spec.version)
    assert.are.equal("v" .. require("parmap")._VERSION, spec.source.tag)
  end)
end)

describe("make install", function()
  local plan = make("-n install PREFIX=/P DESTDIR=/D")
  local undo = make("-n uninstall PREFIX=/P DESTDIR=/D")

  it("installs every Lua module of lua/ under share/lua/5.4 and uninstall removes it", function()
    for name, src in pairs(lua_modules()) do
      local dest = "/D/P/share/lua/5.4/" .. name:gsub("%.", "/") .. ".lua"
      assert.is_truthy(plan:find(src .. " " .. dest, 1, true), name .. " is not installed")
      assert.is_truthy(undo:find(dest, 1, true), name .. " is not uninstalled")
    end
  end)

  it("installs the C module, the static library and the header, and uninstall removes them", function()
    for _, dest in ipairs({ "/D/P/lib/lua/5.4/parmap/core.so", "/D/P/lib/libparmap.a",
                            "/D/P/include/parmap.h" }) do
      assert.is_truthy(plan:find(dest, 1, true), dest .. " is not installed")
      assert.is_truthy(undo:find(dest, 1, true), dest .. " is not uninstalled")
    end
  end)

end)

describe("the Makefile", function()
  it("takes Lua's headers from LUA_INCDIR when it is given", function()
    local cmds = make("-n -B LUA_INCDIR=/opt/lua-inc BUILD=build-never " ..
                      "build-never/parmap/core.so")
    assert.is_truthy(cmds:find("-I/opt/lua-inc", 1, true), cmds)
  end)

  it("links a host with LUA_LIBDIR when it is given", function()
    local cmds = make("-n -B LUA_LIBDIR=/opt/lua-lib BUILD=build-never hosts")
    assert.is_truthy(cmds:find("-L/opt/lua-lib -llua5.4", 1, true), cmds)
  end)

  it("honours CC, CFLAGS and LDFLAGS", function()
    local cmds = make("-n -B CC=my-cc CFLAGS=-Omine LDFLAGS=-Wl,--mine " ..
                      "BUILD=build-never build-never/parmap/core.so")
    assert.is_truthy(cmds:find("my-cc ", 1, true), cmds)
    assert.is_truthy(cmds:find("-Omine", 1, true), cmds)
    assert.is_truthy(cmds:find("-Wl,--mine", 1, true), cmds)
  end)
end)
