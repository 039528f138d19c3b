"""What a replica fills into a request's params: its default threshold, and its sparse-KV
retention (the controller's plan) only where the request left it open and sparse KV is valid."""

from __future__ import annotations

import pytest

from dilaserve.engine.sampling_params import SamplingParams
from dilaserve.serving.config import parse_config
from dilaserve.serving.openai_protocol import with_replica_defaults


def fill(params: SamplingParams, kv_retention: float | None = 0.5, is_block_causal: bool = False) -> SamplingParams:
    out = with_replica_defaults(params, 0.9, kv_retention, is_block_causal)
    out.validate()  # never an invalid combination
    return out


def test_an_open_dual_cache_request_takes_the_replica_retention_and_threshold():
    out = fill(SamplingParams())
    assert (out.threshold, out.kv_retention) == (0.9, 0.5)


def test_a_dense_replica_leaves_requests_as_they_are():
    assert fill(SamplingParams(), kv_retention=None).kv_retention is None
    assert fill(SamplingParams(kv_retention=0.25), kv_retention=None).kv_retention == 0.25


@pytest.mark.parametrize("params", [
    SamplingParams(kv_retention=0.75),  # its own retention
    SamplingParams(cache="prefix"),
    SamplingParams(cache="none"),
    SamplingParams(refresh_interval=4),  # sparse selects at block-start refreshes only
])
def test_sparse_is_not_forced_where_the_request_says_otherwise_or_it_is_invalid(params):
    assert fill(params).kv_retention == params.kv_retention


def test_block_causal_models_stay_dense():
    params = SamplingParams(cache="exact")
    assert fill(params, is_block_causal=True).kv_retention is None
    assert fill(SamplingParams(), is_block_causal=True).kv_retention is None


def test_threshold_rules_are_unchanged():
    assert fill(SamplingParams(threshold=0.7)).threshold == 0.7
    assert fill(SamplingParams(threshold_floor=0.95)).threshold == 0.95
    assert fill(SamplingParams(steps=32)).threshold is None


def test_a_variant_may_start_sparse():
    config = parse_config({"models": [{"name": "m"}], "variants": [{"name": "v", "model": "m", "kv_retention": 0.5}]},
                          "test")
    assert config.variants[0].kv_retention == 0.5
    with pytest.raises(Exception, match="kv_retention"):
        parse_config({"models": [{"name": "m"}], "variants": [{"name": "v", "model": "m", "kv_retention": 0}]}, "test")
