# Each target that runs project code first makes sure .venv exists and matches uv.lock.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
UV_VERSION := 0.13.9
EXTRAS := --extra train --extra serve --extra dev
STAMP := $(VENV)/.synced

.PHONY: venv demo first-model demo-loop test lint lint-deploy protos bench images manifests smoke-containers clean-images clean

venv: $(STAMP)

# uv itself lives in the venv (installed with the machine's pip), so a fresh machine needs only
# python3. --inexact keeps uv in place; --frozen installs exactly what uv.lock says.
$(STAMP): pyproject.toml uv.lock
	@test -x $(PY) || python3 -m venv $(VENV)
	@test -x $(UV) || { $(PY) -m pip --version >/dev/null 2>&1 || $(PY) -m ensurepip >/dev/null; \
		$(PY) -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION); }
	UV_PROJECT_ENVIRONMENT=$(VENV) $(UV) sync --frozen --inexact $(EXTRAS)
	@touch $@

demo: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash deploy/demo.sh

# The README's "Your first model, offline" block, run as written (deploy/first-model.sh).
first-model: $(STAMP)
	bash deploy/first-model.sh

# The production loop on the demo's outputs (run `make demo` first): capture, label, ingest,
# retrain, roll out, before/after.
demo-loop: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash deploy/demo-loop.sh

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP) lint-deploy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy contracts trainer server client
	$(PY) protos/generate.py --check

# Containers and Kubernetes (deploy/README.md). The static-check tools live in their own venv,
# pinned in deploy/tools-requirements.txt, and run offline once installed.
TOOLS_VENV := .venv-tools
TOOLS_STAMP := $(TOOLS_VENV)/.installed

$(TOOLS_STAMP): deploy/tools-requirements.txt
	@test -x $(TOOLS_VENV)/bin/python || python3 -m venv $(TOOLS_VENV)
	@echo '*' > $(TOOLS_VENV)/.gitignore
	$(TOOLS_VENV)/bin/pip install --quiet --disable-pip-version-check -r deploy/tools-requirements.txt
	@touch $@

lint-deploy: $(TOOLS_STAMP)
	TOOLS=$(TOOLS_VENV) bash deploy/lint.sh

manifests:
	bash deploy/render-manifests.sh

# ENGINE=docker|podman, BASE_IMAGE, ENGINE_FLAGS, BUILD_FLAGS, RUN_FLAGS: see deploy/README.md.
# Every container target reads them from the environment through deploy/engine.sh, so
# smoke-containers builds (unless SKIP_BUILD=1) with exactly the settings images uses.
images:
	bash deploy/build-images.sh

# The smoke test's host-side client comes from a light venv with the base install only
# (grpcio, protobuf, numpy, pillow; no torch, no onnxruntime). CLIENT=path skips it.
CLIENT_VENV := .venv-client
CLIENT_STAMP := $(CLIENT_VENV)/.installed

$(CLIENT_STAMP): pyproject.toml $(wildcard contracts/*.py client/*.py protocol/*.py protocol/*/*.py protocol/*/*/*.py)
	@test -x $(CLIENT_VENV)/bin/python || python3 -m venv $(CLIENT_VENV)
	@echo '*' > $(CLIENT_VENV)/.gitignore
	$(CLIENT_VENV)/bin/pip install --quiet --disable-pip-version-check .
	@touch $@

smoke-containers: $(if $(CLIENT),,$(CLIENT_STAMP))
	bash deploy/smoke-containers.sh

# Removes both images, dangling images and the build cache (deploy/clean-images.sh).
clean-images:
	bash deploy/clean-images.sh

protos: $(STAMP)
	$(PY) protos/generate.py

bench: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash benchmarks/run_all.sh

clean:
	rm -rf demo-output first-model bench-output .pytest_cache .mypy_cache .ruff_cache
