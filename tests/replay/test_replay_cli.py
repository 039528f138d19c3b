"""``dilaserve replay``: argument parsing, the trace pipeline, and a short run against a fake server."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from fake_openai_server import Reply

from dilaserve.cli import replay as replay_cli
from dilaserve.errors import DiLaServeError, InvalidRequestError

SAMPLE = Path(__file__).resolve().parents[2] / "traces" / "sample_bursty.csv"


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dilaserve")
    replay_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["replay", *argv])


def test_parse_defaults_and_flags():
    args = parse(["--trace", "t.csv", "--endpoint", "http://h:1", "--out", "r.jsonl"])
    assert args.run is replay_cli.run
    assert (args.format, args.rate_scale, args.slo_scale, args.duration, args.task) == ("auto", 1.0, 5.0, None, "arith")
    args = parse(["--format", "synthetic-gamma", "--rate", "3", "--cv", "4", "--endpoint", "e", "--out", "o",
                  "--rate-scale", "2.5", "--slo-scale", "3", "--duration", "60", "--max-requests", "10",
                  "--extra-body", '{"ignore_eos": true}', "--compare", "a.jsonl", "b.jsonl"])
    assert (args.cv, args.rate_scale, args.max_requests, args.extra_body) == (4.0, 2.5, 10, {"ignore_eos": True})
    assert args.compare == ["a.jsonl", "b.jsonl"]
    for bad in (["--rate-scale", "0"], ["--rate-scale", "x"], ["--extra-body", "[1]"], ["--format", "csv"]):
        with pytest.raises(SystemExit):
            parse(["--endpoint", "e", "--out", "o", *bad])


def test_trace_pipeline_order():
    # Rate scale 2 halves the sample's 120 s; the window is then in replay time.
    args = parse(["--trace", str(SAMPLE), "--endpoint", "e", "--out", "o", "--rate-scale", "2", "--start", "10",
                  "--duration", "20", "--max-total-tokens", "64"])
    trace = replay_cli.build_trace(args)
    assert 0 <= trace[0].arrival_s and trace[-1].arrival_s < 20
    assert all(r.total_tokens <= 64 for r in trace)
    args = parse(["--format", "synthetic-poisson", "--rate", "4", "--duration", "30", "--rate-scale", "2",
                  "--length-cv", "0", "--prompt-tokens", "33", "--endpoint", "e", "--out", "o"])
    trace = replay_cli.build_trace(args)
    assert 180 < len(trace) < 300 and trace[-1].arrival_s < 30  # 4 req/s x 2 over 30 s
    assert {r.prompt_tokens for r in trace} == {33}


def test_user_errors_are_dilaserve_errors(tmp_path):
    with pytest.raises(InvalidRequestError, match="needs --trace"):
        replay_cli.build_trace(parse(["--format", "azure", "--endpoint", "e", "--out", "o"]))
    with pytest.raises(InvalidRequestError, match="--duration or --max-requests"):
        replay_cli.build_trace(parse(["--format", "synthetic-poisson", "--endpoint", "e", "--out", "o"]))
    with pytest.raises(DiLaServeError, match="cannot read"):
        replay_cli.build_trace(parse(["--trace", str(tmp_path / "none.csv"), "--endpoint", "e", "--out", "o"]))
    with pytest.raises(InvalidRequestError, match="holds no request"):
        replay_cli.build_trace(parse(["--trace", str(SAMPLE), "--start", "1000", "--endpoint", "e", "--out", "o"]))


def test_short_replay_writes_records_table_and_report(fake_server, tmp_path, capsys):
    fake_server.behaviour = lambda i, body: Reply(kind="refuse") if i % 4 == 3 else Reply(
        pieces=("####", " 1"), extension={"threshold": 0.9})
    out = tmp_path / "records.jsonl"
    args = parse(["--trace", str(SAMPLE), "--endpoint", fake_server.url, "--out", str(out), "--rate-scale", "20",
                  "--max-requests", "12", "--max-total-tokens", "128", "--baseline-base-ms", "500",
                  "--slo-scale", "2", "--system", "fake", "--no-progress", "--report-dir", str(tmp_path / "rep")])
    assert replay_cli.run(args) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 12 and {r["system"] for r in lines} == {"fake"}
    assert [r["status"] for r in lines].count("refused") == 3
    assert all(r["deadline_s"] == pytest.approx(1.0) for r in lines)
    assert all(r["correct"] is not None for r in lines if r["status"] == "ok")  # arith prompts are scored
    table = capsys.readouterr().out
    assert "| metric | fake |" in table and "**75.0%**" in table
    assert (tmp_path / "rep" / "report.md").exists() and (tmp_path / "rep" / "controls_over_time.png").exists()
    # A second system compared against the first in one table.
    args = parse(["--trace", str(SAMPLE), "--endpoint", fake_server.url, "--out", str(tmp_path / "b.jsonl"),
                  "--rate-scale", "20", "--max-requests", "4", "--system", "static", "--no-progress",
                  "--task", "filler", "--compare", str(out)])
    assert replay_cli.run(args) == 0
    assert "| metric | static | fake |" in capsys.readouterr().out


def test_bad_task_and_tokenizer_are_user_errors(tmp_path):
    base = ["--trace", str(SAMPLE), "--endpoint", "http://127.0.0.1:9", "--out", str(tmp_path / "o.jsonl")]
    with pytest.raises(InvalidRequestError, match="--task"):
        replay_cli.run(parse([*base, "--task", "poetry"]))
    with pytest.raises(InvalidRequestError, match="--tokenizer"):
        replay_cli.run(parse([*base, "--tokenizer", str(tmp_path)]))


@pytest.mark.parametrize("endpoint, says", [("notaurl", r"not an http\(s\) URL"), (None, "cannot connect")])
def test_an_endpoint_nothing_answers_fails_before_the_replay(tmp_path, endpoint, says):
    """A wrong --endpoint ends at once with the reason, not after the trace's length of errors."""
    import socket

    if endpoint is None:  # a port nothing listens on
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
    out = tmp_path / "records.jsonl"
    args = parse(["--trace", str(SAMPLE), "--endpoint", endpoint, "--out", str(out), "--no-progress"])
    with pytest.raises(InvalidRequestError, match=says):
        replay_cli.run(args)
    assert not out.exists()
