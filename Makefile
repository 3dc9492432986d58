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
	$(PIP) install -q -e '.[test,bench]'
	touch $@

install: $(VENV)/.installed

# Main job: install, fetch the real Qwen pair (falls back to the tiny pair), run one generation.
demo: install
	PYTHON=$(PY) scripts/demo.sh

# Debian test tools (docker-compose for `config`, a real prometheus); skipped with a reason if absent.
test: install
	scripts/install_test_deps.sh
	$(PY) -m pytest -q

proto: install
	$(PIP) install -q 'grpcio-tools==1.85.1'
	PYTHON=$(PY) scripts/gen_proto.sh

bench-codec: install
	$(VENV)/bin/sqs-bench codec

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
