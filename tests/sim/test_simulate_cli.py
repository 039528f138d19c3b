"""``dilaserve simulate`` on small synthetic traces."""

from __future__ import annotations

import argparse

import pytest

from dilaserve.cli import simulate as simulate_cli
from dilaserve.errors import InvalidRequestError
from dilaserve.replay.loaders import write_azure_csv
from dilaserve.replay.records import Status, load_records
from tests.sim.helpers import poisson_trace


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dilaserve")
    simulate_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["simulate", *argv])
    return args.run(args)


@pytest.mark.parametrize("fidelity", ["step", "fast"])
def test_synthetic_trace_to_records_and_table(tmp_path, capsys, fidelity):
    out = tmp_path / "sim.jsonl"
    assert run(["--synthetic", "poisson:300:400", "--replicas", "2", "--policy", "power_of_two",
                "--fidelity", fidelity, "--threshold", "0.8", "--slo-scale", "3", "--out", str(out),
                "--report-dir", str(tmp_path / "report")]) == 0
    records = load_records(out)
    assert len(records) == 400 and {r.system for r in records} == {"sim-power_of_two"}
    assert any(r.status is Status.REFUSED for r in records)  # 300 req/s overloads two replicas
    assert {r.threshold_used for r in records if r.status is Status.OK} == {0.8}
    captured = capsys.readouterr()
    assert "SLO attainment" in captured.out
    assert "simulated arrivals" in captured.err and "400/400" in captured.err  # the progress bar, complete
    assert (tmp_path / "report" / "report.md").exists()


def test_trace_file_with_admission_off(tmp_path):
    path = tmp_path / "trace.csv"
    write_azure_csv(poisson_trace(20, 50), path)
    out = tmp_path / "sim.jsonl"
    assert run(["--trace", str(path), "--replicas", "1", "--admission", "off", "--fixed-ms", "4",
                "--per-token-us", "30", "--max-running", "8", "--out", str(out)]) == 0
    records = load_records(out)
    assert len(records) == 50 and all(r.status is Status.OK for r in records)


def test_bad_synthetic_spec_is_a_user_error(tmp_path):
    with pytest.raises(InvalidRequestError, match="poisson:RATE:N"):
        run(["--synthetic", "poisson:fast", "--out", str(tmp_path / "x.jsonl")])


def test_controller_on_a_load_step(tmp_path, capsys):
    out = tmp_path / "sim.jsonl"
    assert run(["--synthetic", "step:30:20:60", "--controller", "default", "--replicas", "8", "--max-gpus", "24",
                "--startup-s", "5", "--tick-s", "1", "--window-s", "8", "--period-s", "8", "--slo-scale", "3",
                "--prompt-tokens", "256", "--output-tokens", "128", "--length-cv", "0", "--threshold", "0.9",
                "--out", str(out)]) == 0
    records = load_records(out)
    assert records and all(r.status in (Status.OK, Status.REFUSED) for r in records)
    err = capsys.readouterr().err
    assert "reconfigurations" in err and f"{len(records)}/{len(records)}" in err


def test_no_progress_leaves_stderr_without_a_bar(tmp_path, capsys):
    assert run(["--synthetic", "poisson:50:100", "--replicas", "2", "--no-progress",
                "--out", str(tmp_path / "sim.jsonl")]) == 0
    assert "simulated arrivals" not in capsys.readouterr().err
