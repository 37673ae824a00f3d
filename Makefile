# Two entry points (see README): `make quickstart` and `make test`.
# Each creates or reuses the virtual environment in .venv; it is rebuilt when pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vitef-installed

.PHONY: quickstart test lint venv clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,cluster]"
	touch $(STAMP)

quickstart: $(STAMP)
	$(PY) -m apps.study config=apps/studies/quickstart.yaml

test: $(STAMP)
	$(PY) -m pytest -q -n 2

lint: $(STAMP)
	$(VENV)/bin/ruff check src apps tests benchmarks
	$(VENV)/bin/ruff format --check src apps tests benchmarks

clean-venv:
	rm -rf $(VENV)
