"""The container deployment (docker-compose.yml, deploy/): topology, healthchecks, the link's
shaping plan, Prometheus and Grafana provisioning, and the dashboard's PromQL metric names.

No Docker engine is needed: `docker-compose config` (Debian's docker-compose 1.29, installed by
scripts/install_test_deps.sh) renders the file with .env; the same topology checks also run on
the raw YAML, so they hold even where the binary is absent.
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

from common.metrics import Metrics
from common.stats import PARTS

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = ROOT / "docker-compose.yml"
ENV_FILE = ROOT / ".env"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "sqs-sd.json"
DS_PROVISIONING = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DB_PROVISIONING = DEPLOY / "grafana" / "provisioning" / "dashboards" / "sqs.yml"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
ENTRYPOINT = DEPLOY / "link" / "entrypoint.sh"

SERVICES = {"cloud", "link", "edge", "prometheus", "grafana"}
EXPECTED_DEPENDS = {("edge", "link"), ("link", "cloud"), ("grafana", "prometheus")}
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
        m.observe_round("conformal", drafted=4, accepted=accepted, payload_bytes=40, formula_bits=300.0,
                        wire_bytes=90, latency_ms={p: 1.0 for p in PARTS}, beta=0.01)
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
    assert link_env["LINK_CLOUD_HOST"] == "cloud" and link_env["LINK_CLOUD_PORT"] == cloud_env["SQS_PORT"]
    assert "ports" not in services["cloud"], "the cloud is reached only through the link"

    # tc needs NET_ADMIN in the link, and nowhere else.
    for name, svc in services.items():
        caps = set(svc.get("cap_add", []))
        assert ("NET_ADMIN" in caps) == (name == "link"), (name, caps)
        assert not svc.get("privileged"), name

    # Healthchecks everywhere; every dependency waits for a healthy service.
    for name, svc in services.items():
        hc = svc.get("healthcheck")
        assert hc and not hc.get("disable"), f"{name} has no healthcheck"
        test = hc["test"]
        assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, (name, test)
        for dep, spec in depends_of(svc).items():
            assert spec.get("condition") == "service_healthy", (name, dep, spec)
    edges = {(name, dep) for name, svc in services.items() for dep in depends_of(svc)}
    assert EXPECTED_DEPENDS <= edges, edges
    assert services["cloud"]["healthcheck"]["test"][:3] == ["CMD", "sqs-cloud", "check"]
    assert "/healthz" in " ".join(services["edge"]["healthcheck"]["test"])
    assert "health" in services["link"]["healthcheck"]["test"]

    # Monitoring: Prometheus can reach both metrics endpoints without the link.
    assert nets["prometheus"] >= (nets["edge"] & nets["link"]) | (nets["cloud"] & nets["link"])
    assert nets["grafana"] & nets["prometheus"]


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


@pytest.mark.parametrize("name,model_arg,command", [("cloud", "TARGET_MODEL", "sqs-cloud"),
                                                    ("edge", "DRAFT_MODEL", "sqs-edge")])
def test_dockerfile(name, model_arg, command):
    path = DEPLOY / f"{name}.Dockerfile"
    text = path.read_text()
    stages = _dockerfile_stages(path)
    base = stages[0][0]
    assert re.match(r"FROM python:\$\{PYTHON_VERSION\}-slim", base), base
    assert re.search(r"^ARG PYTHON_VERSION=3\.11$", text, re.M)
    # CPU torch, pinned like the project, before the project.
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_pin = next(p for p in pins if p.startswith("torch=="))
    assert f"ARG TORCH_VERSION={torch_pin.split('==')[1]}" in text
    assert re.search(r'pip install "torch==\$\{TORCH_VERSION\}" --index-url', text)
    assert "https://download.pytorch.org/whl/cpu" in text
    # The real model, installed at build time into /models.
    assert "SQS_MODEL_CACHE=/models" in text
    assert f'python -m sqs_models install "${{{model_arg}}}"' in text
    final = stages[-1]
    users = [i.split()[1] for i in final if i.upper().startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), "the final stage must run as a non-root user"
    assert any(i.upper().startswith("HEALTHCHECK ") and " CMD " in i for i in final)
    if name == "cloud":  # the one probe: sqs-cloud check, on the port the container serves
        assert any(i.startswith("HEALTHCHECK ") and 'CMD sqs-cloud check "127.0.0.1:${SQS_PORT:-50051}"' in i
                   for i in final)
    assert any(i.startswith("CMD ") and command in i for i in final)
    assert any(i.startswith("COPY --from=models /models /models") for i in final)

    # Every COPY source exists in the build context; every project package reaches the image.
    copied = set()
    for stage in stages:
        for ins in stage:
            if ins.startswith("COPY ") and "--from=" not in ins:
                parts = [p for p in ins.split()[1:] if not p.startswith("--")]
                for src in parts[:-1]:
                    assert (ROOT / src).exists(), f"{path.name}: COPY source {src} is missing"
                    copied.add(src.rstrip("/"))
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    top = {p.rstrip("*") for p in include}
    packages = {d.name for d in ROOT.iterdir() if d.is_dir() and (d / "__init__.py").is_file() and d.name in top}
    assert packages <= copied, f"{path.name} does not copy {sorted(packages - copied)}"
    assert {"pyproject.toml", "README.md"} <= copied

    # Build args passed by compose exist as ARGs.
    cfg = yaml.safe_load(COMPOSE.read_text())
    for arg in cfg["services"][name]["build"].get("args", {}):
        assert re.search(rf"^ARG {arg}(=|$)", text, re.M), f"{path.name} lacks ARG {arg}"


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
    for dev in ("eth1", "eth0"):  # uplink on the cloud side, downlink on the edge side
        assert f"tc qdisc add dev {dev} root handle 1: htb default 10" in lines
        assert f"tc class add dev {dev} parent 1: classid 1:10 htb rate 1mbit ceil 1mbit" in lines
        assert (f"tc qdisc add dev {dev} parent 1:10 handle 10: netem delay 25ms 5ms distribution normal "
                f"limit {env['LINK_QUEUE_PKTS']}") in lines
    assert "loss" not in proc.stdout  # 0% loss needs no netem loss clause


def test_link_plan_asymmetric_and_rate_only():
    proc = _plan(LINK_RATE="2mbit", LINK_DOWN_RATE="20mbit", LINK_UP_DELAY="40ms", LINK_DOWN_DELAY="10ms",
                 LINK_JITTER="0ms", LINK_LOSS="0.5%", LINK_DOWN_DEV="eth0 eth2")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "dev eth1 parent 1: classid 1:10 htb rate 2mbit ceil 2mbit" in out
    assert "dev eth1 parent 1:10 handle 10: netem delay 40ms loss 0.5% limit" in out
    for dev in ("eth0", "eth2"):
        assert f"dev {dev} parent 1: classid 1:10 htb rate 20mbit ceil 20mbit" in out
        assert f"dev {dev} parent 1:10 handle 10: netem delay 10ms loss 0.5% limit" in out
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
            # This kernel has no sch_netem: `shape` must refuse with a clear message, and rate-only
            # shaping (LINK_NETEM=off) must work.
            bad = nsrun("bash", str(ENTRYPOINT), "shape", env=env, check=False)
            assert bad.returncode != 0 and "netem is not available" in bad.stderr, bad.stderr
            env["LINK_NETEM"] = "off"
        for _ in range(2):  # idempotent: a second run replaces the first
            nsrun("bash", str(ENTRYPOINT), "shape", env=env)
        up = nsrun("tc", "class", "show", "dev", "vup").stdout
        down = nsrun("tc", "class", "show", "dev", "vdown").stdout
        assert "rate 1Mbit ceil 1Mbit" in up and "rate 4Mbit ceil 4Mbit" in down, (up, down)
        qdiscs = nsrun("tc", "qdisc", "show", "dev", "vup").stdout
        assert "htb 1: root" in qdiscs
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
    targets = {name: [t for sc in j["static_configs"] for t in sc["targets"]] for name, j in jobs.items()}
    compose = yaml.safe_load(COMPOSE.read_text())["services"]
    assert targets["cloud"] == [f"cloud:{environment_of(compose['cloud'])['SQS_METRICS_PORT']}"]
    assert targets["edge"] == [f"edge:{environment_of(compose['edge'])['SQS_EDGE_PORT']}"]
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
