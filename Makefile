# The front door: `make run` starts the whole suite, `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
UV := $(VENV)/bin/uv
PROTOS := $(shell find protos -name '*.proto')
GEN_STAMP := gen/.stamp
export PYTHONPATH := $(CURDIR)/gen:$(CURDIR)
BENCH_SCENARIOS := fanout ledger excel voice crash faults scale_out contact_import exports

.PHONY: run test bench protos lint fmt clean install lock $(BENCH_SCENARIOS)

install: $(STAMP)

# The venv holds exactly requirements-dev.lock (runtime + dev + build tools), hash-checked. uv
# (pinned in requirements-build.lock, installed by pip) installs it: a minute faster than pip.
# The project itself is not installed (it runs from PYTHONPATH), so the operator's CLI,
# .venv/bin/pregonero, is a script that runs pregonero_cli from this checkout.
$(STAMP): requirements-dev.lock requirements-build.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --require-hashes --no-deps -r requirements-build.lock
	$(UV) pip sync -q --python $(PY) --require-hashes --strict --no-build requirements-dev.lock
	printf '#!/bin/sh\nPYTHONPATH="$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}" exec "$(CURDIR)/$(PY)" -m pregonero_cli "$$@"\n' \
		>$(VENV)/bin/pregonero
	chmod +x $(VENV)/bin/pregonero
	touch $@

# The lock files, from pyproject.toml: requirements.lock is the runtime set (the image's),
# requirements-build.lock the build tools, requirements-dev.lock everything `make` installs.
# Run after changing a dependency there; `make lock UPGRADE=--upgrade` moves every pin to the
# newest release. Pinned for CPython 3.11 on x86_64 glibc 2.36 (this Debian 12, CI's machine
# and the image's base), with the hash of every file of each release.
LOCK_FLAGS := --quiet --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_36 \
	--custom-compile-command 'make lock' $(UPGRADE)

lock: $(STAMP)
	$(UV) pip compile $(LOCK_FLAGS) pyproject.toml -o requirements.lock
	$(UV) pip compile $(LOCK_FLAGS) --group build -c requirements.lock -o requirements-build.lock
	$(UV) pip compile $(LOCK_FLAGS) pyproject.toml --group dev -c requirements.lock -c requirements-build.lock \
		-o requirements-dev.lock

protos: $(GEN_STAMP)

$(GEN_STAMP): $(PROTOS) $(STAMP)
	rm -rf gen && mkdir -p gen
	$(PY) -m grpc_tools.protoc -I protos --python_out=gen --grpc_python_out=gen --pyi_out=gen $(PROTOS)
	touch $@

run: $(GEN_STAMP)
	$(PY) -m services.runtime.devstack run

# The whole suite runs as two processes (tests/parallel.py); PYTEST_ARGS runs pytest as given.
test: $(GEN_STAMP)
ifeq ($(strip $(PYTEST_ARGS)),)
	$(PY) -m tests.parallel
else
	$(PY) -m pytest $(PYTEST_ARGS)
endif

# `make bench` runs the default scenarios; `make bench faults crash` runs those instead.
bench: $(GEN_STAMP)
	$(PY) -m bench $(filter-out bench,$(MAKECMDGOALS))

# Scenario names after `bench` are its arguments: as goals of their own they do nothing.
$(BENCH_SCENARIOS):
	@:

lint: $(GEN_STAMP)
	$(PY) -m ruff check services tests bench pregonero_cli
	$(PY) -m mypy services

fmt: $(STAMP)
	$(PY) -m ruff format services tests bench pregonero_cli

clean:
	rm -rf gen .pytest_cache
