# The two commands a newcomer needs: `make demo` and `make test`. Both build .venv when missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
BASE   := $(VENV)/.installed
TESTS  := $(VENV)/.installed-test
BENCH  := $(VENV)/.installed-bench

.PHONY: install demo test test-postgresql lint format bench bench-quick bench-profile completions man clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(BASE): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e .
	@# Bytecode now, so that no CLI call pays for compiling (even with PYTHONDONTWRITEBYTECODE).
	$(BIN)/python -m compileall -q taskctl daemon
	@touch $@

$(TESTS): $(BASE)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $@

# py-spy for bench-profile, PgQueuer for the PostgreSQL rows' peer.
$(BENCH): $(BASE)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[bench]'
	@touch $@

install: $(BASE)

demo: $(BASE)
	@PATH="$(CURDIR)/$(BIN):$$PATH" bash tests/demo.sh

# Installs nothing outside .venv: a test that needs a program that is missing (zsh, tmux...) is
# skipped with a line naming it. `.ci/run` installs them first and fails on any skip.
test: $(TESTS)
	@# Bytecode for modules added since the install: every daemon a test starts would compile
	@# them again (PYTHONDONTWRITEBYTECODE is common), hundreds of times a run.
	$(BIN)/python -m compileall -q taskctl daemon
	$(BIN)/python -m pytest -q
	@# The end-to-end suite once more, each daemon on a database of a throwaway PostgreSQL.
	TASKCTL_TEST_BACKEND=postgresql $(BIN)/python -m pytest -q

# Only the end-to-end suite on PostgreSQL (the second half of `make test`).
test-postgresql: $(TESTS)
	$(BIN)/python -m compileall -q taskctl daemon
	TASKCTL_TEST_BACKEND=postgresql $(BIN)/python -m pytest -q

lint: $(TESTS)
	$(BIN)/ruff check taskctl daemon tests bench man completions
	$(BIN)/ruff format --check taskctl daemon tests bench man completions
	$(BIN)/mypy

format: $(TESTS)
	$(BIN)/ruff format taskctl daemon tests bench man completions
	$(BIN)/ruff check --fix taskctl daemon tests bench man completions

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

completions: $(BASE)
	$(BIN)/python completions/generate.py

man: $(BASE)
	$(BIN)/python man/generate.py

bench: $(BENCH)
	$(BIN)/python bench/run.py

bench-quick: $(BENCH)
	$(BIN)/python bench/run.py --quick

# Where a drain's CPU goes, by function and line (py-spy samples the daemon and its supervisor).
bench-profile: $(BENCH)
	$(BIN)/python bench/profile.py
