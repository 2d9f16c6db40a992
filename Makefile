# ShopPulse: `make demo` runs the whole job on the embedded broker; `make test` runs every test;
# `make lint` runs ruff and mypy. All bootstrap .venv from pyproject.toml on first use.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# Pins torch to the CPU wheel CI uses (ci/constraints.txt). Set CONSTRAINTS= to let pip choose.
CONSTRAINTS ?= ci/constraints.txt
DURATION ?= 0
RATE ?= 2000
PYTEST_ARGS ?=
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: venv tools demo lint test unit integration clean

$(BIN)/.installed: pyproject.toml ci/constraints.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), f"ShopPulse needs Python 3.11, {sys.executable} is {sys.version.split()[0]}; run make PYTHON=/path/to/python3.11"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e '.[test,lint]'
	@touch $@

venv: $(BIN)/.installed

# Real tools the tests use: promtool checks the alert rules and scrape config; openssl makes
# the test certificate of the TLS settings tests.
tools:
	@command -v promtool >/dev/null || { \
	  echo "installing Debian's prometheus package (for promtool)"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }
	@command -v openssl >/dev/null || { \
	  echo "installing Debian's openssl package"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends openssl >/dev/null; }

demo: venv
	$(BIN)/shoppulse demo --duration $(DURATION) --rate $(RATE)

# Every check runs even when an earlier one fails, so one run lists all findings.
lint: venv
	@status=0; \
	$(BIN)/ruff check . || status=1; \
	$(BIN)/ruff format --check . || status=1; \
	$(BIN)/mypy || status=1; \
	exit $$status

test: venv tools
	$(BIN)/python -m pytest $(PYTEST_ARGS)

unit: venv
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

integration: venv
	$(BIN)/python -m pytest tests/integration $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache
