# Two commands do all set-up on a fresh machine with Python 3.11+ and make:
#   make demo   -- trains and prunes on MNIST-1D (generated locally, no download)
#   make test   -- runs the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[train,dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m train.demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile --doctest-modules tests jaxprune train benchmarks

test-fast: $(STAMP)
	$(PY) -m pytest -q -x -m "not slow" tests

lint: $(STAMP)
	$(PY) -m ruff check jaxprune train tests benchmarks

bench: $(STAMP)
	$(PY) -m benchmarks.run_all

clean:
	rm -rf $(VENV) runs .pytest_cache
