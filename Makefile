# Two commands do all set-up on a fresh machine:
#   make run    start the example app on http://127.0.0.1:8000 (creates .venv on first use)
#   make run-fleet  the same with 2 uvicorn worker processes observed and controlled as one fleet
#   make test   run the test suite (creates .venv on first use)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run run-fleet test test-fast bench typecheck clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[fastapi,dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m example_app

# Two server processes, one fleet (./example-fleet): any process answers for both and controls both.
run-fleet: $(STAMP)
	$(BIN)/python -m example_app --workers 2

test: $(STAMP)
	bash scripts/ensure-debian-package.sh chromium chromium "the browser test (Playwright drives Debian's chromium)"
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The default suite minus the slow and browser tests, for quick local runs.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m 'not slow and not browser' $(PYTEST_ARGS)

typecheck: $(STAMP)
	$(BIN)/python -m mypy

bench: $(STAMP)
	bash scripts/ensure-debian-package.sh wrk wrk "the http benchmark's end-to-end load generator"
	$(BIN)/python -m benchmarks standard

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache bench-results
