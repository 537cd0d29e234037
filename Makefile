# The two quick-start commands (see README): `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PIP    := $(VENV)/bin/pip
PY     := $(VENV)/bin/python

.PHONY: run test check lint typecheck unit wheel-smoke install install-check install-test services system-deps bench mutants clean

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

install: $(VENV)/bin/activate
	$(PIP) install --quiet -e .

## The Python test tools alone (what `make check` needs: no system packages, no root).
install-check: $(VENV)/bin/activate
	$(PIP) install --quiet -e '.[test]'

install-test: install-check
	@# libvirt-python compiles against libvirt-dev and python3-dev (scripts/system-deps installs
	@# them); a failed build stops here rather than letting the libvirt tests skip.
	$(PIP) install --quiet libvirt-python

## Install and run the service on its embedded PostgreSQL (no Redis needed).
run: install
	$(VENV)/bin/replayguard serve

system-deps:
	scripts/system-deps

services:
	scripts/services-up

## Run the whole test suite (installs what it needs, starts PostgreSQL and Redis if down),
## after lint, types, and checking that the built wheel, installed alone, migrates, serves and
## plays the demo.
test: system-deps services install-test lint typecheck wheel-smoke
	$(VENV)/bin/pytest

## Lint, types and the unit tests: no root, no PostgreSQL, no Redis.
check: lint typecheck unit

LINT_PATHS := replayguard tests bench scripts

lint: install-check
	$(VENV)/bin/ruff check $(LINT_PATHS)

## mypy reads its settings ([tool.mypy], strict) from pyproject.toml.
typecheck: install-check
	$(VENV)/bin/mypy

unit: install-check
	$(VENV)/bin/pytest tests/unit -q -p no:cacheprovider

wheel-smoke: install-test
	PYTHON=$(PY) scripts/wheel-smoke

## Mutation testing of replayguard/core and services/decide.py against the unit tests ([tool.mutmut] in
## pyproject.toml; a few minutes on two cores). Survivors and why: tests/mutants-survivors.md.
mutants: install-test
	$(PIP) install --quiet -e '.[mutation]'
	rm -rf mutants
	$(VENV)/bin/mutmut run --max-children 2 || true
	$(VENV)/bin/mutmut results

bench: install-test
	$(PY) bench/run.py --quick

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis mutants
