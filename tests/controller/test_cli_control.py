"""``dilaserve control``: bad input fails before Ray is touched."""

from __future__ import annotations

import pytest

from dilaserve.cli.control import main


@pytest.fixture
def serve_yaml(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text("models: [{name: m}]\nvariants: [{name: cpu, model: m}]\n")
    return str(path)


@pytest.mark.parametrize("extra, says", [
    (["--gpus", "0"], "gpus"),
    (["--gpus", "2", "--tick", "5", "--window", "1"], "window_s"),
    ([], "gpus"),  # required
])
def test_bad_settings_exit_2_before_starting(serve_yaml, extra, says, capsys, monkeypatch):
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray was started"))
    assert main(["start", "--config", serve_yaml, *extra]) == 2
    assert says in capsys.readouterr().err


def test_settings_file_and_flags_merge(serve_yaml, tmp_path, monkeypatch):
    import argparse

    from dilaserve.cli.control import _settings

    settings = tmp_path / "c.yaml"
    settings.write_text("gpus: 4\nperiod_s: 10\n")
    args = argparse.Namespace(settings=str(settings), gpus=8, profiles=None, slo_scale=None, quality_budget=None,
                              tick=None, period=None, window=None, min_interval=None, min_replicas=None)
    assert _settings(args) == {"gpus": 8, "period_s": 10}
