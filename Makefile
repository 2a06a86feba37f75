# `make run` and `make test` do all the set-up themselves: virtualenv, pinned packages, data.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: run test data lock compile benchmarks image image-test clean

run: data
	$(BIN)/dudch run

test: data
	$(BIN)/pytest -q

data: $(INSTALLED)
	$(BIN)/dudch data openclipart

compile: $(INSTALLED)
	$(BIN)/dudch compile

# The stages' container, pushed, and the pipeline compiled against it (build/pipeline.yaml, for
# `dudch submit --package build/pipeline.yaml`). Needs a Docker engine with BuildKit and a
# registry login. Where Docker Hub is unreachable, pass a local base: BASE=local/debian:bookworm
# (`make image-test` makes one with debootstrap).
IMAGE ?= ghcr.io/dudch/dudch-python:0.1.0
BASE ?= python:3.11-slim
image: $(INSTALLED)
	mkdir -p build/wheels
	DOCKER_BUILDKIT=1 docker build --build-arg BASE=$(BASE) -f components/Dockerfile -t $(IMAGE) .
	docker push $(IMAGE)
	DUDCH_IMAGE=$$(docker image inspect --format '{{index .RepoDigests 0}}' $(IMAGE)) $(BIN)/dudch compile --output build/pipeline.yaml

# Heavy, not part of `make test`: builds the image here (own dockerd, a debootstrap base, a
# loopback registry), runs the pipeline in it with KFP's DockerRunner against the subprocess
# runner, and writes benchmarks/results/image.md. Needs root.
image-test: data
	bash components/image.sh

# On demand, not in CI: results in benchmarks/results/. The tuning pass (validation split,
# every student design) is separate: `.venv/bin/python benchmarks/quality.py --tune`.
benchmarks: data
	$(BIN)/python benchmarks/quality.py
	$(BIN)/python benchmarks/scale.py
	$(BIN)/python benchmarks/index_growth.py

# torch first, with pip (which also brings uv): pip takes the CPU build from this machine's
# disk, and the lock (which leaves torch out) then finds it satisfied instead of pulling in
# CUDA libraries. The lock goes in with uv, which installs the exact pins in parallel: about
# 30 s instead of pip's 2 minutes. Bytecode is compiled at install (uv's default is not to),
# or every task would compile its imports again where PYTHONDONTWRITEBYTECODE is set.
UV_VERSION := 0.13.9
$(INSTALLED): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0 uv==$(UV_VERSION)
	$(BIN)/uv pip install -q --python $(BIN)/python --compile-bytecode -r requirements.lock
	$(BIN)/uv pip install -q --python $(BIN)/python --compile-bytecode --no-deps -e .
	touch $@

# Re-resolve the pins (slow: minutes) after changing dependencies in pyproject.toml.
lock:
	rm -rf /tmp/dudch-lock && $(PYTHON) -m venv /tmp/dudch-lock
	/tmp/dudch-lock/bin/pip install -q torch==2.13.0
	/tmp/dudch-lock/bin/pip install -q -e '.[test]'
	{ sed -n '1,2p' requirements.lock; /tmp/dudch-lock/bin/pip freeze --exclude torch --exclude dudch | grep -v '^-e' | sort -f; } > requirements.lock.new
	mv requirements.lock.new requirements.lock

# The virtualenv and the caches; the MLflow store (mlflow.db, mlartifacts/) is the user's and stays.
clean:
	rm -rf $(VENV) .dudch
