# Two entry points for a fresh machine, each doing all of its own set-up (virtualenv, dependencies, build):
#   make bench   runs the benchmark on the default device (CUDA if present and built, else CPU)
#   make test    runs the test suite
PYTHON ?= python3
VENV ?= .venv
# The torch to install into a new virtualenv; override for your platform, e.g. TORCH_SPEC=torch.
TORCH_SPEC ?= torch==2.14.1
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)
SOURCES := setup.py $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/*.h csrc/cpu/*.cpp csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.cpp)

.PHONY: test test-clang bench build clean

test: $(VENV)/.built
	$(PY) -m pytest -q -p no:cacheprovider

# The CPU kernels as a Mac builds them: Clang, no OpenMP (one thread), CPU only, in a copy of the tracked files
# under build/clang-cpu; then the CPU path tests against that build.
CLANG_DIR := build/clang-cpu
CLANG_PY := cd $(CLANG_DIR) && PYTHONPATH=$(abspath $(CLANG_DIR)) CXX=clang++ CC=clang FORCE_CPU=1 SCE_OPENMP=0 $(abspath $(PY))
test-clang: $(VENV)/.deps
	rm -rf $(CLANG_DIR) && mkdir -p $(CLANG_DIR) && git ls-files -z | xargs -0 cp --parents -t $(CLANG_DIR)
	$(CLANG_PY) setup.py -q build_ext --inplace
	$(CLANG_PY) -c "import softmax_ce_ext as s; b = s.build_info(); print('clang build:', b); assert not b['openmp'], b"
	$(CLANG_PY) -m pytest -q -p no:cacheprovider tests/test_cpu_paths.py

bench: $(VENV)/.built
	$(PY) benchmarks/bench.py

build: $(VENV)/.built

$(VENV)/.deps:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" ninja pybind11 pytest hypothesis numpy setuptools wheel
	@# The checkout itself is the package: a .pth puts it on the venv's path (in-place, incremental builds).
	$(PY) -c "import sysconfig, pathlib; pathlib.Path(sysconfig.get_paths()['purelib'], 'softmax_ce_ext_dev.pth').write_text('$(CURDIR)\n')"
	touch $@

# ninja rebuilds only what changed (objects live in ./build).
$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PY) setup.py -q build_ext --inplace
	$(PY) -c "import softmax_ce_ext as s; print('softmax_ce_ext build:', s.build_info())"
	touch $@

clean:
	rm -rf build softmax_ce_ext/*.so softmax_ce_ext/_build_info.py $(VENV)/.built
