"""Shared fixtures: a tiny sqs-cloud on a free loopback port, free ports, the tiny draft model and
one generation through a cloud, the Grafana dashboard, and the tools of the integration tests.

Integration tools (docker-compose, prometheus, network namespaces): a test whose tool is missing
skips with the reason, or fails when SQS_REQUIRE_INTEGRATION=1 (.ci/run sets it, after
scripts/install_test_deps.sh installed them), so CI cannot go green by skipping. Missing real Qwen
models are not tools: the tests that need them still skip.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import uuid
from pathlib import Path
from typing import Callable, NoReturn

import pytest

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "sqs-sd.json"
REQUIRE_INTEGRATION = os.environ.get("SQS_REQUIRE_INTEGRATION") == "1"


def require_tool(reason: str) -> NoReturn:
    """An integration tool is missing: skip, or fail under SQS_REQUIRE_INTEGRATION=1."""
    if REQUIRE_INTEGRATION:
        pytest.fail(f"{reason} (SQS_REQUIRE_INTEGRATION=1: integration tests may not skip)", pytrace=False)
    pytest.skip(reason)


# --- integration tools ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def docker_compose() -> str:
    """docker-compose, to render docker-compose.yml (`config` needs no Docker engine)."""
    exe = shutil.which("docker-compose")
    if exe is None:
        require_tool("docker-compose is not installed (scripts/install_test_deps.sh installs Debian's 1.29)")
    return exe


@pytest.fixture(scope="session")
def llama_server_binary() -> str:
    """llama.cpp's llama-server as `make llama-server` built it for this CPU."""
    from bench.llama_server import built_binary

    path = built_binary()
    if path is None:
        require_tool("llama-server is not built (make llama-server: ~11 min on 2 cores)")
    return path


@pytest.fixture(scope="session")
def prometheus() -> str:
    """A real Prometheus server binary."""
    exe = shutil.which("prometheus") or "/usr/bin/prometheus"
    if not os.access(exe, os.X_OK):
        require_tool("prometheus is not installed (scripts/install_test_deps.sh installs Debian's package)")
    return exe


@pytest.fixture(scope="session")
def netns() -> None:
    """Root, iproute2 (ip, tc), and a kernel that lets us make a namespace with a veth pair in it."""
    if os.geteuid() != 0:
        require_tool("needs root (network namespaces, veth, tc)")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            require_tool(f"`{tool}` is not installed (scripts/install_test_deps.sh installs iproute2)")
    name = f"sqs-probe-{uuid.uuid4().hex[:8]}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True, timeout=30)
    if made.returncode != 0:
        require_tool(f"cannot create a network namespace here: {made.stderr.strip() or 'ip netns add failed'}")
    try:
        veth = subprocess.run(["ip", "-n", name, "link", "add", "probe0", "type", "veth", "peer", "name", "probe1"],
                              capture_output=True, text=True, timeout=30)
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
    if veth.returncode != 0:
        require_tool(f"cannot create a veth pair in a network namespace: {veth.stderr.strip()}")


# --- ports and a cloud ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def free_port() -> Callable[[], int]:
    """free_port() -> a TCP port of 127.0.0.1 that nothing listens on (also a dead address)."""
    return _free_port


@pytest.fixture(scope="module")
def cloud():
    """sqs-cloud serving the tiny target on 127.0.0.1 (a free port), in this process; one per module."""
    from cloud.inprocess import LocalCloud

    with LocalCloud("tiny") as c:
        yield c


@pytest.fixture(scope="session")
def draft_model():
    """The tiny draft model (LoadedModel)."""
    from sqs_models.registry import load_model

    return load_model("tiny", role="draft")


@pytest.fixture(scope="session")
def tiny_target():
    from sqs_models.registry import load_model

    return load_model("tiny", role="target")


@pytest.fixture(scope="session")
def full_recompute():
    """full_recompute(model, vocab_size, context, want) -> float32 [want, V]: the naive oracle of the
    cached LMs, every position from scratch without a cache."""
    import torch

    def recompute(model, vocab_size: int, context: list[int], want: int):
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([context], dtype=torch.long), use_cache=False)
        return out.logits[0, -want:, :vocab_size].float().numpy()

    return recompute


@pytest.fixture(scope="session")
def draft_engine():
    """The tiny draft behind the torch engine (sqs_models Engine: what the edge runtime takes)."""
    from sqs_models.engines import load_engine

    return load_engine("tiny", "draft", engine="torch")


@pytest.fixture(scope="session")
def tiny_llama_target(tmp_path_factory):
    """The tiny target written as a GGUF and loaded by llama.cpp (sqs_models.llama_lm.LlamaModel)."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[llama]')")
    from bench.tiny_gguf import write_tiny_gguf
    from sqs_models.llama_lm import LlamaModel

    m = LlamaModel(write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-target.gguf", "target"), threads=1)
    yield m
    m.close()


@pytest.fixture(scope="session")
def run_generation(draft_engine):
    """run_generation(address, prompt, *, scheme="topk", max_new_tokens=16, temperature=0.0, seed=0,
    max_draft_len=4, **scheme_kw) -> GenerationResult: the edge runtime with the tiny draft."""
    from common.schemes import SchemeConfig
    from edge.client import ClientConfig
    from edge.drafter import DraftConfig
    from edge.runtime import EdgeRuntime

    e = draft_engine

    def run(address: str, prompt: str, *, scheme: str = "topk", max_new_tokens: int = 16,
            temperature: float = 0.0, seed: int = 0, max_draft_len: int = 4, **scheme_kw):
        cfg = DraftConfig(
            scheme=SchemeConfig(scheme, vocab_size=e.vocab_size, **scheme_kw), max_draft_len=max_draft_len,
            temperature=temperature, seed=seed,
        )
        runtime = EdgeRuntime(e, ClientConfig(address, retries=8, backoff_s=0.1))
        return runtime.generate(runtime.encode(prompt), cfg, max_new_tokens=max_new_tokens)

    return run


# --- the Grafana dashboard -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="session")
def dashboard_exprs(dashboard) -> list[str]:
    """Every PromQL expression of the dashboard's panels (targets[].expr), rows included."""
    out: list[str] = []

    def walk(panels):
        for p in panels:
            out.extend(t["expr"] for t in p.get("targets", []) if t.get("expr"))
            walk(p.get("panels", []))

    walk(dashboard["panels"])
    return out
