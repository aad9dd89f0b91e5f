# The two set-up commands of the README: `make demo` (the main job end to end) and `make test`.
# Each installs into .venv first, idempotently: the stamp is redone only when the pins change.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install demo test test-all bench clean-venv

$(STAMP): pyproject.toml requirements/lock.txt scripts/install_env.py scripts/smoke_imports.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) scripts/install_env.py
	$(PY) scripts/smoke_imports.py
	touch $(STAMP)

install: $(STAMP)

# The main job end to end on embedded defaults.
demo: $(STAMP)
	$(PY) -m demo

# The test suite (slow tests included; the real files in ../shared/data are used when present).
test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/store_bench.py
	$(PY) bench/extract_bench.py
	$(PY) bench/eval_bench.py
	$(PY) bench/slide_encoder_bench.py
	$(PY) bench/bootstrap_bench.py
	$(PY) bench/train_bench.py
	$(PY) bench/loss_bench.py

clean-venv:
	rm -rf $(VENV)
