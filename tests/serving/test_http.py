"""The serving path end to end: HTTP -> Serve ingress -> replica -> real engine, on 127.0.0.1.

Invariants rather than snapshots: greedy streams equal non-streamed output; a refused request
does not disturb admitted ones; a live threshold change reaches new requests only; a client
that leaves mid-stream frees the replica's pages; every bad input is a 4xx with an
OpenAI-style body and the server keeps serving.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from serving_helpers import MAX_BODY_BYTES, MODEL, needs_engine, wait_for

pytestmark = needs_engine


@pytest.fixture(scope="module")
def client(served):
    with httpx.Client(base_url=served.url, timeout=60) as c:
        yield c


def complete(client, **fields) -> httpx.Response:
    return client.post("/v1/completions", json={"model": MODEL, "prompt": "2+3=", **fields})


def read_sse(response: httpx.Response) -> list[dict | str]:
    events = []
    for line in response.iter_lines():
        if not line:
            continue
        assert line.startswith("data: "), line
        data = line.removeprefix("data: ")
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def stream(client, path: str, body: dict) -> list[dict | str]:
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return read_sse(r)


def replica_stats(client) -> dict[str, dict]:
    return client.get("/v1/dilaserve/replicas").json()["replicas"]


def all_idle(client) -> bool:
    stats = replica_stats(client)
    return all(s["engine"]["num_running"] == 0 and s["engine"]["num_waiting"] == 0
               and s["engine"]["pages_free"] == s["engine"]["pages_total"] for s in stats.values())


def set_policy(client, **fields) -> dict:
    r = client.post("/v1/dilaserve/policy", json=fields)
    assert r.status_code == 200, r.text
    return r.json()


def assert_openai_error(r: httpx.Response, status: int, says: str) -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert says.lower() in error["message"].lower(), error["message"]


def test_models_lists_the_configured_model(client):
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [MODEL]
    assert body["data"][0]["max_model_len"] == 1024


def test_health(client):
    r = client.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_completion_with_usage(client):
    r = complete(client, max_tokens=24)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    choice = body["choices"][0]
    assert isinstance(choice["text"], str) and choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] == 4 and 1 <= usage["completion_tokens"] <= 24
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    extra = body["dilaserve"]
    assert extra["replica"] in ("cpu-0", "cpu-1") and extra["threshold"] == 0.9
    assert extra["deadline_source"] == "slo_scale" and extra["num_steps"] >= 1
    assert 1 <= extra["chunk_size"] <= 32  # the mean chunk, within the default block


def test_chat_completion_uses_the_chat_template(client):
    r = client.post("/v1/chat/completions", json={
        "model": MODEL, "max_tokens": 16,
        "messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "2+3?"}],
    })
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    # The template adds headers and turn markers, so the prompt is longer than the raw text.
    assert body["usage"]["prompt_tokens"] > len("Answer briefly.2+3?")


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "The sum of 12 and 30 is", "max_tokens": 48, "block_length": 16}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "count to five"}], "max_tokens": 40,
                              "block_length": 8, "threshold": 0.7}),
])
def test_stream_arrives_in_order_and_equals_the_non_streamed_greedy_output(client, path, body):
    body = {"model": MODEL, **body}
    full = client.post(path, json=body).json()
    events = stream(client, path, {**body, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert usage["choices"] == [] and usage["usage"] == full["usage"]
    assert len({c["id"] for c in chunks}) == 1
    is_chat = path.endswith("chat/completions")
    texts = [(c["choices"][0]["delta"].get("content") or "") if is_chat else c["choices"][0]["text"] for c in chunks]
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    full_text = full["choices"][0]["message"]["content"] if is_chat else full["choices"][0]["text"]
    assert "".join(texts) == full_text
    # Each chunk carries its own token ids: in order, they are exactly the whole output.
    streamed_ids = [t for c in chunks for t in c.get("dilaserve", {}).get("token_ids", [])]
    assert streamed_ids == full["dilaserve"]["token_ids"]
    assert len(streamed_ids) == full["usage"]["completion_tokens"]


def test_official_openai_client(served):
    openai = pytest.importorskip("openai")
    oai = openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in oai.models.list()] == [MODEL]
    completion = oai.completions.create(model=MODEL, prompt="1+1=", max_tokens=16, extra_body={"threshold": 0.8})
    assert completion.choices[0].finish_reason in ("stop", "length") and completion.usage.completion_tokens >= 1
    chat = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=16)
    assert chat.choices[0].message.role == "assistant"
    text = "".join(c.choices[0].text for c in oai.completions.create(
        model=MODEL, prompt="1+1=", max_tokens=16, extra_body={"threshold": 0.8}, stream=True))
    assert text == completion.choices[0].text
    pieces = [c.choices[0].delta.content or "" for c in oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=16, stream=True) if c.choices]
    assert "".join(pieces) == chat.choices[0].message.content
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="no-such-model", prompt="x", max_tokens=4)


def test_impossible_deadline_is_refused_at_once_while_admitted_requests_finish(client, served):
    def admitted(i: int) -> httpx.Response:
        return complete(client, prompt=f"{i}+{i}=", max_tokens=64, block_length=16)

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(admitted, i) for i in range(4)]
        start = time.monotonic()
        refused = complete(client, max_tokens=64, deadline_ms=0.5)
        refused_after_s = time.monotonic() - start
        results = [f.result() for f in futures]
    assert_openai_error(refused, 429, "deadline")
    assert refused.json()["error"]["code"] == "deadline_unattainable"
    assert int(refused.headers["retry-after"]) >= 1
    assert refused_after_s < 2.0
    assert [r.status_code for r in results] == [200] * 4
    # The same request as best effort is served.
    r = complete(client, max_tokens=16, deadline_ms=0.5, best_effort=True)
    assert r.status_code == 200 and r.json()["dilaserve"]["slo_met"] is False


def test_routing_prefers_the_replica_with_most_slack(client):
    long_body = {"model": MODEL, "prompt": "go", "max_tokens": 900, "threshold": 1.0, "cache": "none",
                 "best_effort": True, "stream": True}
    with client.stream("POST", "/v1/completions", json=long_body) as r:
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        busy = wait_for(lambda: [n for n, s in replica_stats(client).items() if s["engine"]["num_running"]], 5.0)
        assert len(busy) == 1
        for _ in range(3):
            short = complete(client, max_tokens=16, best_effort=True)  # routing, not admission, is tested
            assert short.status_code == 200, short.text
            assert short.json()["dilaserve"]["replica"] != busy[0]
    assert wait_for(lambda: all_idle(client), 10.0)


def test_client_disconnect_mid_stream_aborts_and_frees_pages(client):
    finished_before = sum(s["engine"]["num_finished"] for s in replica_stats(client).values())
    body = {"model": MODEL, "prompt": "go", "max_tokens": 900, "threshold": 1.0, "cache": "none",
            "best_effort": True, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(line for line in lines if line.startswith("data: "))
        assert not all_idle(client)
    start = time.monotonic()
    assert wait_for(lambda: all_idle(client), 10.0), replica_stats(client)
    assert time.monotonic() - start < 2.0  # far sooner than the ~900 decoding steps would take
    finished_after = sum(s["engine"]["num_finished"] for s in replica_stats(client).values())
    assert finished_after == finished_before  # aborted, not run to the end
    assert complete(client, max_tokens=8).status_code == 200


def test_client_that_leaves_a_non_streamed_request_aborts_it(client, served):
    finished_before = sum(s["engine"]["num_finished"] for s in replica_stats(client).values())
    body = {"model": MODEL, "prompt": "go", "max_tokens": 900, "threshold": 1.0, "cache": "none", "best_effort": True}
    with httpx.Client(base_url=served.url, timeout=0.5) as impatient:
        with pytest.raises(httpx.ReadTimeout):
            impatient.post("/v1/completions", json=body)
    assert wait_for(lambda: all_idle(client), 5.0), replica_stats(client)
    assert sum(s["engine"]["num_finished"] for s in replica_stats(client).values()) == finished_before


def test_live_threshold_change_reaches_new_requests_without_losing_running_ones(client):
    body = {"model": MODEL, "prompt": "go", "max_tokens": 256, "cache": "none", "best_effort": True}  # no threshold
    results: dict[str, object] = {}

    def in_flight():
        results["events"] = stream(client, "/v1/completions", body)

    try:
        set_policy(client, threshold=1.0)
        worker = threading.Thread(target=in_flight)
        worker.start()
        assert wait_for(lambda: not all_idle(client), 5.0)
        policy = set_policy(client, threshold=0.05)
        assert all(r["default_threshold"] == 0.05 for r in policy["replicas"].values())
        loose = complete(client, prompt="go", max_tokens=64, cache="none", best_effort=True).json()["dilaserve"]
        worker.join(60)
        strict = results["events"][-2]["dilaserve"]
        assert results["events"][-1] == "[DONE]"
        assert strict["threshold"] == 1.0 and loose["threshold"] == 0.05
        assert results["events"][-2]["choices"][0]["finish_reason"] in ("stop", "length")
        # A threshold of 1.0 commits about one token per step; 0.05 commits many.
        assert loose["num_tokens_decided"] / loose["num_steps"] > strict["num_tokens_decided"] / strict["num_steps"]
    finally:
        set_policy(client, threshold=0.9)


def test_policy_endpoint_rejects_bad_values(client):
    assert_openai_error(client.post("/v1/dilaserve/policy", json={"threshold": 0}), 400, "threshold")
    assert_openai_error(client.post("/v1/dilaserve/policy", json={"replicas": ["nope"]}), 400, "unknown replica")


@pytest.mark.parametrize("body, status, says", [
    (b"{not json", 400, "not valid JSON"),
    ({"prompt": "x"}, 400, "model: this field is required"),
    ({"model": MODEL}, 400, "prompt: this field is required"),
    ({"model": MODEL, "prompt": 42}, 400, "prompt must be"),
    ({"model": MODEL, "prompt": "x", "max_tokens": "8"}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"model": "gpt-4", "prompt": "x"}, 404, "does not exist"),
    ({"model": MODEL, "prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 10**9}, 400, "exceeds the model's maximum"),
    ({"model": MODEL, "prompt": list(range(1, 200)) * 6}, 400, "leaves no room"),
    ({"model": MODEL, "prompt": list(range(1, 200)) * 5, "max_tokens": 200}, 400, "exceeds the model's maximum"),
    ({"model": MODEL, "prompt": [1, 2, 10**6]}, 400, "outside the vocabulary"),
    ({"model": MODEL, "prompt": ""}, 400, "prompt is empty"),
    ({"model": MODEL, "prompt": "x", "threshold": 0.0}, 400, "threshold"),
    ({"model": MODEL, "prompt": "x", "threshold": 1.01}, 400, "threshold"),
    ({"model": MODEL, "prompt": "x", "threshold": -1}, 400, "threshold"),
    ({"model": MODEL, "prompt": "x", "block_length": 8, "chunk_size": 9}, 400, "chunk size"),
    ({"model": MODEL, "prompt": "x" * (MAX_BODY_BYTES + 10)}, 413, "exceeds"),
])
def test_bad_input_is_a_4xx_with_an_openai_error_and_serving_goes_on(client, body, status, says):
    if isinstance(body, bytes):
        r = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    else:
        r = client.post("/v1/completions", json=body)
    assert_openai_error(r, status, says)
    assert complete(client, max_tokens=4).status_code == 200


def test_bad_chat_input_and_unknown_routes(client):
    assert_openai_error(client.post("/v1/chat/completions", json={"model": MODEL, "messages": []}), 400, "messages")
    assert_openai_error(client.post("/v1/chat/completions", json={"model": MODEL, "messages": "hi"}), 400, "messages")
    assert_openai_error(client.get("/v1/nothing"), 404, "no route")
    assert_openai_error(client.get("/v1/completions"), 405, "no route")


def test_metrics_page_shows_request_slo_and_replica_metrics(client):
    complete(client, max_tokens=8)
    complete(client, max_tokens=8, deadline_ms=0.5)  # a refusal
    wanted = [
        "ray_dilaserve_requests_total", "ray_dilaserve_admission_total", "ray_dilaserve_slo_total",
        "ray_dilaserve_ttft_seconds_bucket", "ray_dilaserve_tpot_seconds_bucket",
        "ray_dilaserve_e2e_latency_seconds_bucket", "ray_dilaserve_request_threshold_bucket",
        "ray_dilaserve_replica_threshold", "ray_dilaserve_replica_queue_length",
        "ray_dilaserve_replica_predicted_backlog_seconds",
    ]

    def page():
        text = client.get("/metrics").text
        return text if all(name in text for name in wanted) and 'decision="refused"' in text else None

    text = wait_for(page, 20.0, interval_s=1.0)
    assert text, [name for name in wanted if name not in client.get("/metrics").text]
    assert 'outcome="met"' in text or 'outcome="missed"' in text


def test_stop_string_ends_the_text_before_it_and_frees_the_request(client):
    body = {"model": MODEL, "prompt": "The sum of 12 and 30 is", "max_tokens": 64, "block_length": 16}
    full = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    if len(full) < 4:
        pytest.skip("the random model ended its text at once")
    stop = full[len(full) // 2: len(full) // 2 + 2]
    expected = full[: full.find(stop)]
    stopped = client.post("/v1/completions", json={**body, "stop": [stop]}).json()
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["choices"][0]["text"] == expected
    events = stream(client, "/v1/completions", {**body, "stop": stop})
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == expected
    assert wait_for(lambda: all_idle(client), 5.0)



@pytest.fixture(scope="module")
def embedded(served):
    """The embedded model (what ``dilaserve serve`` serves by default) beside the test app."""
    from ray import serve

    from dilaserve.models.store import EMBEDDED_MODELS_DIR
    from dilaserve.serving.app import build_app
    from dilaserve.serving.config import parse_config

    name = "dilaserve-tiny-arith"
    config = parse_config({
        "app_name": "embedded",
        "models": [{"name": name, "path": str(EMBEDDED_MODELS_DIR / name)}],
        "variants": [{"name": "cpu", "model": name, "num_replicas": 1, "num_cpus_per_replica": 0.25,
                      "engine": {"kv_memory_gib": 0.05}}],
        "http": {"host": "127.0.0.1", "port": 8000, "ingress_num_cpus": 0.1},
    }, "embedded test config")
    serve.run(build_app(config), name="embedded", route_prefix="/embedded")
    try:
        with httpx.Client(base_url=f"{served.url}/embedded", timeout=60) as c:
            yield c, name
    finally:
        serve.delete("embedded")


def test_a_completion_with_no_tokens_is_answered(embedded):
    """The embedded model ends a prompt outside its chat format at once: a 200 with empty text
    and zero completion tokens, streamed or not (Ray's counters refuse inc(0), which made the
    README's first request a 500)."""
    client, name = embedded
    body = {"model": name, "prompt": "12+30=", "max_tokens": 16}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["usage"]["completion_tokens"] == 0, f"the embedded model now answers {body['prompt']!r}: {out}"
    assert out["choices"][0]["text"] == "" and out["choices"][0]["finish_reason"] == "stop"
    events = stream(client, "/v1/completions", body)
    assert events[-1] == "[DONE]" and [e["choices"][0]["text"] for e in events[:-1]] == [""]
    chat = client.post("/v1/chat/completions", json={"model": name, "max_tokens": 16,
                                                     "messages": [{"role": "user", "content": "What is 12+30?"}]})
    assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] > 0, chat.text


def test_the_openai_client_example_runs_against_the_embedded_model(embedded, served):
    """``examples/openai_client.py`` as the README points users to it: the embedded model
    solves its completion and chat problems, and the impossible deadline is refused."""
    pytest.importorskip("openai")
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "examples" / "openai_client.py"
    run = subprocess.run([sys.executable, str(script), "--base-url", f"{served.url}/embedded/v1"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith("completion:") and "#### 7" in lines[0], run.stdout
    assert "#### 11" in run.stdout and "refused:" in run.stdout and "best effort: stop" in run.stdout, run.stdout
