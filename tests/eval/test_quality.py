"""Quality measurement through the engine, and the profile command's files."""

from __future__ import annotations

import json

import pytest

from dilaserve.cli import main
from dilaserve.errors import CheckpointError
from dilaserve.eval.quality import wilson_interval
from dilaserve.models.store import resolve_model


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(90, 100)
    assert lo == pytest.approx(0.8256, abs=1e-3) and hi == pytest.approx(0.9448, abs=1e-3)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_resolve_model_paths_and_errors(llada_dir):
    assert resolve_model(str(llada_dir)) == llada_dir
    with pytest.raises(CheckpointError, match="no model named"):
        resolve_model("no-such-model")


def test_eval_json_and_profile_files(llada_dir, tmp_path, capsys):
    assert main(["eval", "--model", str(llada_dir), "--num", "4", "--max-tokens", "16", "--block-size", "8",
                 "--threshold", "0.5", "--json"]) == 0
    point = json.loads(capsys.readouterr().out)
    assert point["num"] == 4 and 0.0 <= point["accuracy"] <= 1.0 and point["tokens_per_step"] >= 1.0
    assert main(["profile", "quality", "--model", str(llada_dir), "--num", "4", "--max-tokens", "16",
                 "--block-size", "8", "--thresholds", "0.4,0.99", "--steps", "16", "--out", str(tmp_path)]) == 0
    profile = json.loads(next(tmp_path.glob("quality_*.json")).read_text())
    by_threshold = {e["threshold"]: e for e in profile["entries"] if e["threshold"]}
    # A lower threshold never decides fewer tokens per step on the same problems.
    assert by_threshold[0.4]["tokens_per_step"] >= by_threshold[0.99]["tokens_per_step"]
    assert any(e["steps"] == 16 and e["tokens_per_step"] == pytest.approx(1.0, abs=0.01) for e in profile["entries"])
    assert next(tmp_path.glob("quality_*.png")).stat().st_size > 1000
