# The two quick-start commands (see README): `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PIP    := $(VENV)/bin/pip
PY     := $(VENV)/bin/python

.PHONY: run test typecheck wheel-smoke install install-test services system-deps bench mutants clean

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

install: $(VENV)/bin/activate
	$(PIP) install --quiet -e .

install-test: $(VENV)/bin/activate
	$(PIP) install --quiet -e '.[test]'
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
## after checking that the built wheel, installed alone, migrates, serves and plays the demo.
test: system-deps services install-test typecheck wheel-smoke
	$(VENV)/bin/pytest

typecheck: install-test
	$(VENV)/bin/mypy --strict --ignore-missing-imports replayguard

wheel-smoke: install-test
	PYTHON=$(PY) scripts/wheel-smoke

## Mutation testing of replayguard/core and decide.py against the unit tests ([tool.mutmut] in
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
