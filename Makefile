# Set-up from the committed lock files, then the pipeline or the tests. Needs Python 3.11 and git.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
UV_VERSION := 0.13.8
# Library noise (TensorFlow banners, GX, analytics) is silenced in one place: components/core/console.py.
# uv compiles the installed packages to bytecode once; else, where PYTHONDONTWRITEBYTECODE is set,
# every process compiles TensorFlow, DVC, GX... from source again (measured: bench/, docs/benchmarks.md).
export UV_COMPILE_BYTECODE := 1
# dvc.yaml's commands call `tlpipe`: the venv's bin comes first, as after `source .venv/bin/activate`.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: run test test-all setup setup-test lock clean-outputs

run: $(VENV)/.run-installed
	@test -e .git || { echo "make run needs a git checkout (DVC versions outputs against git)"; exit 1; }
	$(BIN)/dvc repro
	$(BIN)/tlpipe summary

test: $(VENV)/.test-installed $(VENV)/.browser-installed
	$(BIN)/pytest

test-all: $(VENV)/.test-installed $(VENV)/.browser-installed
	$(BIN)/pytest -m ""

setup: $(VENV)/.run-installed
setup-test: $(VENV)/.test-installed $(VENV)/.browser-installed

$(BIN)/uv:
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found: install Python 3.11, or run make PYTHON=/path/to/python3.11"; exit 1; }
	@echo "setup: creating $(VENV) with $(PYTHON) and uv $(UV_VERSION)"
	@$(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

# uv installs exactly the pinned versions of the lock; the project itself goes in editable, without deps.
# Quietly: a line saying what is installed, and uv's errors if any (run the uv command by hand for its package list).
UV_INSTALL = $(BIN)/uv pip install --quiet --python $(BIN)/python
$(VENV)/.run-installed: requirements.lock pyproject.toml | $(BIN)/uv
	@echo "setup: installing the pinned packages of requirements.lock into $(VENV) (about a minute the first time)"
	@$(UV_INSTALL) -r requirements.lock
	@$(UV_INSTALL) --no-deps -e .
	@echo "setup: done; tlpipe is $(BIN)/tlpipe"
	@touch $@

$(VENV)/.test-installed: requirements-test.lock pyproject.toml | $(BIN)/uv
	@echo "setup: installing the pinned packages of requirements-test.lock into $(VENV) (about a minute the first time)"
	@$(UV_INSTALL) -r requirements-test.lock
	@$(UV_INSTALL) --no-deps -e .
	@echo "setup: done; tlpipe is $(BIN)/tlpipe"
	@touch $@ $(VENV)/.run-installed

# Headless Chromium (Debian's package) opens the HTML pages the project writes in tests, with the
# network off. CI runs as root on a fresh machine; elsewhere install it yourself (apt-get install chromium).
$(VENV)/.browser-installed: | $(BIN)/uv
	@command -v chromium >/dev/null || { echo "setup: installing Debian's chromium for the HTML tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
	@touch $@

# Re-pin every dependency after changing pyproject.toml (needs the package registry).
lock: | $(BIN)/uv
	$(BIN)/uv pip compile pyproject.toml --python-version 3.11 --python-platform x86_64-manylinux_2_28 -o requirements.lock
	$(BIN)/uv pip compile pyproject.toml --extra test -c requirements.lock --python-version 3.11 --python-platform x86_64-manylinux_2_28 -o requirements-test.lock

clean-outputs:
	rm -rf data models reports
