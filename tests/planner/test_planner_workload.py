"""Workloads: the representative request length from samples, summaries and traces."""

from __future__ import annotations

import json

import pytest

from dilaserve.planner.workload import Workload, WorkloadError, load_workload


def test_mean_and_percentiles_of_samples():
    samples = [(p, 10 * p) for p in range(1, 101)]
    assert Workload.from_samples(2.0, samples) == Workload(2.0, 50, 505, "mean")
    w = Workload.from_samples(2.0, samples, "p90")
    assert (w.prompt_tokens, w.output_tokens, w.length_statistic) == (90, 900, "p90")
    assert Workload.from_samples(2.0, samples, "p100").prompt_tokens == 100


def test_load_json_samples_summary_and_trace_csv(tmp_path):
    (tmp_path / "samples.json").write_text(json.dumps([[10, 5], [30, 15]]))
    assert load_workload(tmp_path / "samples.json", 1.0) == Workload(1.0, 20, 10, "mean")
    (tmp_path / "wrapped.json").write_text(json.dumps({"samples": [[10, 5], [30, 15]]}))
    assert load_workload(tmp_path / "wrapped.json", 1.0).prompt_tokens == 20
    summary = {"prompt_tokens": {"mean": 1155.4, "p90": 2900}, "output_tokens": {"mean": 211, "p90": 480}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert load_workload(tmp_path / "summary.json", 3.0, "p90") == Workload(3.0, 2900, 480, "p90")
    with pytest.raises(WorkloadError, match="no usable 'p99'"):
        load_workload(tmp_path / "summary.json", 3.0, "p99")
    (tmp_path / "trace.csv").write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                                        "2023-11-16 18:15:46.6805900,374,44\n2023-11-16 18:15:50.9951690,396,110\n")
    assert load_workload(tmp_path / "trace.csv", 1.0) == Workload(1.0, 385, 77, "mean")


@pytest.mark.parametrize("content,words", [
    ("[[1, 2], [3]]", "sample 1"), ("[]", "no length samples"), ('"x"', "expected a list"), ("{", "cannot read"),
])
def test_bad_lengths_files(tmp_path, content, words):
    path = tmp_path / "lengths.json"
    path.write_text(content)
    with pytest.raises(WorkloadError, match=words):
        load_workload(path, 1.0)


def test_bad_statistic():
    with pytest.raises(WorkloadError, match="'mean', 'work' or 'pNN'"):
        Workload.from_samples(1.0, [(1, 1)], "median")


def test_work_lengths_keep_the_mean_work_of_correlated_samples():
    # Work ~ output x (prompt + output): 10 x 110 + 100 x 1100 = 111100 over 110 generated tokens,
    # so a generated token sees 1010 positions on average; with the mean output (55) the prompt is 955.
    w = Workload.from_samples(2.0, [(100, 10), (1000, 100)], "work")
    assert (w.prompt_tokens, w.output_tokens, w.length_statistic) == (955, 55, "work")
    assert Workload.from_samples(2.0, [(100, 10), (1000, 100)]).prompt_tokens == 550  # mean: far less work
    assert (w.output_tokens * (w.prompt_tokens + w.output_tokens)) == pytest.approx(111100 / 2, rel=0.01)
    assert Workload.from_samples(1.0, [(40, 0), (60, 0)], "work").prompt_tokens == 50  # nothing generated
