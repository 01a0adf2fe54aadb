# The front door: `make run` starts the whole suite, `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTOS := $(shell find protos -name '*.proto')
GEN_STAMP := gen/.stamp
export PYTHONPATH := $(CURDIR)/gen:$(CURDIR)
BENCH_SCENARIOS := fanout ledger excel voice crash faults contact_import

.PHONY: run test bench protos lint fmt clean install $(BENCH_SCENARIOS)

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

protos: $(GEN_STAMP)

$(GEN_STAMP): $(PROTOS) $(STAMP)
	rm -rf gen && mkdir -p gen
	$(PY) -m grpc_tools.protoc -I protos --python_out=gen --grpc_python_out=gen --pyi_out=gen $(PROTOS)
	touch $@

run: $(GEN_STAMP)
	$(PY) -m services.runtime.devstack run

test: $(GEN_STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# `make bench` runs the default scenarios; `make bench faults crash` runs those instead.
bench: $(GEN_STAMP)
	$(PY) -m bench $(filter-out bench,$(MAKECMDGOALS))

# Scenario names after `bench` are its arguments: as goals of their own they do nothing.
$(BENCH_SCENARIOS):
	@:

lint: $(GEN_STAMP)
	$(PY) -m ruff check services tests bench
	$(PY) -m mypy services

fmt: $(STAMP)
	$(PY) -m ruff format services tests bench

clean:
	rm -rf gen .pytest_cache
