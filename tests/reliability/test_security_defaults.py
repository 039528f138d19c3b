"""Security defaults that need no running server: no remote-code paths, safetensors only,
127.0.0.1 by default, the API key from the command line or the environment. (The HTTP side of
limits and authentication is in ``test_http_fuzz.py``.)"""

from __future__ import annotations

import argparse
import ast
import json
import shutil
from pathlib import Path

import pytest

from dilaserve.cli import serve as serve_cli
from dilaserve.errors import CheckpointError
from dilaserve.models.checkpoint import make_random_checkpoint
from dilaserve.models.registry import load_model
from dilaserve.serving.config import ConfigError, default_config, parse_config, with_http

PACKAGE = Path(__file__).resolve().parents[2] / "dilaserve"


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def test_no_remote_code_or_pickle_loading_in_the_package():
    found = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n in ("pickle", "dill", "cloudpickle", "marshal", "shelve") for n in names):
                    found.append(f"{path}:{node.lineno} imports {names}")
        for call in _calls(tree):
            text = ast.unparse(call.func)
            if text in ("torch.load", "pickle.load", "pickle.loads", "eval", "exec", "yaml.load", "yaml.unsafe_load"):
                found.append(f"{path}:{call.lineno} calls {text}")
            for kw in call.keywords:
                if kw.arg == "trust_remote_code" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                    found.append(f"{path}:{call.lineno} passes trust_remote_code")
    assert not found, found


def test_weights_load_from_safetensors_only_and_remote_code_configs_are_not_run(tmp_path):
    model_dir = make_random_checkpoint(tmp_path / "m", "llada", seed=1)
    pickled = tmp_path / "pickled"
    shutil.copytree(model_dir, pickled)
    for f in pickled.glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(CheckpointError, match="pickle weights are not loaded"):
        load_model(pickled)
    # A config asking for remote code: the field is ignored, the native module is used.
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "evil.Model"}
    (model_dir / "config.json").write_text(json.dumps(config))
    (model_dir / "evil.py").write_text("raise SystemExit('remote code ran')\n")
    assert type(load_model(model_dir)).__module__.startswith("dilaserve.models")


def test_serving_binds_to_localhost_by_default_with_limits():
    config = default_config()
    assert config.http.host == "127.0.0.1"
    assert config.http.api_key is None and config.http.max_body_bytes == 1 << 20
    assert config.admission.enabled and config.admission.headroom == 0.2
    assert parse_config({"models": [{"name": "m"}], "variants": [{"name": "v", "model": "m"}]}).http.host == "127.0.0.1"
    with pytest.raises(ConfigError, match="max_prompt_tokens"):
        parse_config({"models": [{"name": "m"}], "variants": [{"name": "v", "model": "m"}],
                      "http": {"max_prompt_tokens": 0}})


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dilaserve")
    serve_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["serve", *argv])


def test_the_api_key_comes_from_the_flag_or_the_environment(monkeypatch):
    monkeypatch.delenv(serve_cli.API_KEY_ENV, raising=False)
    assert _parse().api_key is None
    assert _parse("--api-key", "k1").api_key == "k1"
    monkeypatch.setenv(serve_cli.API_KEY_ENV, "k2")
    assert _parse().api_key == "k2" and _parse("--api-key", "k1").api_key == "k1"
    assert with_http(default_config(), api_key="k2").http.api_key == "k2"
    with pytest.raises(ConfigError, match="empty"):
        with_http(default_config(), api_key="")
