# Two commands: `make run` (the default study) and `make test` (the test suite).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -q -c constraints.txt
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: run test venv data bench lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test,ray]'
	touch $@

venv: $(VENV)/.installed

data:
	@if [ -n "$$LOSSGLASS_DATA" ] && [ -d "$$LOSSGLASS_DATA" ]; then \
	  echo "using LOSSGLASS_DATA=$$LOSSGLASS_DATA"; \
	elif [ -f $(FMNIST)/train-images-idx3-ubyte.gz ]; then \
	  echo "Fashion-MNIST found in $(FMNIST)"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) || \
	  { echo "could not install dataset-fashion-mnist with apt; download the four Fashion-MNIST IDX files and set LOSSGLASS_DATA=/their/folder"; exit 1; }; \
	else \
	  echo "Fashion-MNIST is missing: as root run 'apt-get install dataset-fashion-mnist', or put the four IDX files in a folder and set LOSSGLASS_DATA=/that/folder"; exit 1; \
	fi

run: venv data
	$(BIN)/lossglass run --preset quickstart --out runs/quickstart

test: venv
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check src tests benchmarks

BENCH := .venv-bench/bin

.venv-bench/.installed: pyproject.toml constraints.txt benchmarks/requirements.txt
	$(PY) -m venv .venv-bench
	$(BENCH)/pip install -q -c constraints.txt torch==2.13.0
	$(BENCH)/pip install -q -c constraints.txt -e . -r benchmarks/requirements.txt
	touch $@

# side-by-side benchmarks in their own environment (the peers never enter .venv), writes BENCHMARKS.md
# (every row 3 times, about 10 minutes on 2 cores; BENCH_ARGS=--quick for smaller sizes). The GPU check is
# benchmarks/gpu_check.sh (see its header), run on a GPU machine.
bench: .venv-bench/.installed data
	PYTHONUNBUFFERED=1 $(BENCH)/python benchmarks/run_all.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .venv-bench runs build *.egg-info
