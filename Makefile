# The two set-up commands of the README (demo, test). Each creates .venv and installs what it
# needs; `make docs` serves the documentation at http://127.0.0.1:8000.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test docs wrk redis-server bench bench-hot

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

demo: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[demo]'
	$(BIN)/python -m mcs demo $(ARGS)

test: $(BIN)/python wrk redis-server
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	site=$$(mktemp -d) && NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet \
		--site-dir "$$site"; status=$$?; rm -rf "$$site"; exit $$status
	$(BIN)/python -m pytest $(ARGS)

docs: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[docs]'
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve --dev-addr 127.0.0.1:8000

# wrk lets a test compare examples/load.py with it. Installed only where that is cheap (root
# with apt-get, as on CI); elsewhere that test is skipped, with its reason.
wrk:
	@command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		{ apt-get install -y -qq wrk || { apt-get update -qq && apt-get install -y -qq wrk; }; } \
		>/dev/null 2>&1; } || true

# redis-server: the Redis tests start a real one (mcs.redis). Installed the same way as wrk;
# where it is missing those tests are skipped, with their reason.
redis-server:
	@command -v redis-server >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		{ apt-get install -y -qq redis-server || \
		{ apt-get update -qq && apt-get install -y -qq redis-server; }; } \
		>/dev/null 2>&1; } || true

bench: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m bench $(ARGS)

bench-hot: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pytest bench/test_hot_paths.py $(ARGS)
