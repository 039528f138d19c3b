"""The serving config: YAML -> validated -> frozen dataclasses."""

from __future__ import annotations

from pathlib import Path

import pytest

from dilaserve.serving.app import local_num_cpus, replica_options
from dilaserve.serving.config import ConfigError, default_config, load_config, parse_config, with_http

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def minimal(**extra):
    return {"models": [{"name": "m"}], "variants": [{"name": "v", "model": "m"}], **extra}


def test_example_config_loads():
    config = load_config(EXAMPLES / "serve_cpu.yaml")
    assert config.models[0].name == "dilaserve-tiny-arith" and config.models[0].path is None
    assert [n for n, _ in config.replica_names()] == ["cpu-0", "cpu-1"]
    assert config.routing.policy == "slack" and config.admission.max_waiting == 256
    assert config.variants[0].num_gpus_per_replica == 0.0  # CPU model: no GPUs
    assert dict(config.variants[0].engine)["page_size"] == 16


def test_deploy_example_args_are_a_valid_config():
    import yaml

    args = yaml.safe_load((EXAMPLES / "serve_deploy.yaml").read_text())["applications"][0]["args"]
    assert parse_config(args).variants[0].num_replicas == 2


def test_default_config_and_overrides():
    config = default_config(port=9001)
    assert (config.http.host, config.http.port) == ("127.0.0.1", 9001)
    assert with_http(config, host="0.0.0.0").http.host == "0.0.0.0"
    assert [m.name for m in config.models] == ["dilaserve-tiny-arith"]


def test_a_model_directory_is_served_under_its_own_name(tmp_path):
    """``dilaserve serve --model DIR`` named every model after the embedded one."""
    for directory, name in (("LLaDA-8B-Instruct", "LLaDA-8B-Instruct"), ("my model (v2)", "my-model-v2"),
                            ("_ckpt", "ckpt")):
        config = default_config(str(tmp_path / directory))
        assert [m.name for m in config.models] == [name] and config.variants[0].model == name
        assert config.models[0].path == str(tmp_path / directory)


@pytest.mark.parametrize("data, message", [
    (minimal(routing={"policy": "random"}), "routing.policy"),
    (minimal(slo={"slo_scale": 0}), "slo.slo_scale"),
    (minimal(http={"port": 70000}), "http.port"),
    (minimal(bogus=1), "bogus"),
    ({"models": [{"name": "m"}], "variants": [{"name": "v", "model": "other"}]}, "not among models"),
    ({"models": [{"name": "m"}, {"name": "m"}], "variants": [{"name": "v", "model": "m"}]}, "unique"),
    ({"models": [{"name": "m"}], "variants": [{"name": "v", "model": "m", "num_replicas": 0}]}, "no variant"),
    ({"models": [{"name": "m"}], "variants": [{"name": "v", "model": "m", "engine": {"page_sz": 4}}]}, "page_sz"),
    ({"models": [{"name": "m", "device": "cuda"}],
      "variants": [{"name": "v", "model": "m", "tensor_parallel": 2, "num_gpus_per_replica": 1}]}, "needs 2 GPUs"),
    ({"models": [{"name": "m"}],
      "variants": [{"name": "v", "model": "m", "engine": {"tensor_parallel": 2}}]}, "on the variant"),
    (minimal(defaults={"kv_retention": 0.5, "cache": "prefix"}), "needs defaults.cache 'dual'"),
    # Engine values: a config error at start, not a replica that fails to construct.
    ({"models": [{"name": "m"}], "variants": [{"name": "v", "model": "m", "engine": {"chunk_control": "turbo"}}]},
     "engine.chunk_control"),
    ({"models": [{"name": "m"}], "variants": [{"name": "v", "model": "m", "engine": {"max_batch_tokens": 0}}]},
     "engine.max_batch_tokens"),
    ({"models": [{"name": "m"}], "variants": [{"name": "v", "model": "m", "engine": {"refresh_bound": "loose"}}]},
     "engine.refresh_bound"),
    ({"models": [{"name": "m"}], "variants": [{"name": "v", "model": "m", "engine": {"kernels": "cuda"}}]},
     "engine.kernels"),
    ({"models": [{"name": "m"}], "variants": [{"name": "v", "model": "m", "engine": {"kv_memory_gib": "lots"}}]},
     "engine.kv_memory_gib"),
    ({"models": [{"name": "m"}], "variants": [{"name": "v", "model": "m", "engine": {"default_threshold": 1.5}}]},
     "engine.default_threshold"),
    ({"models": [{"name": "m"}], "variants": [{"name": "v", "model": "m", "engine": ["page_size"]}]},
     "engine"),
])
def test_invalid_configs_name_the_field(data, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(data)


def test_engine_settings_match_the_engine_and_only_those_written_are_passed_on():
    import dataclasses

    from dilaserve.engine.config import EngineConfig
    from dilaserve.serving.config import EngineSection

    engine_fields = {f.name: f.default for f in dataclasses.fields(EngineConfig)}
    del engine_fields["tensor_parallel"]  # the variant's own setting
    section = EngineSection()
    assert {name: getattr(section, name) for name in EngineSection.model_fields} == engine_fields
    config = parse_config({"models": [{"name": "m"}], "variants": [
        {"name": "v", "model": "m", "engine": {"chunk_control": "adaptive", "max_batch_tokens": "4096"}}]})
    assert dict(config.variants[0].engine) == {"chunk_control": "adaptive", "max_batch_tokens": 4096}
    EngineConfig(**config.variants[0].engine)


def test_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("models: [")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_gpu_variants_reserve_gpus_and_placement_groups():
    config = parse_config({
        "models": [{"name": "m", "path": "/models/llada", "device": "cuda", "dtype": "bfloat16"}],
        "variants": [{"name": "tp1", "model": "m"}, {"name": "tp4", "model": "m", "tensor_parallel": 4}],
    })
    tp1, tp4 = config.variants
    assert replica_options(tp1)["ray_actor_options"]["num_gpus"] == 1.0
    options = replica_options(tp4)
    # The replica holds all four ranks' GPUs (its workers share its view), packed on one node.
    assert options["placement_group_bundles"] == [{"CPU": 1.0, "GPU": 4.0}]
    assert options["placement_group_strategy"] == "STRICT_PACK"
    assert options["ray_actor_options"]["num_gpus"] == 4.0
    assert "placement_group_bundles" not in replica_options(tp1)
    assert local_num_cpus(config) == 3


REPO = EXAMPLES.parent
SERVE_DEPLOY_FILES = [REPO / "examples/serve_deploy.yaml", REPO / "cluster_configs/serve_local.yaml",
                      REPO / "cluster_configs/serve_aws.yaml"]


@pytest.mark.parametrize("path", SERVE_DEPLOY_FILES, ids=lambda p: p.name)
def test_serve_deploy_files_are_valid_for_serve_and_for_dilaserve(path):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    data = yaml.safe_load(path.read_text())
    ServeDeploySchema.model_validate(data)
    (app,) = data["applications"]
    assert app["import_path"] == "dilaserve.serving.app:app_builder"
    parse_config(app["args"], str(path))


@pytest.mark.parametrize("name", ["local.yaml", "aws-gpu.yaml"])
def test_ray_up_configs_pass_the_autoscaler_schema(name):
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster_configs" / name).read_text())
    validate_config(prepare_config(config))
    commands = " ".join(config["setup_commands"] + config["head_start_ray_commands"])
    assert "pip install" in commands and "dilaserve" in commands and "serve deploy" in commands
