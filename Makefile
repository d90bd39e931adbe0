# Every target does its own set-up on a fresh machine (virtual environments, build, install).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
VENV_TL3 ?= .venv-tl3
# The torch release the locks were made with; override TORCH_SPEC for another (e.g. "torch>=2.4" or a CUDA build).
TORCH_SPEC ?= torch==2.13.0
PIP ?= -q --disable-pip-version-check
# Every other package comes at the exact version of the committed lock (requirements/*.lock, made by
# `make lock` from requirements/*.in); the package's own metadata keeps ranges. `make test-latest`
# runs the suite on the newest releases instead and reports what changed.
REQ := requirements
LOCK_TL4 := $(REQ)/tl4.lock
LOCK_TL3 := $(REQ)/tl3.lock
# The documentation site and the linter: venvs of their own, without torch or the package.
VENV_DOCS ?= .venv-docs
VENV_LINT ?= .venv-lint
LOCK_DOCS := $(REQ)/docs.lock
LOCK_LINT := $(REQ)/lint.lock

.PHONY: demo paper test test-tl4 test-tl3 install install-tl3 bench bench-quick clean asan device-wheels lock test-latest chromium qemu-user test-emulated docs lint

# $(call fresh_venv,DIR,REQUIREMENTS,PIP OPTIONS[,MORE OPTIONS]): a new venv at DIR (an old one is
# removed, so nothing outside the requirements lingers) with pip itself and then REQUIREMENTS installed
# with PIP OPTIONS (the lock as constraints, or --upgrade for the newest releases), torch from
# TORCH_SPEC in between; MORE OPTIONS for the requirements only (options the venv's first pip lacks).
define fresh_venv
	rm -rf $(1) && $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install $(PIP) $(3) pip
	$(1)/bin/python -m pip install $(PIP) "$(TORCH_SPEC)"
	$(1)/bin/python -m pip install $(PIP) $(3) $(4) -r $(2)
endef

# $(call tool_venv,DIR,REQUIREMENTS,PIP OPTIONS[,MORE OPTIONS]): fresh_venv without torch, for a tool
# that never imports the package (the docs site, the linter).
define tool_venv
	rm -rf $(1) && $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install $(PIP) $(3) pip
	$(1)/bin/python -m pip install $(PIP) $(3) $(4) -r $(2)
endef

$(VENV_DOCS)/.deps: $(REQ)/docs.in $(LOCK_DOCS)
	$(call tool_venv,$(VENV_DOCS),$(REQ)/docs.in,-c $(LOCK_DOCS))
	touch $@

$(VENV_LINT)/.deps: $(REQ)/lint.in $(LOCK_LINT)
	$(call tool_venv,$(VENV_LINT),$(REQ)/lint.in,-c $(LOCK_LINT))
	touch $@

$(VENV)/.deps: $(REQ)/tl4.in $(REQ)/common.in $(LOCK_TL4)
	$(call fresh_venv,$(VENV),$(REQ)/tl4.in,-c $(LOCK_TL4))
	touch $@

$(VENV_TL3)/.deps: $(REQ)/tl3.in $(REQ)/common.in $(LOCK_TL3)
	$(call fresh_venv,$(VENV_TL3),$(REQ)/tl3.in,-c $(LOCK_TL3))
	touch $@

# Build the C++ extension and install the package (incremental: build/ keeps CMake's cache).
install: $(VENV)/.deps
	$(VENV)/bin/python -m pip install $(PIP) --no-build-isolation --no-deps .

install-tl3: $(VENV_TL3)/.deps
	$(VENV_TL3)/bin/python -m pip install $(PIP) --no-build-isolation --no-deps --config-settings=build-dir=build/tl3-{wheel_tag} .

demo: install
	$(VENV)/bin/erasure-fast demo

# The paper's analyses: real GELU-4L when it is in the local HF cache, otherwise the planted demo model.
paper: install
	$(VENV)/bin/erasure-fast paper --out paper_out

# Full CPU benchmark (every provider, both shapes, 1K-64K tokens, plus the scan workload S1).
bench: install
	$(VENV)/bin/erasure-fast bench --shapes gelu-4l,gpt2-small --sizes 1024,8192,65536 --s1-tokens 65536 --budget-s 30

# K1 / K2 at 8192 tokens on the GELU-4L shape only (the C++ kernel's targets).
bench-quick: install
	$(VENV)/bin/erasure-fast bench --shapes gelu-4l --sizes 8192

# The C++ kernels' own tests (run again by `make asan`).
CPP_TESTS := test_backend_cpp.py test_aggregate_kernel.py test_cpu_paths.py test_activation_checks.py test_output_checks.py

# pytest runs from tests/ so the installed package (with its compiled extension) is imported.
# $(call suite,VENV,NAME,TEST FILES,EXTRA ENV): the tests with their reports in build/<NAME>-*.json.
TESTS_TL3 := test_parity_tl.py test_paper.py test_paper_reference.py test_layouts.py test_engine.py test_engine_families.py test_environment.py
define suite
	(cd tests && EF_REQUIRE_CPP=1 EF_ERROR_REPORT=../build/$(2)-parity-errors.json EF_FAMILY_REPORT=../build/$(2)-families.json \
	  EF_ENGINE_REPORT=../build/$(2)-engine.json $(4) ../$(1)/bin/python -m pytest -q -p no:cacheprovider $(3))
endef

# $(call apt_install,COMMAND,PACKAGE,WHY): Debian's PACKAGE when COMMAND is missing (apt-get, as root
# or through sudo); without it the tests that need it fail, saying so.
define apt_install
	@command -v $(1) >/dev/null 2>&1 || { \
	  echo "installing Debian's $(2) for $(3)"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(2); }
endef

# The report's browser test (tests/test_report_browser.py) drives Debian's chromium. CHROMIUM names
# another Chromium or Chrome binary.
CHROMIUM ?= chromium
chromium:
	$(call apt_install,$(CHROMIUM),chromium,the report's browser test)

# tests/test_emulated_cpus.py runs the C++ kernels on older x86-64 CPUs (AVX2 only, SSE only) under
# qemu's user-mode emulator, Debian's qemu-user.
qemu-user:
	$(call apt_install,qemu-x86_64,qemu-user,the tests on emulated CPUs)

test-tl4: install chromium qemu-user
	$(call suite,$(VENV),tl4,.)

test-tl3: install-tl3
	$(call suite,$(VENV_TL3),tl3,$(TESTS_TL3))

# tests/test_emulated_cpus.py with every C++ test (but the benchmarks' smoke runs) and the C++ backend's
# TransformerLens parity tests on each emulated CPU (not part of `make test`, which runs a subset there).
test-emulated: install qemu-user
	cd tests && EF_REQUIRE_CPP=1 EF_EMULATED_TESTS=all ../$(VENV)/bin/python -m pytest -q -p no:cacheprovider \
	  test_emulated_cpus.py

# The documentation site (mkdocs.yml, pages in docs/, the API reference from the docstrings, read
# statically): every warning is an error (a broken link, a missing page, a docstring that does not parse).
docs: $(VENV_DOCS)/.deps
	NO_MKDOCS_2_WARNING=1 $(VENV_DOCS)/bin/mkdocs build --strict -d build/site

# ruff with the rules of pyproject.toml ([tool.ruff]).
lint: $(VENV_LINT)/.deps
	$(VENV_LINT)/bin/ruff check .

test: lint docs test-tl4 test-tl3 asan

# The locks, remade from requirements/*.in: the newest releases, or those uploaded before LOCK_BEFORE
# (an ISO date, e.g. LOCK_BEFORE=2026-12-01T05:00:00Z). Run `make test-latest` first: lock what passed.
LOCK_BEFORE ?=
lock:
	$(call fresh_venv,build/lock-tl4,$(REQ)/tl4.in,--upgrade,$(if $(LOCK_BEFORE),--uploaded-prior-to $(LOCK_BEFORE)))
	$(call fresh_venv,build/lock-tl3,$(REQ)/tl3.in,--upgrade,$(if $(LOCK_BEFORE),--uploaded-prior-to $(LOCK_BEFORE)))
	$(PYTHON) tools/upstream.py freeze build/lock-tl4/bin/python $(REQ)/tl4.in $(LOCK_TL4) $(LOCK_BEFORE)
	$(PYTHON) tools/upstream.py freeze build/lock-tl3/bin/python $(REQ)/tl3.in $(LOCK_TL3) $(LOCK_BEFORE)
	$(call tool_venv,build/lock-docs,$(REQ)/docs.in,--upgrade,$(if $(LOCK_BEFORE),--uploaded-prior-to $(LOCK_BEFORE)))
	$(call tool_venv,build/lock-lint,$(REQ)/lint.in,--upgrade,$(if $(LOCK_BEFORE),--uploaded-prior-to $(LOCK_BEFORE)))
	$(PYTHON) tools/upstream.py freeze build/lock-docs/bin/python $(REQ)/docs.in $(LOCK_DOCS) $(LOCK_BEFORE)
	$(PYTHON) tools/upstream.py freeze build/lock-lint/bin/python $(REQ)/lint.in $(LOCK_LINT) $(LOCK_BEFORE)

# Upstream drift, on purpose: both suites on the newest releases (fresh venvs .venv-latest*), then
# build/drift/report.md: every version that differs from the lock and every upstream fact the tests
# found changed (a refusal that can be lifted, ...). Exit status: the suites'.
NOT_LOCKED := --deselect tests/test_environment.py::test_installed_versions_are_the_lock
test-latest: chromium qemu-user
	mkdir -p build/drift
	$(call fresh_venv,.venv-latest,$(REQ)/tl4.in,--upgrade)
	$(call fresh_venv,.venv-latest-tl3,$(REQ)/tl3.in,--upgrade)
	.venv-latest/bin/python -m pip install $(PIP) --no-build-isolation --no-deps --config-settings=build-dir=build/latest-{wheel_tag} .
	.venv-latest-tl3/bin/python -m pip install $(PIP) --no-build-isolation --no-deps --config-settings=build-dir=build/latest-tl3-{wheel_tag} .
	status=0; \
	$(call suite,.venv-latest,latest-tl4,. $(NOT_LOCKED),EF_UPSTREAM_REPORT=../build/drift/facts-tl4.json) || status=$$?; \
	$(call suite,.venv-latest-tl3,latest-tl3,$(TESTS_TL3) $(NOT_LOCKED),EF_UPSTREAM_REPORT=../build/drift/facts-tl3.json) || status=$$?; \
	$(PYTHON) tools/upstream.py drift build/drift/report.md \
	  tl4 $(LOCK_TL4) .venv-latest/bin/python build/drift/facts-tl4.json \
	  tl3 $(LOCK_TL3) .venv-latest-tl3/bin/python build/drift/facts-tl3.json; \
	echo "test-latest: suites exit status $$status (build/drift/report.md)"; exit $$status

# The C++ kernel under AddressSanitizer + UndefinedBehaviorSanitizer (not part of `make test`): a
# copy of the venv gets an EF_SANITIZE=ON build (own build dir), then the C++ tests run with the ASan
# runtime preloaded into Python, each test on every kernel path this CPU runs (portable, avx2,
# avx512, avx512_bf16, amx; tests/conftest.py each_cpu_path). Leak checks are off (CPython leaks by design); any
# ASan or UBSan report aborts the run (UB is built without recovery), so success = no reports.
ASAN_VENV ?= build/asan-venv
asan: $(VENV)/.deps
	rm -rf $(ASAN_VENV) && mkdir -p $(dir $(ASAN_VENV)) && cp -a $(VENV) $(ASAN_VENV)
	$(ASAN_VENV)/bin/python -m pip install $(PIP) --no-build-isolation --no-deps --config-settings=build-dir=build/asan-{wheel_tag} --config-settings=cmake.define.EF_SANITIZE=ON .
	cd tests && LD_PRELOAD="$$($${CXX:-c++} -print-file-name=libasan.so) $$($${CXX:-c++} -print-file-name=libubsan.so)" \
	  ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	  $(abspath $(ASAN_VENV))/bin/python -m pytest -q -p no:cacheprovider $(CPP_TESTS)

clean:
	rm -rf build dist $(VENV) $(VENV_TL3) $(VENV_DOCS) $(VENV_LINT) .venv-latest .venv-latest-tl3

# Wheels for the GPU machine (Python 3.12, no internet): transformer_lens and what it imports that the
# machine's image lacks (benchmarks/device_check.sh installs them with --no-deps for its S1 row), at
# the versions of the lock.
DEVICE_PACKAGES := transformer-lens datasets dill multiprocess fancy-einsum beartype typeguard xxhash
device-wheels:
	mkdir -p .wheels
	$(PYTHON) -m pip download $(PIP) --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .wheels $$($(PYTHON) tools/upstream.py pins $(LOCK_TL4) $(DEVICE_PACKAGES))
