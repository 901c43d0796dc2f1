# The two commands a newcomer needs:
#   make demo   set up .venv and run the main job (nit demo)
#   make test   set up .venv and run the whole test suite
# Knobs: PYTHON (interpreter for the venv), TORCH (pip requirement for torch, kept if one is
# already in the venv), VENV (its folder), PYTEST_ARGS (extra pytest arguments).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

PY := $(VENV)/bin/python
STAMP := $(VENV)/.nit-installed
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' 2>/dev/null)

.PHONY: demo test setup bench bench-quick report clean gpu-check

setup: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first (an existing one is kept), then the package and its dev extra, built against
# that torch (no build isolation); the C++ extension is rebuilt when csrc/ changes.
$(STAMP): $(PY) pyproject.toml setup.py $(CSRC)
	@$(PY) -c "import torch" 2>/dev/null && echo "keeping $$($(PY) -c 'import torch; print(torch.__version__)') in $(VENV)" \
		|| $(PY) -m pip install "$(TORCH)"
	$(PY) -m pip install "setuptools>=64" wheel ninja
	$(PY) -m pip install --no-build-isolation -e ".[dev]"
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/nit demo

bench-quick: $(STAMP)
	$(PY) -m benchmarks --quick

bench: $(STAMP)
	$(PY) -m benchmarks

report: $(STAMP)
	$(PY) -m nit_kernels

# On a machine with an NVIDIA GPU and a CUDA torch + triton in $(PYTHON) (no venv is made):
# build, test, sanitize and benchmark in <= 8 minutes into runs/gpu-check/. DRY=1 lists the steps.
gpu-check:
	$(PYTHON) tools/gpu_check.py --python $(PYTHON) $(if $(DRY),--dry-run,)

clean:
	rm -rf build nit_kernels/_C*.so *.egg-info
