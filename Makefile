# Each target that runs project code first makes sure .venv exists and matches uv.lock.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
UV_VERSION := 0.13.9
EXTRAS := --extra train --extra serve --extra dev
STAMP := $(VENV)/.synced

.PHONY: venv demo test lint protos bench images manifests smoke-containers clean

venv: $(STAMP)

# uv itself lives in the venv (installed with the machine's pip), so a fresh machine needs only
# python3. --inexact keeps uv in place; --frozen installs exactly what uv.lock says.
$(STAMP): pyproject.toml uv.lock
	@test -x $(PY) || python3 -m venv $(VENV)
	@test -x $(UV) || $(PY) -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	UV_PROJECT_ENVIRONMENT=$(VENV) $(UV) sync --frozen --inexact $(EXTRAS)
	@touch $@

demo: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash deploy/demo.sh

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy trainer server
	$(PY) protos/generate.py --check

protos: $(STAMP)
	$(PY) protos/generate.py

bench: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash benchmarks/run_all.sh

clean:
	rm -rf demo-output bench-output .pytest_cache .mypy_cache .ruff_cache
