"""The committed protobuf/gRPC stubs are what proto/ generates (scripts/gen_proto.sh), so a change
of the wire contract cannot land without its code."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STUBS = ("sqs_pb2.py", "sqs_pb2.pyi", "sqs_pb2_grpc.py")


def test_committed_stubs_match_the_proto(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the test extra) regenerates the stubs")
    shutil.copytree(ROOT / "proto", tmp_path / "proto")
    out = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-Iproto", "--python_out=.", "--pyi_out=.", "--grpc_python_out=.",
         "proto/common/pb/v1/sqs.proto"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    for name in STUBS:
        fresh = (tmp_path / "common/pb/v1" / name).read_text()
        committed = (ROOT / "common/pb/v1" / name).read_text()
        assert fresh == committed, f"common/pb/v1/{name} is stale: run scripts/gen_proto.sh (make proto)"


def test_every_rpc_of_the_service_is_served():
    """The servicer implements every method the service descriptor declares."""
    from cloud.servicer import VerifierServicer
    from common.pb.v1 import sqs_pb2

    service = sqs_pb2.DESCRIPTOR.services_by_name["Verifier"]
    missing = [m.name for m in service.methods if not callable(getattr(VerifierServicer, m.name, None))]
    assert not missing, f"RPCs without a handler: {missing}"


def test_the_handler_table_is_the_service_descriptor():
    """add_to_server registers exactly the RPCs the descriptor declares, each with the streaming kind
    the descriptor gives it; a servicer missing one fails at start-up, never silently."""
    import grpc

    from cloud.servicer import VerifierServicer, method_handlers
    from common.pb.v1 import sqs_pb2

    service = sqs_pb2.DESCRIPTOR.services_by_name["Verifier"]
    handlers = method_handlers(VerifierServicer(None, None, None))
    assert set(handlers) == {m.name for m in service.methods}
    for m in service.methods:
        h = handlers[m.name]
        assert (h.request_streaming, h.response_streaming) == (m.client_streaming, m.server_streaming), m.name
    assert isinstance(handlers["OpenSession"], grpc.RpcMethodHandler)

    class Partial:  # as if VerifyBatch had been added to the proto but not to the servicer
        async def OpenSession(self, request, context): ...
        async def Verify(self, request_iterator, context): ...
        async def CloseSession(self, request, context): ...

    with pytest.raises(AttributeError, match="VerifyBatch"):
        method_handlers(Partial())


def test_every_refusal_has_its_status_in_the_one_table():
    """Each Refusal of the verifier goes out with the gRPC status its value names (docs/DESIGN.md section 8)."""
    import grpc

    from cloud.servicer import STATUS
    from cloud.verifier import Refusal

    assert set(STATUS) == set(Refusal)
    for refusal, code in STATUS.items():
        assert code == grpc.StatusCode[refusal.value], refusal
