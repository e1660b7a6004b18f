# make demo: set up and run the demo end to end (embedded Prefect server, output in ./outputs)
# make test: set up and run every test (unit, integration with real Prefect and S3 servers, end to end)
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin

export PREFECT_HOME := $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 90
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1

.PHONY: setup model demo test test-fast audit chromium postgres clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, so no dependency pulls a different build. Override TORCH for your CUDA build.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

setup: $(BIN)/.installed

model: setup
	$(BIN)/python demo/prepare_model.py

demo: model
	$(BIN)/python demo/run.py

# The tests run in TEST_PROCESSES parallel pytest processes (pytest-xdist); tests/conftest.py keeps each module,
# and the tests sharing the local stack, in one process and hands out the longest first. TEST_PROCESSES=0: one.
TEST_PROCESSES ?= 2
# FINETUNE_REQUIRE_POSTGRES: the PostgreSQL load test fails, never skips, when its server cannot start.
test: model chromium postgres
	FINETUNE_REQUIRE_POSTGRES=1 $(BIN)/python -m pytest -n $(TEST_PROCESSES) --dist loadgroup --no-loadscope-reorder

# The UI test drives Debian's chromium through Playwright (never `playwright install`).
chromium:
	@command -v chromium >/dev/null || [ -x "$${CHROMIUM:-}" ] || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends chromium; }

# PostgreSQL, the Prefect server's production database (infra/start-postgres.sh starts it; tests/test_load.py
# runs on it): Debian's postgresql package, whose binaries are under /usr/lib/postgresql/*/bin.
postgres:
	@infra/start-postgres.sh --check >/dev/null 2>&1 || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends postgresql; }
	@infra/start-postgres.sh --check

# Known vulnerabilities in the installed packages, from PyPI's advisories (CI runs it after the tests).
audit: setup
	$(BIN)/python infra/dependency_audit.py

test-fast: setup
	$(BIN)/python -m pytest -m "not integration and not e2e"

clean:
	rm -rf $(VENV) .prefect .finetune-work outputs .pytest_cache
