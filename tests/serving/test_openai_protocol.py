"""Request bodies -> engine settings, and the 400s for bad bodies (no Ray)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from dilaserve.serving.config import RequestDefaults
from dilaserve.serving.openai_protocol import (
    ApiError, ChatCompletionRequest, CompletionRequest, parse_body, resolve_max_tokens, slo_targets, to_sampling_params,
)

DEFAULTS = RequestDefaults(max_tokens=64, block_length=16, temperature=0.0, cache="dual")


def completion(**fields) -> CompletionRequest:
    return parse_body(CompletionRequest, json.dumps({"model": "m", "prompt": "hi", **fields}).encode())


def bad(model, body: bytes | str | dict) -> ApiError:
    raw = json.dumps(body).encode() if isinstance(body, dict) else (body.encode() if isinstance(body, str) else body)
    with pytest.raises(ApiError) as info:
        parse_body(model, raw)
    assert info.value.status == 400
    assert set(info.value.body()["error"]) == {"message", "type", "param", "code"}
    return info.value


def test_openai_and_dilaserve_fields_map_to_sampling_params():
    req = completion(max_tokens=40, temperature=0.5, top_p=0.9, stop=["\n\n", "END"], seed=7, threshold=0.8,
                     block_length=8, min_chunk=2, max_chunk=4, cache="prefix", quality_floor=0.6)
    params = to_sampling_params(req, DEFAULTS, max_tokens=40, stop_token_ids=(5,))
    assert (params.max_tokens, params.block_size, params.threshold, params.threshold_floor) == (40, 8, 0.8, 0.6)
    assert (params.temperature, params.top_p, params.seed, params.cache) == (0.5, 0.9, 7, "prefix")
    assert params.stop == ("\n\n", "END") and params.stop_token_ids == (5,)
    assert params.chunk_bounds == (2, 4)


def test_defaults_leave_threshold_to_the_replica():
    params = to_sampling_params(completion(), DEFAULTS, max_tokens=64, default_floor=0.5)
    assert params.threshold is None and params.threshold_floor == 0.5
    assert (params.block_size, params.cache, params.temperature) == (16, "dual", 0.0)


def test_steps_override_threshold():
    params = to_sampling_params(completion(steps=8, block_length=16), DEFAULTS, max_tokens=64)
    assert params.steps == 8 and params.threshold is None and params.threshold_floor is None


def test_slo_fields_in_seconds():
    targets = slo_targets(completion(deadline_ms=1500, ttft_ms=200, tpot_ms=20))
    assert (targets.deadline_s, targets.ttft_s, targets.tpot_s) == (1.5, 0.2, 0.02)


def test_prompt_forms():
    assert completion(prompt=[1, 2, 3]).prompt == [1, 2, 3]
    assert completion(prompt=["only one"]).prompt == "only one"
    assert "batched" in bad(CompletionRequest, {"model": "m", "prompt": ["a", "b"]}).message
    assert "batched" in bad(CompletionRequest, {"model": "m", "prompt": [[1], [2]]}).message
    assert "integer token ids" in bad(CompletionRequest, {"model": "m", "prompt": [1, "x"]}).message
    assert "integer token ids" in bad(CompletionRequest, {"model": "m", "prompt": 5}).message


def test_chat_messages_and_max_completion_tokens():
    req = parse_body(ChatCompletionRequest, json.dumps({
        "model": "m", "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        ],
        "max_completion_tokens": 12, "max_tokens": 99,
    }).encode())
    assert req.messages[1].text() == "ab" and req.requested_max_tokens() == 12


@pytest.mark.parametrize("body, where", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ({"prompt": "x"}, "model: this field is required"),
    ({"model": "m"}, "prompt: this field is required"),
    ({"model": "m", "prompt": "x", "max_tokens": "10"}, "max_tokens"),
    ({"model": "m", "prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"model": "m", "prompt": "x", "max_tokens": 2.5}, "max_tokens"),
    ({"model": "m", "prompt": "x", "stream": "yes"}, "stream"),
    ({"model": "m", "prompt": "x", "threshold": 0}, "threshold"),
    ({"model": "m", "prompt": "x", "threshold": 1.5}, "threshold"),
    ({"model": "m", "prompt": "x", "treshold": 0.5}, "treshold: unknown field"),
    ({"model": "m", "prompt": "x", "n": 2}, "n = 1"),
    ({"model": "m", "prompt": "x", "stop": ""}, "non-empty"),
    ({"model": "m", "prompt": "x", "threshold": 0.5, "quality_floor": 0.7}, "quality_floor"),
    ({"model": "m", "prompt": "x", "presence_penalty": 1.0}, "presence_penalty"),
    ({"model": "m", "prompt": "x", "echo": True}, "echo"),
    ({"model": "m", "prompt": "x", "deadline_ms": -5}, "deadline_ms"),
    ('{"model": "m", "prompt": "x", "deadline_ms": Infinity}', "deadline_ms: Input should be a finite number"),
    ('{"model": "m", "prompt": "x", "threshold": NaN}', "threshold: Input should be a finite number"),
    ('{"model": "m", "prompt": "x", "temperature": -Infinity}', "temperature"),
])
def test_bad_completion_bodies_are_400_naming_the_problem(body, where):
    assert where in bad(CompletionRequest, body).message


def test_bad_chat_bodies():
    assert "messages" in bad(ChatCompletionRequest, {"model": "m", "messages": []}).message
    assert "role" in bad(ChatCompletionRequest, {"model": "m", "messages": [{"role": "robot", "content": "x"}]}).message


def test_max_tokens_must_fit_the_model():
    assert resolve_max_tokens(None, 128, prompt_len=1000, max_positions=1024) == 24
    assert resolve_max_tokens(10, 128, 10, 1024) == 10
    with pytest.raises(ApiError, match="exceeds the model's maximum"):
        resolve_max_tokens(100, 128, 1000, 1024)
    with pytest.raises(ApiError, match="leaves no room"):
        resolve_max_tokens(None, 128, 1024, 1024)


def test_engine_validation_surfaces_as_400():
    with pytest.raises(ApiError, match="chunk size bounds") as info:
        to_sampling_params(completion(block_length=8, max_chunk=16), DEFAULTS, max_tokens=32)
    assert info.value.status == 400
    with pytest.raises(ApiError, match="not divisible"):
        to_sampling_params(completion(steps=3, block_length=16), DEFAULTS, max_tokens=32)


def test_api_key_is_checked_when_configured():
    from types import SimpleNamespace

    from dilaserve.serving.config import HttpConfig
    from dilaserve.serving.ingress import OpenAIIngress

    ingress = OpenAIIngress.__new__(OpenAIIngress)  # only _authorize is exercised
    ingress.config = SimpleNamespace(http=HttpConfig(api_key="s3cret"))
    ingress._authorize(SimpleNamespace(headers={"authorization": "Bearer s3cret"}))
    for headers in ({}, {"authorization": "Bearer nope"}):
        with pytest.raises(ApiError) as info:
            ingress._authorize(SimpleNamespace(headers=headers))
        assert info.value.status == 401 and info.value.body()["error"]["code"] == "invalid_api_key"
    ingress.config = SimpleNamespace(http=HttpConfig(api_key=None))
    ingress._authorize(SimpleNamespace(headers={}))


def test_sparse_kv_field():
    assert to_sampling_params(completion(kv_retention=0.5), DEFAULTS, max_tokens=32).kv_retention == 0.5
    assert to_sampling_params(completion(), DEFAULTS, max_tokens=32).kv_retention is None
    with pytest.raises(ApiError, match="needs cache 'dual'") as info:
        to_sampling_params(completion(kv_retention=0.5, cache="prefix"), DEFAULTS, max_tokens=32)
    assert info.value.status == 400
    assert bad(CompletionRequest, {"model": "m", "prompt": "x", "kv_retention": 0}).param == "kv_retention"
    # A configured default applies to requests that leave both fields out.
    sparse = dataclasses.replace(DEFAULTS, kv_retention=0.5)
    assert to_sampling_params(completion(), sparse, max_tokens=32).kv_retention == 0.5
    assert to_sampling_params(completion(kv_retention=0.75), sparse, max_tokens=32).kv_retention == 0.75
    assert to_sampling_params(completion(cache="prefix"), sparse, max_tokens=32).kv_retention is None


def chat(**fields) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}


def test_chat_fields_clients_send_by_default_are_accepted_at_neutral_values():
    """What client libraries put in every body (tool lists left empty, text output, no storing)
    must not be a 400; the same fields asking for something DiLaServe does not do are refused
    with a reason, not as unknown fields."""
    neutral = dict(response_format={"type": "text"}, tools=[], tool_choice="none", parallel_tool_calls=False,
                   top_logprobs=0, logprobs=False, modalities=["text"], store=False, metadata={"team": "a"},
                   service_tier="auto", prompt_cache_key="k", safety_identifier="u1", user="u1")
    req = parse_body(ChatCompletionRequest, json.dumps(chat(**neutral)).encode())
    assert req.messages[0].text() == "hi"
    for fields, says in [
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools are not supported"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"top_logprobs": 3}, "logprobs are not supported"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"store": True}, "store is not supported"),
        ({"service_tier": "flex"}, "service_tier"),
        ({"metadata": {"a": 1}}, "metadata"),
    ]:
        error = bad(ChatCompletionRequest, chat(**fields))
        assert says in error.message, (fields, error.message)
