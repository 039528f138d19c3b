"""HTTP API fuzzing against the live ingress on 127.0.0.1, and its security defaults.

Two generators: schemathesis, from the OpenAPI description the ingress publishes at
``/openapi.json`` (bodies that fit the schema, and bodies that break it on purpose), and
hand-written hypothesis strategies (arbitrary JSON, arbitrary bytes, odd headers and paths).
Whatever comes in: no 5xx, an answer within the timeout, every 4xx an OpenAI-style error with
a message (and Retry-After on 429), and the server healthy and idle afterwards.

Cases per run: ``DILASERVE_HTTP_FUZZ_CASES`` (default 1200 in all, split over the generators);
``DILASERVE_HTTP_FUZZ_CASES=20000`` for a long hunt.
"""

from __future__ import annotations

import json
import os

import httpx
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import MAX_PROMPT_TOKENS
from .reliability_helpers import API_KEY, MODEL, auth_headers, is_idle, wait_until

CASES = int(os.environ.get("DILASERVE_HTTP_FUZZ_CASES", "1200"))
TIMEOUT_S = 60.0
MAX_FUZZ_TOKENS = 24  # the schema is tightened to this so that accepted requests stay short
COUNTS: dict[str, int] = {}
SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def client(deployment):
    with httpx.Client(base_url=deployment.url, timeout=TIMEOUT_S, headers=auth_headers()) as c:
        yield c


def check_answer(r: httpx.Response, what: str) -> None:
    """The invariants every answer keeps."""
    COUNTS[what] = COUNTS.get(what, 0) + 1
    assert r.status_code < 500, f"{what}: {r.status_code} {r.text[:300]}"
    if r.status_code >= 400:
        body = r.json()
        assert isinstance(body, dict) and isinstance(body.get("error"), dict), r.text[:300]
        assert isinstance(body["error"].get("message"), str) and body["error"]["message"].strip(), r.text[:300]
        if r.status_code == 429:
            assert r.headers.get("retry-after", "").isdigit(), r.headers


# -- the published schema --------------------------------------------------------------------
def test_the_openapi_description_is_published_with_request_bodies(client):
    schema = client.get("/openapi.json").json()
    post = schema["paths"]["/v1/completions"]["post"]
    ref = post["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    body = schema["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert {"model", "prompt", "max_tokens", "deadline_ms", "quality_floor"} <= set(body["properties"])
    assert {"400", "401", "413", "429"} <= set(post["responses"])
    assert "/v1/chat/completions" in schema["paths"] and "/v1/models" in schema["paths"]


def _tightened(schema: dict) -> dict:
    """The published schema with short generations: an accepted fuzz case must finish fast."""
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        props = schema["components"]["schemas"][name]["properties"]
        for field in ("max_tokens", "max_completion_tokens", "steps"):
            if field in props:
                props[field] = {"anyOf": [{"type": "integer", "minimum": 1, "maximum": MAX_FUZZ_TOKENS},
                                          {"type": "null"}]}
        props["model"] = {"type": "string", "enum": [MODEL]}
    return schema


@pytest.fixture(scope="module")
def api_schema(client):
    import schemathesis

    return schemathesis.openapi.from_dict(_tightened(client.get("/openapi.json").json()))


POSTS = [("/v1/completions", "POST"), ("/v1/chat/completions", "POST"), ("/v1/dilaserve/policy", "POST")]
GETS = [("/v1/models", "GET"), ("/v1/dilaserve/replicas", "GET"), ("/health", "GET")]
# GET endpoints take no input: nothing to break on purpose.
OPERATIONS = [(*op, mode) for op in POSTS for mode in ("positive", "negative")] + [(*op, "positive") for op in GETS]
# Generation requests get most of the cases; GET endpoints take no input.
SHARES = {"/v1/completions": 0.3, "/v1/chat/completions": 0.25, "/v1/dilaserve/policy": 0.08}


@pytest.mark.parametrize("path, method, mode", OPERATIONS)
def test_schema_driven_fuzzing(api_schema, client, deployment, path, method, mode):
    from schemathesis import GenerationMode

    operation = api_schema[path][method]
    strategy = operation.as_strategy(generation_mode=GenerationMode(mode))
    examples = max(5, int(CASES * SHARES.get(path, 0.01) / 2))

    session = requests.Session()

    @settings(max_examples=examples, **SETTINGS)
    @given(case=strategy)
    def run(case):
        kwargs = case.as_transport_kwargs(base_url=deployment.url, headers=auth_headers())
        check_answer(session.request(**kwargs, timeout=TIMEOUT_S), f"schemathesis {mode}")

    try:
        run()
    finally:
        session.close()
        if path == "/v1/dilaserve/policy":  # put back what the fuzzing changed
            r = client.post("/v1/dilaserve/policy", json={"threshold": 0.9, "max_waiting": 4096})
            assert r.status_code == 200, r.text


# -- hand-written generators -------------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
_fields = {
    "model": st.sampled_from([MODEL, "", "nope", 3]), "prompt": st.one_of(
        st.text(max_size=40), st.lists(st.integers(-5, 400), max_size=12), st.lists(st.text(max_size=5), max_size=3),
        st.lists(st.integers(0, 250), min_size=MAX_PROMPT_TOKENS - 2, max_size=MAX_PROMPT_TOKENS + 3)),
    "max_tokens": st.integers(-3, MAX_FUZZ_TOKENS) | st.sampled_from([10**6, 2**64, 1.5, "8"]),
    "stream": st.booleans(), "threshold": st.floats(-1, 2) | st.sampled_from([0, 1, "0.9"]),
    "block_length": st.integers(-1, 40), "steps": st.integers(-1, MAX_FUZZ_TOKENS) | st.just(10**9),
    "chunk_size": st.integers(-1, 40), "cache": st.sampled_from(["none", "prefix", "dual", "exact", 1]),
    "deadline_ms": st.floats(-10, 1e5) | st.just(1e300), "quality_floor": st.floats(-1, 2),
    "best_effort": st.booleans() | st.just("yes"), "temperature": st.floats(-1, 3),
    "stop": st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=20)),
    "seed": st.integers(-2**70, 2**70), "n": st.integers(0, 3), "top_k": st.integers(-1, 1000),
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "tool", ""]),
                                                "content": st.text(max_size=30) | json_values}), max_size=3),
    "treshold": st.floats(0, 1),
}
openai_like = st.fixed_dictionaries({}, optional=_fields)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_property_openai_like_bodies(client, path):
    @settings(max_examples=max(5, int(CASES * 0.12)), **SETTINGS)
    @given(body=openai_like)
    def run(body):
        check_answer(client.post(path, json=body), "hypothesis openai-like")

    run()


def test_property_arbitrary_json_bytes_and_headers(client):
    @settings(max_examples=max(5, int(CASES * 0.06)), **SETTINGS)
    @given(payload=json_values.map(json.dumps).map(str.encode) | st.binary(max_size=200),
           content_type=st.sampled_from(["application/json", "text/plain", "", "application/json; charset=latin-1"]),
           path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/dilaserve/policy"]))
    def run(payload, content_type, path):
        headers = {"content-type": content_type} if content_type else {}
        check_answer(client.post(path, content=payload, headers=headers), "hypothesis raw")

    run()


def test_property_unknown_routes_and_methods(client):
    @settings(max_examples=max(5, int(CASES * 0.02)), **SETTINGS)
    @given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
           path=st.sampled_from(["/v1/completions", "/v1/models", "/v2/x", "/v1/dilaserve/nope", "/..%2f", "/v1/"])
           | st.text("abcdefghijklmnopqrstuvwxyz/-_.%", max_size=20).map(lambda p: "/" + p))
    def run(method, path):
        r = client.request(method, path, json={"model": MODEL, "prompt": "1+1="} if method != "GET" else None)
        check_answer(r, "hypothesis routes")

    run()


# -- size limits and authentication -------------------------------------------------------------
def test_request_size_limits(client, deployment):
    limit = deployment.config.http.max_body_bytes
    big = client.post("/v1/completions", content=b'{"model": "' + b"x" * limit + b'"}',
                      headers={"content-type": "application/json"})
    assert big.status_code == 413 and str(limit) in big.json()["error"]["message"]
    long = client.post("/v1/completions", json={"model": MODEL, "prompt": [5] * (MAX_PROMPT_TOKENS + 1)})
    assert long.status_code == 400 and f"at most {MAX_PROMPT_TOKENS}" in long.json()["error"]["message"]
    fits = client.post("/v1/completions", json={"model": MODEL, "prompt": [5] * MAX_PROMPT_TOKENS, "max_tokens": 4})
    assert fits.status_code == 200, fits.text
    COUNTS["limits"] = 3


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY},
                                     {"Authorization": f"Basic {API_KEY}"}])
def test_an_api_key_is_required_when_configured(deployment, headers):
    for method, path, body in [("POST", "/v1/completions", {"model": MODEL, "prompt": "1+1="}),
                               ("POST", "/v1/chat/completions", {"model": MODEL, "messages": []}),
                               ("GET", "/v1/models", None), ("GET", "/v1/dilaserve/replicas", None),
                               ("POST", "/v1/dilaserve/policy", {"threshold": 0.1})]:
        r = httpx.request(method, deployment.url + path, json=body, headers=headers, timeout=30)
        assert r.status_code == 401, (path, r.text)
        assert "API key" in r.json()["error"]["message"]
    ok = httpx.get(deployment.url + "/v1/models", headers=auth_headers(), timeout=30)
    assert ok.status_code == 200
    assert httpx.get(deployment.url + "/health", timeout=30).status_code == 200  # probes need no key


# -- afterwards -------------------------------------------------------------------------------
def test_the_server_is_healthy_and_idle_after_the_fuzzing(client):
    total = sum(COUNTS.values())
    print(f"\nHTTP fuzz cases: {total} ({COUNTS})")
    assert total >= min(CASES, 1000) * 0.8, COUNTS
    assert client.get("/health").json()["status"] == "ok"
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 8})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
    assert wait_until(lambda: is_idle(str(client.base_url).rstrip("/")), 60), "pages or requests left behind"
