# Two entry points (see README): `make run` and `make test`. Everything else supports them.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: setup run console init test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# With HOPNHAT_BOT_TOKEN: the bot (long polling). Without: emulator + chat console on SQLite.
run: setup
	$(VENV)/bin/hopnhat run

console: setup
	$(VENV)/bin/hopnhat console

init: setup
	$(VENV)/bin/hopnhat init

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) bench/bench_start.py

clean:
	rm -rf $(VENV) .pytest_cache hopnhat.db*
