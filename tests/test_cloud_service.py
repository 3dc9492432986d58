"""sqs_rpc.service: the service's one name and the one health probe, against a live tiny cloud."""

from __future__ import annotations

import grpc

from sqs_rpc.service import SERVICE, SERVICE_NAME, probe


def test_the_service_name_is_the_protos():
    assert SERVICE_NAME == "sqs.v1.Verifier"
    assert {m.name for m in SERVICE.methods} == {"OpenSession", "Verify", "VerifyBatch", "CloseSession"}


def test_probe_by_address_and_by_channel(cloud):
    assert probe(cloud.address, 5.0) == (True, "SERVING")
    assert probe(cloud.address, 5.0, service="") == (True, "SERVING")  # the server as a whole
    serving, status = probe(cloud.address, 5.0, service="no.such.Service")
    assert not serving and status.startswith("NOT_FOUND: ")
    with grpc.insecure_channel(cloud.address) as channel:  # a channel the caller owns stays open
        assert probe(channel, 5.0) == (True, "SERVING")
        assert probe(channel, 5.0, wait_for_ready=True) == (True, "SERVING")


def test_probe_of_a_dead_port_says_the_code_and_why(free_port):
    serving, status = probe(f"127.0.0.1:{free_port()}", 2.0)
    assert not serving and status.startswith("UNAVAILABLE: ") and len(status) > len("UNAVAILABLE: ")
