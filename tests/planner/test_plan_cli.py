"""``dilaserve plan`` as people and scripts call it."""

from __future__ import annotations

import json

import pytest

import dilaserve.cli as cli


@pytest.fixture(autouse=True)
def plan_subcommand(monkeypatch):
    if "plan" not in cli.SUBCOMMANDS:  # until the CLI registry lists it
        monkeypatch.setattr(cli, "SUBCOMMANDS", (*cli.SUBCOMMANDS, "plan"))


def test_json_plan_with_default_profiles(capsys):
    assert cli.main(["plan", "--gpus", "16", "--rate", "10", "--slo-scale", "3", "--quality-budget", "1", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["status"] == "optimal" and record["inputs"]["profiles_illustrative"] is True
    plan = record["plan"]
    assert plan["served_share"] == pytest.approx(1.0) and plan["gpus_used"] <= 16
    assert {"degree", "threshold", "count", "traffic_share"} <= set(plan["groups"][0])
    assert plan["solver"] in ("cbc", "highs") and plan["solve_time_s"] > 0


def test_human_table(capsys):
    assert cli.main(["plan", "--gpus", "8", "--rate", "40", "--prompt-len", "256", "--output-len", "256"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("plan: overloaded: serves")
    assert "ILLUSTRATIVE" in out and "degree  threshold  sparse KV  instances" in out and "SLO attainment" in out


def test_infeasible_exits_1_and_says_why(capsys):
    assert cli.main(["plan", "--gpus", "8", "--rate", "5", "--slo-scale", "0.05"]) == 1
    assert "even alone" in capsys.readouterr().out


def test_lengths_file_and_profiles_dir(tmp_path, capsys):
    from dilaserve.planner.profiles import DEFAULT_PROFILES_DIR

    (tmp_path / "lengths.json").write_text(json.dumps([[100, 50], [300, 150]]))
    assert cli.main(["plan", "--gpus", "4", "--rate", "2", "--lengths", str(tmp_path / "lengths.json"),
                     "--profiles", str(DEFAULT_PROFILES_DIR), "--json"]) == 0
    inputs = json.loads(capsys.readouterr().out)["inputs"]
    assert (inputs["prompt_tokens"], inputs["output_tokens"]) == (200, 100)


@pytest.mark.parametrize("argv,words", [
    (["--utilization", "2"], "utilization"),
    (["--profiles", "/nonexistent"], "not a directory"),
    (["--lengths", "x.json", "--prompt-len", "3"], "not both"),
])
def test_user_errors_exit_2(capsys, argv, words):
    assert cli.main(["plan", "--gpus", "4", "--rate", "2", *argv]) == 2
    assert words in capsys.readouterr().err
