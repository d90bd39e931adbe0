# Every target does its own set-up on a fresh machine (virtual environments, build, install).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
VENV_TL3 ?= .venv-tl3
# The CPU build of torch lies on local disk here; override TORCH_SPEC elsewhere (e.g. "torch>=2.4").
TORCH_SPEC ?= torch==2.13.0
TL4_SPEC ?= transformer-lens>=4.0,<5
TL3_SPEC ?= transformer-lens==3.9.0
PIP ?= -q --disable-pip-version-check
BUILD_DEPS := "scikit-build-core>=0.10" "pybind11>=2.12" "cmake>=3.18" ninja
TEST_DEPS := "pytest>=8" "hypothesis>=6.100"
# nnsight: the LanguageModel interface is tested (tests/test_families.py); it is optional for users.
TEST_DEPS_TL4 := "nnsight>=0.4"
RUN_DEPS := numpy safetensors tqdm pandas pyarrow matplotlib psutil xxhash

.PHONY: demo paper test test-tl4 test-tl3 install install-tl3 bench bench-quick clean asan device-wheels

$(VENV)/.deps: pyproject.toml Makefile
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install $(PIP) --upgrade pip
	$(VENV)/bin/python -m pip install $(PIP) "$(TORCH_SPEC)"
	$(VENV)/bin/python -m pip install $(PIP) "$(TL4_SPEC)" triton $(RUN_DEPS) $(BUILD_DEPS) $(TEST_DEPS) $(TEST_DEPS_TL4)
	touch $@

$(VENV_TL3)/.deps: pyproject.toml Makefile
	test -x $(VENV_TL3)/bin/python || $(PYTHON) -m venv $(VENV_TL3)
	$(VENV_TL3)/bin/python -m pip install $(PIP) --upgrade pip
	$(VENV_TL3)/bin/python -m pip install $(PIP) "$(TORCH_SPEC)"
	$(VENV_TL3)/bin/python -m pip install $(PIP) "$(TL3_SPEC)" $(RUN_DEPS) $(BUILD_DEPS) $(TEST_DEPS)
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

# pytest runs from tests/ so the installed package (with its compiled extension) is imported.
test-tl4: install
	cd tests && EF_REQUIRE_CPP=1 EF_ERROR_REPORT=../build/parity-errors-tl4.json EF_FAMILY_REPORT=../build/families-tl4.json EF_ENGINE_REPORT=../build/engine-tl4.json ../$(VENV)/bin/python -m pytest -q -p no:cacheprovider .

test-tl3: install-tl3
	cd tests && EF_REQUIRE_CPP=1 EF_ERROR_REPORT=../build/parity-errors-tl3.json ../$(VENV_TL3)/bin/python -m pytest -q -p no:cacheprovider test_parity_tl.py test_paper.py test_layouts.py test_engine.py test_engine_families.py

test: test-tl4 test-tl3

# The C++ kernel under AddressSanitizer + UndefinedBehaviorSanitizer (not part of `make test`): a
# copy of the venv gets an EF_SANITIZE=ON build (own build dir), then the C++ tests run with the ASan
# runtime preloaded into Python, each test on every kernel path this CPU runs (portable, avx2,
# avx512, amx; tests/conftest.py each_cpu_path). Leak checks are off (CPython leaks by design); any
# ASan or UBSan report aborts the run (UB is built without recovery), so success = no reports.
ASAN_VENV ?= build/asan-venv
asan: $(VENV)/.deps
	rm -rf $(ASAN_VENV) && mkdir -p $(dir $(ASAN_VENV)) && cp -a $(VENV) $(ASAN_VENV)
	$(ASAN_VENV)/bin/python -m pip install $(PIP) --no-build-isolation --no-deps --config-settings=build-dir=build/asan-{wheel_tag} --config-settings=cmake.define.EF_SANITIZE=ON .
	cd tests && LD_PRELOAD="$$($${CXX:-c++} -print-file-name=libasan.so) $$($${CXX:-c++} -print-file-name=libubsan.so)" \
	  ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	  $(abspath $(ASAN_VENV))/bin/python -m pytest -q -p no:cacheprovider test_backend_cpp.py test_aggregate_kernel.py test_cpu_paths.py

clean:
	rm -rf build dist $(VENV) $(VENV_TL3)

# Wheels for the GPU machine (Python 3.12, no internet): transformer_lens and what it imports that the
# machine's image lacks (benchmarks/device_check.sh installs them with --no-deps for its S1 row).
DEVICE_WHEELS := transformer-lens==4.3.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 fancy-einsum==0.0.3 \
	beartype==0.23.1 typeguard==4.6.1 xxhash==4.1.0
device-wheels:
	mkdir -p .wheels
	$(PYTHON) -m pip download $(PIP) --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .wheels $(DEVICE_WHEELS)
