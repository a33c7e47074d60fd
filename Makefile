# parmap: a parallel map for Lua 5.4 on forked workers.
#   make            build build/parmap/core.so and build/libparmap.a
#   make demo       build and run examples/demo.lua (a real speed-up)
#   make test       install what is missing, build, run every spec
#   make check-asan / check-valgrind   the specs under ASan+UBSan / valgrind
#   make install PREFIX=/usr/local DESTDIR=   and   make uninstall

LUA_VERSION ?= 5.4
LUA         ?= lua$(LUA_VERSION)
PKG_CONFIG  ?= pkg-config
LUA_PC      ?= lua$(LUA_VERSION)
# Lua's headers and library come from `pkg-config $(LUA_PC)`; an explicit
# LUA_INCDIR / LUA_LIBDIR (command line or environment) wins over it, and
# LUA_CFLAGS / LUA_LIBS over both. Without pkg-config: /usr/include/luaX.Y.
ifeq ($(origin LUA_INCDIR),undefined)
LUA_CFLAGS  ?= $(shell $(PKG_CONFIG) --cflags $(LUA_PC) 2>/dev/null || echo -I/usr/include/lua$(LUA_VERSION))
else
LUA_CFLAGS  ?= -I$(LUA_INCDIR)
endif
ifeq ($(origin LUA_LIBDIR),undefined)
LUA_LIBS    ?= $(shell $(PKG_CONFIG) --libs $(LUA_PC) 2>/dev/null || echo -llua$(LUA_VERSION))
else
LUA_LIBS    ?= -L$(LUA_LIBDIR) -llua$(LUA_VERSION)
endif

CC       ?= cc
CFLAGS   ?= -O2 -g
# -Werror only where we check our own code (make test, the sanitizer and
# valgrind runs, CI): a packager's newer compiler must not fail the build
# over a new warning.
WERROR   ?=
WARN     := -std=c99 -Wall -Wextra -Wshadow -Wstrict-prototypes $(WERROR)
ALLFLAGS = $(WARN) $(CFLAGS) -fPIC -fvisibility=hidden $(LUA_CFLAGS) -Isrc -I$(BUILD)
LDFLAGS  ?=

BUILD ?= build
PREFIX ?= /usr/local
DESTDIR ?=
LUA_SHARE := $(PREFIX)/share/lua/$(LUA_VERSION)
LUA_LIB   := $(PREFIX)/lib/lua/$(LUA_VERSION)

CORE_SRC := src/buf.c src/codec.c src/proc.c src/child.c src/call.c src/worker.c src/map.c \
            src/process.c src/core.c src/fnenc.c src/range.c src/journal.c
CORE_OBJ := $(CORE_SRC:src/%.c=$(BUILD)/%.o)
HEADERS  := $(wildcard src/*.h)
# The front's private modules (lua/parmap/*.lua): compiled into
# libparmap.a for C hosts, installed under share/lua/5.4/parmap/.
LUA_MODS := $(sort $(wildcard lua/parmap/*.lua))

BUSTED ?= busted
BUSTED_FLAGS ?=

.PHONY: all demo test deps test-deps check check-asan check-gc check-valgrind install uninstall clean

all: $(BUILD)/parmap/core.so $(BUILD)/libparmap.a

$(BUILD)/%.o: src/%.c $(HEADERS) | $(BUILD)
	$(CC) $(ALLFLAGS) -c -o $@ $<

# src/map.c is one compilation unit of the rooms under src/map/ (it
# includes them), so the per-item path stays inlined across them
$(BUILD)/map.o: $(wildcard src/map/*.c src/map/*.h)

$(BUILD)/parmap_lua.h: lua/parmap.lua src/bin2c.lua | $(BUILD)
	$(LUA) src/bin2c.lua parmap_lua < lua/parmap.lua > $@.tmp && mv $@.tmp $@

$(BUILD)/parmap_modules_lua.h: $(LUA_MODS) src/bin2c.lua | $(BUILD)
	$(LUA) src/bin2c.lua --modules $(LUA_MODS) > $@.tmp && mv $@.tmp $@

$(BUILD)/front.o: src/front.c $(BUILD)/parmap_lua.h $(BUILD)/parmap_modules_lua.h \
  $(HEADERS)
	$(CC) $(ALLFLAGS) -c -o $@ $<

$(BUILD)/parmap/core.so: $(CORE_OBJ)
	@mkdir -p $(BUILD)/parmap
	$(CC) -shared $(CFLAGS) $(LDFLAGS) -o $@ $(CORE_OBJ) -pthread

$(BUILD)/libparmap.a: $(CORE_OBJ) $(BUILD)/front.o
	rm -f $@
	$(AR) rcs $@ $^

$(BUILD):
	@mkdir -p $(BUILD)

demo: deps
	@$(MAKE) --no-print-directory all
	LUA_PATH='lua/?.lua;;' LUA_CPATH='$(BUILD)/?.so;;' $(LUA) examples/demo.lua

# Install what a fresh Debian/Ubuntu machine lacks (needs root or sudo).
deps:
	@need=""; \
	command -v $(LUA) >/dev/null 2>&1 || need="$$need lua$(LUA_VERSION)"; \
	$(PKG_CONFIG) --exists $(LUA_PC) 2>/dev/null || need="$$need liblua$(LUA_VERSION)-dev"; \
	command -v $(PKG_CONFIG) >/dev/null 2>&1 || need="$$need pkg-config"; \
	command -v $(BUSTED) >/dev/null 2>&1 || need="$$need lua-busted"; \
	command -v $(CC) >/dev/null 2>&1 || need="$$need gcc make"; \
	sh .ci/apt-install $$need

# What the specs need beyond the build: a terminal multiplexer (the
# progress bar as a person sees it), MPI (the MPI backend's specs), luv
# and cqueues (a map driven by an event loop).
test-deps: deps
	@need=""; \
	command -v tmux >/dev/null 2>&1 || need="$$need tmux"; \
	$(LUA) -e 'require "luv"' >/dev/null 2>&1 || need="$$need lua-luv"; \
	$(LUA) -e 'require "cqueues"' >/dev/null 2>&1 || need="$$need lua-cqueues"; \
	command -v $(MPICC) >/dev/null 2>&1 || need="$$need openmpi-bin libopenmpi-dev"; \
	sh .ci/apt-install $$need

# Runs every spec; ends with the line "N passed, N failed" counted from
# busted's TAP output, and fails when a spec fails.
test: test-deps
	@$(MAKE) --no-print-directory WERROR=-Werror all hosts testhelper mpi
	@PARMAP_MPI_BIN=$(MPI_BIN) MPIRUN=$(MPIRUN) MPIRUN_FLAGS="$(MPIRUN_FLAGS)" \
	  bash spec/run.sh $(BUSTED) $(BUSTED_FLAGS)

check: test

ASAN_BUILD := build-asan
check-asan: test-deps
	@$(MAKE) --no-print-directory BUILD=$(ASAN_BUILD) \
	  CFLAGS="-O1 -g -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer" \
	  LDFLAGS="-fsanitize=address,undefined" WERROR=-Werror all hosts testhelper mpi
	@ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:allocator_may_return_null=1 \
	  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  LD_PRELOAD="$$($(CC) -print-file-name=libasan.so) $$($(CC) -print-file-name=libubsan.so)" \
	  PARMAP_MPI_BIN=$(ASAN_BUILD)/parmap-mpi \
	  MPIRUN_FLAGS="$(MPIRUN_FLAGS) -x ASAN_OPTIONS -x UBSAN_OPTIONS" \
	  PARMAP_BUILD=$(ASAN_BUILD) bash spec/run.sh $(BUSTED) $(BUSTED_FLAGS)

check-valgrind: test-deps
	@command -v valgrind >/dev/null 2>&1 || sh .ci/apt-install valgrind
	@$(MAKE) --no-print-directory WERROR=-Werror all hosts testhelper
	@PARMAP_VALGRIND=1 PARMAP_BUILD=$(BUILD) bash spec/run.sh $(BUSTED) $(BUSTED_FLAGS)

# The specs once more under the generational collector, which collects
# young objects at almost every allocation: lifetime bugs (a value the C code
# holds without an anchor) show up here first.
check-gc: test-deps
	@$(MAKE) --no-print-directory WERROR=-Werror all hosts testhelper
	@LUA_INIT='collectgarbage("generational")' PARMAP_BUILD=$(BUILD) \
	  bash spec/run.sh $(BUSTED) $(BUSTED_FLAGS)

# --- faults ---
# The fault specs' test-only C module (spec/testhelper.c), found through
# LUA_CPATH=$(BUILD)/?.so; never installed. `make fuzz` runs the codec's
# libFuzzer target for FUZZ_TIME seconds on spec/corpus (new inputs go to
# $(BUILD)/fuzz-corpus, crashes to $(BUILD)/fuzz-crash-*).
TESTHELPER := $(BUILD)/parmap_testhelper.so
.PHONY: testhelper
testhelper: $(TESTHELPER)
$(TESTHELPER): spec/testhelper.c | $(BUILD)
	$(CC) $(ALLFLAGS) -shared $(LDFLAGS) -o $@ spec/testhelper.c

FUZZ_CC   ?= clang
FUZZ_TIME ?= 60
FUZZ_BIN  := $(BUILD)/fuzz_codec
.PHONY: fuzz
$(FUZZ_BIN): spec/fuzz_codec.c src/codec.c src/buf.c src/codec.h src/buf.h | $(BUILD)
	@command -v $(FUZZ_CC) >/dev/null 2>&1 || sh .ci/apt-install clang
	$(FUZZ_CC) -std=c99 -g -O1 -fsanitize=fuzzer,address,undefined \
	  -fno-sanitize-recover=all $(LUA_CFLAGS) -Isrc -o $@ \
	  spec/fuzz_codec.c src/codec.c src/buf.c $(LUA_LIBS) -lm
# The corpus (and any crash files) replayed once under gcc's ASan+UBSan:
# cheap enough for CI, and needs no clang.
REPLAY_BIN := $(BUILD)/fuzz_replay
$(REPLAY_BIN): spec/fuzz_codec.c src/codec.c src/buf.c src/codec.h src/buf.h | $(BUILD)
	$(CC) -std=c99 -g -O1 -DPARMAP_FUZZ_REPLAY -fsanitize=address,undefined \
	  -fno-sanitize-recover=all $(LUA_CFLAGS) -Isrc -o $@ \
	  spec/fuzz_codec.c src/codec.c src/buf.c $(LUA_LIBS) -lm
.PHONY: fuzz-replay
fuzz-replay: deps $(REPLAY_BIN)
	@ASAN_OPTIONS=detect_leaks=0 $(REPLAY_BIN) spec/corpus/seed-*
fuzz: deps $(FUZZ_BIN)
	@mkdir -p $(BUILD)/fuzz-corpus
	UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 $(FUZZ_BIN) \
	  -max_total_time=$(FUZZ_TIME) -timeout=10 -rss_limit_mb=4096 \
	  -artifact_prefix=$(BUILD)/fuzz-crash- $(BUILD)/fuzz-corpus spec/corpus
# --- end faults ---

# --- packaging and C hosts ---
# examples/host.c, a C program that embeds Lua, linked against
# $(BUILD)/libparmap.a as any host would; spec/host_spec.lua runs it, and
# `make test` builds it. `make print-core-src` lists the C module's sources
# (the rockspecs must list the same; spec/packaging_spec.lua checks it).
# .ci/packaging.sh checks make install, luarocks and an installed host.
HOST_BIN  := $(BUILD)/examples/host
HOST_LIBS  = $(LUA_LIBS) -lm -ldl -pthread
.PHONY: hosts print-core-src
hosts: $(HOST_BIN)
$(HOST_BIN): examples/host.c src/parmap.h $(BUILD)/libparmap.a
	@mkdir -p $(dir $@)
	$(CC) $(WARN) $(CFLAGS) $(LUA_CFLAGS) -Isrc $(LDFLAGS) -o $@ \
	  examples/host.c $(BUILD)/libparmap.a $(HOST_LIBS)
print-core-src:
	@echo $(CORE_SRC)
# --- end packaging and C hosts ---

# --- bench ---
# `make bench` runs bench/run.lua: each case in a fresh lua5.4 process,
# medians of several runs, one table and one BENCH line per case (plus
# Python's multiprocessing.Pool.imap as a peer when python3 is present).
# Timings are printed, never asserted; not part of `make test`.
# BENCH_QUICK=1: one short run per case. BENCH_MD=1: also a markdown table
# (for bench/RESULTS.md). BENCH_CASES=1,5: only those cases.
.PHONY: bench
bench: all
	LUA_PATH='lua/?.lua;;' LUA_CPATH='$(BUILD)/?.so;;' $(LUA) bench/run.lua
	@if command -v $(MPICC) >/dev/null 2>&1 && command -v $(MPIRUN) >/dev/null 2>&1; then \
	  echo; echo "MPI backend (make bench-mpi):"; $(MAKE) --no-print-directory bench-mpi; \
	else echo "(no MPI here: the MPI rows need openmpi-bin libopenmpi-dev)"; fi
# --- end bench ---

# --- mpi ---
# `make mpi` builds $(BUILD)/parmap-mpi (the MPI launcher, node agents and
# the coordinator of rank 0) with $(MPICC), e.g. `make mpi
# MPICC=mpicc.mpich BUILD=build-mpich` for MPICH. `make check-mpi` runs
# spec/mpi_backend_spec.lua and spec/mpi_trust_spec.lua, whose scripts run under `$(MPIRUN)
# $(MPIRUN_FLAGS) -n 3 parmap-mpi` alone (`make test` runs it with the
# other specs); for MPICH:
# make check-mpi MPICC=mpicc.mpich MPIRUN=mpirun.mpich MPIRUN_FLAGS= BUILD=build-mpich
# Under Slurm (a one-node one: .ci/slurm-up.sh), srun launches, and
# MPIRUN_RESILIENT_FLAGS names the flags that keep a job alive after a
# death (default: --enable-recovery with Open MPI's mpirun, else the
# resilient spec is pending):
# make check-mpi MPIRUN=srun MPIRUN_FLAGS='--mpi=pmix -O -c 2'
# make check-mpi MPICC=mpicc.mpich BUILD=build-mpich MPIRUN=srun \
#   MPIRUN_FLAGS='--mpi=pmi2 -O -c 2 -K1' MPIRUN_RESILIENT_FLAGS=--kill-on-bad-exit=0
MPICC    ?= mpicc
MPIRUN   ?= mpirun
MPIRUN_FLAGS ?= --allow-run-as-root --oversubscribe --bind-to none
MPIRUN_RESILIENT_FLAGS ?=
MPI_BIN  := $(BUILD)/parmap-mpi
MPI_SRC  := src/mpi/mpi_main.c src/mpi/mpi_agent.c src/mpi/mpi_coord.c \
            src/mpi/mpi_proto.c
.PHONY: mpi check-mpi
mpi: $(MPI_BIN)
$(MPI_BIN): $(MPI_SRC) src/mpi/parmap_mpi.h $(HEADERS) $(BUILD)/libparmap.a
	@command -v $(MPICC) >/dev/null 2>&1 || { echo "make mpi: $(MPICC) not found: install openmpi-bin libopenmpi-dev (sh .ci/apt-install openmpi-bin libopenmpi-dev), or name another with MPICC=" >&2; exit 1; }
	$(MPICC) $(WARN) $(CFLAGS) $(LUA_CFLAGS) -Isrc $(LDFLAGS) -o $@ \
	  $(MPI_SRC) $(BUILD)/libparmap.a $(HOST_LIBS)
check-mpi: test-deps
	@$(MAKE) --no-print-directory WERROR=-Werror all testhelper mpi
	@PARMAP_MPI_BIN=$(MPI_BIN) MPIRUN=$(MPIRUN) MPIRUN_FLAGS="$(MPIRUN_FLAGS)" \
	  MPIRUN_RESILIENT_FLAGS="$(MPIRUN_RESILIENT_FLAGS)" \
	  PARMAP_SPECS="spec/mpi_backend_spec.lua spec/mpi_trust_spec.lua spec/mpi_liveness_spec.lua spec/mpi_retry_spec.lua spec/mpi_journal_spec.lua" \
	  PARMAP_BUILD=$(BUILD) bash spec/run.sh $(BUSTED) $(BUSTED_FLAGS)
# `make check-cluster` (root): .ci/cluster.sh makes 3 hosts in namespaces
# (node1..3 on a bridge of their own, 10.77.0.0/24), runs the MPI specs
# across them (rank r on host r + 1) and spec/cluster_spec.lua (a host
# killed, cut off, its agent stopped), and removes them, also on failure.
.PHONY: check-cluster
check-cluster: test-deps
	@bash .ci/cluster.sh check
# `make bench-mpi`: bench/mpi.lua, the MPI backend against the fork backend
# on this machine (MPI_BENCH_RANKS ranks, default 2: rank 0 and one agent).
MPI_BENCH_RANKS ?= 2
.PHONY: bench-mpi
bench-mpi: all mpi
	$(MPIRUN) $(MPIRUN_FLAGS) -n $(MPI_BENCH_RANKS) $(MPI_BIN) bench/mpi.lua
# `make fuzz-fnenc`: the closure decoder against mutated records under
# ASan+UBSan (spec/fuzz_fnenc.c; FNENC_ITERS mutants per seed).
FNENC_ITERS ?= 20000
FNENC_FUZZ := $(BUILD)/fuzz_fnenc
.PHONY: fuzz-fnenc
$(FNENC_FUZZ): spec/fuzz_fnenc.c src/fnenc.c src/fnenc.h src/codec.c src/buf.c | $(BUILD)
	$(CC) -std=c99 -g -O1 -DPARMAP_FNENC_FUZZ -fsanitize=address,undefined \
	  -fno-sanitize-recover=all $(LUA_CFLAGS) -Isrc -o $@ \
	  spec/fuzz_fnenc.c src/fnenc.c src/codec.c src/buf.c $(LUA_LIBS) -lm
fuzz-fnenc: $(FNENC_FUZZ)
	$(FNENC_FUZZ) $(FNENC_ITERS)
# --- end mpi ---

install: all
	install -d $(DESTDIR)$(LUA_SHARE) $(DESTDIR)$(LUA_LIB)/parmap \
	  $(DESTDIR)$(PREFIX)/lib $(DESTDIR)$(PREFIX)/include
	install -d $(DESTDIR)$(LUA_SHARE)/parmap
	install -m 644 lua/parmap.lua $(DESTDIR)$(LUA_SHARE)/parmap.lua
	$(foreach f,$(LUA_MODS),install -m 644 $(f) $(DESTDIR)$(LUA_SHARE)/$(f:lua/%=%) &&) true
	install -m 755 $(BUILD)/parmap/core.so $(DESTDIR)$(LUA_LIB)/parmap/core.so
	install -m 644 $(BUILD)/libparmap.a $(DESTDIR)$(PREFIX)/lib/libparmap.a
	install -m 644 src/parmap.h $(DESTDIR)$(PREFIX)/include/parmap.h
	if [ -x $(MPI_BIN) ]; then install -d $(DESTDIR)$(PREFIX)/bin && \
	  install -m 755 $(MPI_BIN) $(DESTDIR)$(PREFIX)/bin/parmap-mpi; fi

uninstall:
	rm -f $(DESTDIR)$(LUA_SHARE)/parmap.lua \
	  $(LUA_MODS:lua/%=$(DESTDIR)$(LUA_SHARE)/%) \
	  $(DESTDIR)$(LUA_LIB)/parmap/core.so \
	  $(DESTDIR)$(PREFIX)/lib/libparmap.a $(DESTDIR)$(PREFIX)/include/parmap.h \
	  $(DESTDIR)$(PREFIX)/bin/parmap-mpi
	-rmdir $(DESTDIR)$(LUA_LIB)/parmap $(DESTDIR)$(LUA_SHARE)/parmap 2>/dev/null

clean:
	rm -rf $(BUILD) $(ASAN_BUILD)
