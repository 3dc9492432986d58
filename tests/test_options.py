"""The generation options, declared once (edge/options.py): every front end takes the same names,
defaults and ranges, and refuses non-finite numbers."""

from __future__ import annotations

import argparse
import math

import pytest
from fastapi.testclient import TestClient

from edge import options
from edge.api import EdgeServerConfig, GenerateRequest, create_app
from edge.options import add_generation_args
from edge.drafter import DraftConfig
from loadtest.runner import LoadTestConfig


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(exit_on_error=False)
    add_generation_args(ap)
    return ap


def test_every_option_is_a_flag_a_request_field_and_a_load_test_field():
    ns = parser().parse_args([])
    fields = GenerateRequest.model_fields
    lt = {f for f in LoadTestConfig.__dataclass_fields__}
    for o in options.OPTIONS:
        assert hasattr(ns, o.name) and getattr(ns, o.name) == o.default, o.name
        assert o.name in fields, o.name
        assert o.name in lt, o.name
        if o.name != "draft_len":  # the server's default fills an omitted draft_len
            assert fields[o.name].default == o.default, o.name


@pytest.mark.parametrize("name,bad", [
    ("temperature", "nan"), ("temperature", "-1"), ("top_p", "0"), ("k", "0"), ("k", "5000"), ("ell", "auto2"),
    ("budget_bits", "inf"), ("draft_len", "257"), ("beta0", "nan"), ("sparsifier", "magic"), ("seed", "-1"),
])
def test_the_cli_and_the_http_api_refuse_the_same_values(name, bad):
    flag = "--" + name.replace("_", "-")
    with pytest.raises((argparse.ArgumentError, SystemExit)):
        parser().parse_args([flag, bad])
    value = bad
    try:
        value = float(bad) if name != "sparsifier" else bad
        value = int(value) if options.BY_NAME[name].kind is int and math.isfinite(value) else value
    except ValueError:
        pass
    with pytest.raises(Exception):
        GenerateRequest(prompt="x", **{name: value})
    with pytest.raises(ValueError):
        options.options_from({name: value})


def test_http_nan_is_422_not_500():
    app = create_app(EdgeServerConfig(cloud="127.0.0.1:1"), engine=object())
    with TestClient(app) as client:
        r = client.post("/v1/generate", content='{"prompt": "x", "temperature": NaN}',
                        headers={"content-type": "application/json"})
        assert r.status_code == 422 and "detail" in r.json()


def test_auto_and_numbers_reach_the_draft_config():
    cfg = DraftConfig.from_options(parser().parse_args(["--draft-len", "6", "--k", "4", "--ell", "50"]), 128)
    assert (cfg.max_draft_len, cfg.scheme.k, cfg.scheme.ell, cfg.k_auto, cfg.ell_auto) == (6, 4, 50, False, False)
    auto = DraftConfig.from_options(parser().parse_args([]), 128)
    assert auto.adaptive and auto.k_auto and auto.ell_auto and auto.pipeline
    plain = DraftConfig.from_options({"draft_len": 0}, 128)
    assert plain.scheme.scheme.value == "none"
