# Two commands do all set-up on a fresh machine: `make test` and `make demo`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist

.PHONY: test demo venv dataset clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test,torch]"
	touch $@

venv: $(VENV)/.installed

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

demo: venv dataset
	$(PY) experiments/reproduce.py

clean:
	rm -rf $(VENV)
