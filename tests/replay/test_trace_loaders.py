"""Trace file loaders: Azure and BurstGPT, malformed rows, the real Azure trace, the sample."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dilaserve.replay.loaders import (
    TraceFormatError, detect_format, load_azure_csv, load_burstgpt_csv, load_trace, parse_timestamp, write_azure_csv,
)
from dilaserve.replay.synthetic import IndependentLengths, PoissonArrivals, UniformLength, interarrival_cv, synthesize

REPO = Path(__file__).resolve().parents[2]
AZURE_2023_CONV = REPO.parent / "shared" / "traces" / "AzureLLMInferenceTrace_conv.csv"


def write(tmp_path, text: str, name: str = "trace.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode())
    return path


def test_azure_rows_with_seven_fractional_digits(tmp_path):
    path = write(tmp_path, "TIMESTAMP,ContextTokens,GeneratedTokens\r\n"
                           "2023-11-16 18:15:46.6805900,374,44\r\n"
                           "2023-11-16 18:15:50.9951690,396,109\r\n"
                           "2023-11-16 18:15:51.2224670,879,55")  # no final newline, as the real file
    trace, report = load_azure_csv(path)
    assert report.num_rows == report.num_loaded == 3 and report.num_malformed == 0
    assert [(r.prompt_tokens, r.output_tokens) for r in trace] == [(374, 44), (396, 109), (879, 55)]
    assert [r.arrival_s for r in trace] == pytest.approx([0.0, 4.314579, 4.541877], abs=1e-6)


def test_malformed_rows_are_skipped_and_counted(tmp_path):
    path = write(tmp_path, "\n".join([
        "TIMESTAMP,ContextTokens,GeneratedTokens",
        "2023-11-16 18:00:01.0,10,5",        # 2 good
        "2023-11-16 18:00:xx,10,5",          # 3 bad timestamp
        "2023-11-16 18:00:02.0,ten,5",       # 4 bad count
        "2023-11-16 18:00:02.5,10,2.5",      # 5 not whole
        "2023-11-16 18:00:03.0,10",          # 6 too few fields
        "2023-11-16 18:00:03.0,10,5,7",      # 7 too many fields
        "",                                  # blank: not a row
        "2023-11-16 18:00:04.0,-3,5",        # 9 negative
        "2023-13-16 18:00:04.0,3,5",         # 10 month 13
        "2023-11-16 18:00:00.5,20,6",        # 11 good, earlier than line 2: sorted first
        "2023-11-16 18:00:05.0,20,0",        # 12 failed request: filtered, not malformed
        "nan,1,1",                           # 13 bad timestamp
        '"2023-11-16 18:00:06.0",30,7',      # 14 good, quoted
        "\x00\x01garbage",                   # 15 wrong width
    ]))
    trace, report = load_azure_csv(path)
    assert [(r.arrival_s, r.prompt_tokens) for r in trace] == [(0.0, 20), (0.5, 10), (5.5, 30)]
    assert report.num_rows == 13 and report.num_loaded == 3 and report.num_filtered == 1
    assert report.num_malformed == 9
    assert report.malformed_reasons == {"bad timestamp": 3, "bad token count": 2, "wrong number of fields": 3,
                                        "token count out of range": 1}
    assert report.first_malformed_lines == (3, 4, 5, 6, 7, 9, 10, 13, 15)
    assert "9 malformed skipped" in report.summary()
    kept, report = load_azure_csv(path, keep_failed=True)
    assert len(kept) == 4 and report.num_filtered == 0


def test_timestamps_with_zones_and_separators():
    base = parse_timestamp("2024-05-10 00:00:00")
    assert parse_timestamp("2024-05-10T00:00:00.25Z") - base == pytest.approx(0.25)
    assert parse_timestamp("2024-05-10 00:00:01.000001+00:00") - base == pytest.approx(1.000001)
    assert parse_timestamp("2024-05-10 01:00:00+01:00") == base
    assert parse_timestamp(" 12.5 ") == 12.5
    for bad in ("2024-02-30 00:00:00", "yesterday", "inf", ""):
        with pytest.raises(ValueError):
            parse_timestamp(bad)


def test_file_errors_are_clear(tmp_path):
    with pytest.raises(TraceFormatError, match="cannot read"):
        load_azure_csv(tmp_path / "missing.csv")
    with pytest.raises(TraceFormatError, match="empty"):
        load_azure_csv(write(tmp_path, "\n\n"))
    with pytest.raises(TraceFormatError, match="GeneratedTokens"):
        load_azure_csv(write(tmp_path, "TIMESTAMP,ContextTokens\n2023-11-16 18:00:01,3\n"))
    with pytest.raises(TraceFormatError, match="cannot tell the format"):
        load_trace(write(tmp_path, "a,b,c\n1,2,3\n"))


BURSTGPT = """Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type
5,ChatGPT,472,18,490,Conversation log
45,ChatGPT,1087,0,1087,Conversation log
118,GPT-4,417,217,634,Conversation log
130,ChatGPT,abc,10,10,Conversation log
131.5,ChatGPT,1360,300,1660,API log
"""


def test_burstgpt_filters_failed_rows_and_models(tmp_path):
    path = write(tmp_path, BURSTGPT)
    trace, report = load_burstgpt_csv(path)
    assert [(r.arrival_s, r.prompt_tokens, r.output_tokens) for r in trace] == [
        (0.0, 472, 18), (113.0, 417, 217), (126.5, 1360, 300)]
    assert report.num_filtered == 1 and report.num_malformed == 1
    chat, report = load_burstgpt_csv(path, model="chatgpt")
    assert [r.prompt_tokens for r in chat] == [472, 1360] and report.num_filtered == 2
    with_failed, _ = load_burstgpt_csv(path, model="ChatGPT", keep_failed=True)
    assert [r.output_tokens for r in with_failed] == [18, 0, 300]
    api, _ = load_burstgpt_csv(path, log_type="API log")
    assert len(api) == 1


def test_burstgpt_with_session_columns_and_quotes(tmp_path):
    path = write(tmp_path, 'Timestamp,Session ID,Elapsed time,Model,Request tokens,Response tokens,Total tokens,Log Type\n'
                           '0.5,s1,1.2,"GPT-4",10,20,30,"Conversation log"\n'
                           '2.0,s1,1.0,GPT-4,11,21,32,Conversation log\n')
    assert detect_format(path) == "burstgpt"
    trace, report = load_trace(path, model="GPT-4")
    assert [(r.arrival_s, r.prompt_tokens) for r in trace] == [(0.0, 10), (1.5, 11)]
    assert report.num_malformed == 0


def test_max_rows_stops_early(tmp_path):
    path = write(tmp_path, BURSTGPT)
    trace, report = load_trace(path, max_rows=2)
    assert report.num_rows == 2 and len(trace) == 1


def test_write_then_load_round_trips(tmp_path):
    trace = synthesize(PoissonArrivals(3.0), IndependentLengths(UniformLength(1, 500), UniformLength(1, 50)),
                       num_requests=200, seed=1)
    loaded, report = load_trace(write_azure_csv(trace, tmp_path / "t.csv"))
    assert report.num_malformed == 0 and detect_format(tmp_path / "t.csv") == "azure"
    assert [r.arrival_s for r in loaded] == pytest.approx([r.arrival_s for r in trace], abs=2e-7)
    assert [(r.prompt_tokens, r.output_tokens) for r in loaded] == [(r.prompt_tokens, r.output_tokens) for r in trace]


@pytest.mark.skipif(not AZURE_2023_CONV.exists(), reason=f"the Azure 2023 conversation trace is not at {AZURE_2023_CONV}")
def test_real_azure_2023_conversation_trace():
    trace, report = load_trace(AZURE_2023_CONV)
    assert report.num_rows == report.num_loaded == 19_366
    assert report.num_malformed == 0 and report.num_filtered == 0
    assert trace[0].arrival_s == 0.0 and (trace[0].prompt_tokens, trace[0].output_tokens) == (374, 44)
    assert trace.span_s == pytest.approx(3501.72194, abs=1e-4)  # 18:15:46.68059 to 19:14:08.40253
    assert trace.mean_rate_rps == pytest.approx(5.53, abs=0.01)
    assert min(r.prompt_tokens for r in trace) == 2 and max(r.output_tokens for r in trace) == 1000


def test_sample_bursty_trace_is_committed_and_reproducible(tmp_path):
    committed = REPO / "traces" / "sample_bursty.csv"
    trace, report = load_trace(committed)
    assert report.num_malformed == 0 and 250 <= len(trace) <= 350
    assert 100 <= trace.span_s <= 125
    assert interarrival_cv([r.arrival_s for r in trace]) > 1.3  # bursty: Poisson would be 1
    regenerated = tmp_path / "sample.csv"
    subprocess.run([sys.executable, str(REPO / "traces" / "make_synthetic.py"), "--out", str(regenerated)],
                   check=True, capture_output=True)
    assert regenerated.read_bytes() == committed.read_bytes()
