"""The open-loop replayer against a fake streaming server."""

from __future__ import annotations

import asyncio
import random

import pytest
from fake_openai_server import Reply

from dilaserve.replay.client import ReplayConfig, calibrate_baseline, prepare_requests, replay
from dilaserve.replay.metrics import compute_metrics
from dilaserve.replay.prompts import FillerPromptBuilder
from dilaserve.replay.records import Status
from dilaserve.replay.slo import LinearLatency
from dilaserve.replay.trace import Trace, TraceRequest


def make_trace(arrivals, prompt_tokens=20, output_tokens=4) -> Trace:
    return Trace(tuple(TraceRequest(t, prompt_tokens, output_tokens) for t in arrivals))


def config(server, **kw) -> ReplayConfig:
    kw.setdefault("show_progress", False)
    kw.setdefault("system", "fake")
    return ReplayConfig(endpoint=server.url, **kw)


class AnswerBuilder:
    """Prompts whose answer is always 42."""

    def build(self, prompt_tokens, rng):
        return "x " * prompt_tokens, lambda completion: "#### 42" in completion


def test_arrivals_are_open_loop_when_the_server_is_slow(fake_server):
    fake_server.behaviour = lambda i, body: Reply(ttft_s=1.0)
    arrivals = [0.0, 0.1, 0.2, 0.3, 0.45, 0.6]
    records = replay(make_trace(arrivals), config(fake_server), FillerPromptBuilder())
    assert [r.status for r in records] == [Status.OK] * len(arrivals)
    # Every request went out at its trace time although no reply had come back yet.
    for r in records:
        assert r.send_s - r.arrival_s < 0.05
        assert r.ttft_s >= 1.0
    received = [p.at for p in fake_server.posts]
    for t, at in zip(arrivals, received):
        assert at - received[0] == pytest.approx(t, abs=0.05)
    assert received[-1] - received[0] < 1.0  # the last left before the first answer came


def test_latencies_tokens_and_extension_fields(fake_server):
    fake_server.behaviour = lambda i, body: Reply(ttft_s=0.2, gap_s=0.05, pieces=("a", "", "b", "c", "d"),
                                                  usage_tokens=5, extension={"threshold": 0.8, "chunk_size": 8})
    (record,) = replay(make_trace([0.0], output_tokens=5), config(fake_server), FillerPromptBuilder())
    assert record.status is Status.OK and record.http_status == 200
    assert record.output_tokens_received == 5 and record.output_tokens_requested == 5
    assert record.ttft_s == pytest.approx(0.2, abs=0.08)
    assert record.tpot_s == pytest.approx(4 * 0.05 / 4, abs=0.03)
    assert record.threshold_used == 0.8 and record.chunk_size == 8
    body = fake_server.posts[0].body
    assert body["model"] == "fake-model" and body["stream"] is True and body["max_tokens"] == 5
    assert "deadline_ms" not in body  # no baseline, no deadline


def test_deltas_counted_without_usage(fake_server):
    fake_server.behaviour = lambda i, body: Reply(pieces=("x", "", "y", "z"))
    (record,) = replay(make_trace([0.0]), config(fake_server), FillerPromptBuilder())
    assert record.output_tokens_received == 3


def test_refusals_errors_and_scoring(fake_server):
    kinds = ["stream", "refuse", "error", "broken", "stream"]
    fake_server.behaviour = lambda i, body: Reply(kind=kinds[i], pieces=("####", " 42") if i == 0 else ("#### 7",))
    records = replay(make_trace([0.0, 0.05, 0.1, 0.15, 0.2]), config(fake_server, max_in_flight=1), AnswerBuilder())
    assert [r.status for r in records] == [Status.OK, Status.REFUSED, Status.ERROR, Status.ERROR, Status.OK]
    assert records[1].http_status == 429 and records[1].retry_after_s == 2.0
    assert records[2].http_status == 500 and "HTTP 500" in records[2].error
    assert "[DONE]" in records[3].error
    assert [r.correct for r in records] == [True, None, None, None, False]
    metrics = compute_metrics(records)
    assert metrics.refused_share == pytest.approx(0.2)
    assert metrics.slo_attainment == pytest.approx(0.4)  # no deadlines: completed = met
    assert metrics.accuracy == pytest.approx(0.5)


def test_timeout_keeps_what_was_seen(fake_server):
    fake_server.behaviour = lambda i, body: Reply(kind="hang")
    (record,) = replay(make_trace([0.0]), config(fake_server, request_timeout_s=0.3), FillerPromptBuilder())
    assert record.status is Status.TIMEOUT and not record.slo_met
    assert record.finish_s - record.send_s == pytest.approx(0.3, abs=0.15)


def test_connection_refused_is_an_error():
    cfg = ReplayConfig(endpoint="http://127.0.0.1:9", model="m", show_progress=False, connect_timeout_s=1.0)
    (record,) = replay(make_trace([0.0]), cfg, FillerPromptBuilder())
    assert record.status is Status.ERROR and record.http_status is None


def test_deadline_field_is_the_remaining_budget(fake_server):
    baseline = LinearLatency(base_s=0.1, output_token_s=0.01)
    records = replay(make_trace([0.0, 0.1], output_tokens=30), config(fake_server, slo_scale=2.0),
                     FillerPromptBuilder(), baseline=baseline)
    expected_ms = 2.0 * (0.1 + 0.01 * 30) * 1000
    for record, post in zip(records, fake_server.posts):
        assert record.deadline_s == pytest.approx(expected_ms / 1000)
        assert expected_ms - 60 <= post.body["deadline_ms"] <= expected_ms
    assert all(r.slo_met for r in records)


def test_chat_api_and_extra_body(fake_server):
    fake_server.behaviour = lambda i, body: Reply(pieces=("#### 42",))
    cfg = config(fake_server, api="chat", model="named", extra_body={"ignore_eos": True})
    (record,) = replay(make_trace([0.0]), cfg, AnswerBuilder())
    post = fake_server.posts[0]
    assert post.path == "/v1/chat/completions"
    assert post.body["messages"][0]["role"] == "user" and post.body["model"] == "named"
    assert post.body["ignore_eos"] is True
    assert record.correct is True
    assert not [r for r in fake_server.received if r.method == "GET"]  # model given: no listing


def test_trailing_v1_in_endpoint_is_accepted(fake_server):
    cfg = ReplayConfig(endpoint=fake_server.url + "/v1/", show_progress=False)
    (record,) = replay(make_trace([0.0]), cfg, FillerPromptBuilder())
    assert record.status is Status.OK and fake_server.posts[0].path == "/v1/completions"


def test_prepare_requests_is_deterministic():
    trace = make_trace([0.0, 1.0, 2.0], prompt_tokens=50, output_tokens=0)
    a = prepare_requests(trace, FillerPromptBuilder(), seed=3)
    b = prepare_requests(trace, FillerPromptBuilder(), seed=3)
    assert [p.prompt for p in a] == [p.prompt for p in b]
    assert all(p.max_tokens == 1 for p in a)  # a 0-token (failed) trace row still asks for one token


def test_calibration_fits_the_idle_latency(fake_server):
    # Idle latency 0.05 s + 0.02 s per token after the first.
    fake_server.behaviour = lambda i, body: Reply(ttft_s=0.05, gap_s=0.02)
    baseline = asyncio.run(calibrate_baseline(config(fake_server), FillerPromptBuilder(), [(10, 4), (10, 24)]))
    assert baseline.output_token_s == pytest.approx(0.02, abs=0.006)
    assert baseline(10, 24) == pytest.approx(0.05 + 23 * 0.02, abs=0.1)
    assert len(fake_server.posts) == 2 and all("deadline_ms" not in p.body for p in fake_server.posts)


def test_filler_builder_hits_the_token_count():
    builder = FillerPromptBuilder()
    for n in (1, 7, 100, 1000):
        text, scorer = builder.build(n, random.Random(0))
        assert scorer is None
        assert n - 3 <= builder.count_tokens(text) <= n


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_request_bodies_pass_the_ingress_validation(fake_server, api):
    protocol = pytest.importorskip("dilaserve.serving.openai_protocol", reason="the serving layer is not in this checkout")
    model = protocol.ChatCompletionRequest if api == "chat" else protocol.CompletionRequest
    baseline = LinearLatency(base_s=0.001)  # budget 5 ms: the second request is sent already late
    cfg = config(fake_server, api=api, max_in_flight=1)
    fake_server.behaviour = lambda i, body: Reply(ttft_s=0.05)
    replay(make_trace([0.0, 0.0]), cfg, FillerPromptBuilder(), baseline=baseline)
    bodies = [model.model_validate(p.body) for p in fake_server.posts]
    assert bodies[0].deadline_ms <= 5.0 and bodies[1].deadline_ms == 1.0
    assert all(b.stream and b.include_usage_chunk for b in bodies)
