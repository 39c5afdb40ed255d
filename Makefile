PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint typecheck bench clean postgresql chromium

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml providers/openai/pyproject.toml providers/anthropic/pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e . -e providers/openai -e providers/anthropic -e '.[dev]'
	touch $@

redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
		echo "installing redis-server"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }

# PostgreSQL for the tests: Debian's server binaries (initdb, pg_ctl in /usr/lib/postgresql/*/bin);
# the tests start their own server, so the package's own cluster is not needed.
postgresql:
	@ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || command -v pg_ctl >/dev/null 2>&1 || { \
		echo "installing postgresql"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; }

# Chromium for the review page's browser tests: Debian's build (Playwright's own browser
# download needs the internet); the tests launch /usr/bin/chromium through executable_path.
chromium:
	@test -x /usr/bin/chromium || { \
		echo "installing chromium"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

demo: $(VENV)/.installed
	$(BIN)/python examples/build_and_deploy.py

lint: $(VENV)/.installed
	$(BIN)/ruff check agentflow providers tests examples benchmarks
	$(BIN)/ruff format --check agentflow providers tests examples benchmarks
	$(BIN)/lint-imports

typecheck: $(VENV)/.installed
	$(BIN)/mypy

test: $(VENV)/.installed redis-server postgresql chromium lint typecheck
	$(BIN)/python -m pytest -q

bench: $(VENV)/.installed redis-server postgresql
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/bench_core.py
	$(BIN)/python benchmarks/bench_stores.py
	$(BIN)/python benchmarks/bench_scale.py
	$(BIN)/python benchmarks/bench_approvals.py
	$(BIN)/python benchmarks/bench_compose.py
	$(BIN)/python benchmarks/bench_agents.py
	$(BIN)/python benchmarks/bench_pool.py
	$(BIN)/python benchmarks/bench_fleet.py
	$(BIN)/python benchmarks/bench_review.py

clean:
	rm -rf $(VENV) agentflow.db*
