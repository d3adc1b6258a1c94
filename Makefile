# Two commands do all set-up on a fresh machine: `make test` and `make demo`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist

.PHONY: test test312 test0112 demo venv venv312 dataset clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test,torch]"
	touch $@

venv: $(VENV)/.installed

# Second leg: the newest jax on Python 3.12 (no torch: torch-only tests skip), with triton for
# the kernel-lowering tests (PTX for sm_90a / sm_80, no GPU needed).
PYTHON312 ?= $(shell for p in "$$(pyenv prefix 3.12.1 2>/dev/null)/bin/python3.12" "$$(command -v python3.12)"; do if [ -x "$$p" ]; then echo "$$p"; break; fi; done)
VENV312 ?= .venv312
PY312 := $(VENV312)/bin/python
JAX312 ?= 0.12.0.1
TRITON312 ?= 3.9.0

$(VENV312)/.installed: pyproject.toml
	$(PYTHON312) -m venv $(VENV312)
	$(PY312) -m pip install -q --upgrade pip
	$(PY312) -m pip install -q "jax==$(JAX312)" "jaxlib==$(JAX312)" "triton==$(TRITON312)" -e ".[test,lowering]"
	touch $@

venv312: $(VENV312)/.installed

dataset:
	@if [ ! -f "$(FMNIST_DIR)/train-images-idx3-ubyte.gz" ] && [ ! -f "$(FMNIST_DIR)/train-images-idx3-ubyte" ]; then \
	  if [ "$$(id -u)" = "0" ]; then \
	    (apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)); \
	  else \
	    echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist'"; \
	  fi; \
	fi

test: venv dataset
	$(PY) -m pytest -n 2 --dist loadfile --durations=30 tests

test312: venv312 dataset
	$(PY312) -m pytest -n 2 --dist loadfile --durations=20 tests

# Third leg, by hand (not in CI, for time): the GPU image's jax (0.11.2) on Python 3.12, CPU:
# the 3.12 leg with its own venv and jax.
test0112:
	$(MAKE) test312 VENV312=.venv0112 JAX312=0.11.2

demo: venv dataset
	$(PY) experiments/reproduce.py

clean:
	rm -rf $(VENV) $(VENV312) .venv0112
