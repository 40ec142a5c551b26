# Set-up from the committed lock files, then the pipeline or the tests. Needs Python 3.11 and git.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
UV_VERSION := 0.13.8
export TF_CPP_MIN_LOG_LEVEL := 2
export GX_ANALYTICS_ENABLED := false
export PREFECT_SERVER_ANALYTICS_ENABLED := false
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
setup-test: $(VENV)/.test-installed

$(BIN)/uv:
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found: install Python 3.11, or run make PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

# uv installs exactly the pinned versions of the lock; the project itself goes in editable, without deps.
$(VENV)/.run-installed: requirements.lock pyproject.toml | $(BIN)/uv
	$(BIN)/uv pip install --python $(BIN)/python -r requirements.lock
	$(BIN)/uv pip install --python $(BIN)/python --no-deps -e .
	@touch $@

$(VENV)/.test-installed: requirements-test.lock pyproject.toml | $(BIN)/uv
	$(BIN)/uv pip install --python $(BIN)/python -r requirements-test.lock
	$(BIN)/uv pip install --python $(BIN)/python --no-deps -e .
	@touch $@ $(VENV)/.run-installed

# Headless Chromium (Debian's package) for the tests that open the HTML pages with the network off.
$(VENV)/.browser-installed: | $(BIN)/uv
	@command -v chromium >/dev/null || { apt-get update && apt-get install -y chromium; } || { \
		echo "could not install chromium: install Debian's chromium package (apt-get install chromium)"; exit 1; }
	@touch $@

# Re-pin every dependency after changing pyproject.toml (needs the package registry).
lock: | $(BIN)/uv
	$(BIN)/uv pip compile pyproject.toml --python-version 3.11 --python-platform x86_64-manylinux_2_28 -o requirements.lock
	$(BIN)/uv pip compile pyproject.toml --extra test -c requirements.lock --python-version 3.11 --python-platform x86_64-manylinux_2_28 -o requirements-test.lock

clean-outputs:
	rm -rf data models reports
