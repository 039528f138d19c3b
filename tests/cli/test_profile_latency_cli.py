"""``dilaserve profile latency`` on CPU: a tiny grid, a valid profile the engine can start from."""

import json

from dilaserve.cli import main
from dilaserve.engine.config import EngineConfig
from dilaserve.engine.cost_model import COST_TERMS, StepCost
from dilaserve.engine.engine import Engine
from dilaserve.engine.latency_profile import ProfiledCost
from dilaserve.planner.profiles import load_latency_profile


def test_profile_latency_writes_a_fitted_profile_and_plot(tmp_path, llada_dir, llada):
    out = tmp_path / "profiles"
    code = main(["profile", "latency", "--model", str(llada_dir), "--device", "cpu", "--batch-sizes", "1,2",
                 "--chunks", "4,16", "--contexts", "40,72", "--block-size", "16", "--warmup", "1", "--repeats", "2",
                 "--threads", "1", "--out", str(out)])
    assert code == 0
    [path] = out.glob("latency_*_cpu.json")
    assert path.with_suffix(".png").stat().st_size > 0
    profile = json.loads(path.read_text())
    # 2 contexts x (2 batches x 2 chunks) for refresh and reuse, + 2 x 1 x 2 mixed
    assert len(profile["points"]) == 2 * 4 * 2 + 4
    assert {p["phase"] for p in profile["points"]} == {"refresh", "reuse", "mixed"}
    assert all(p["seconds"] > 0 and len(p["samples"]) == 2 for p in profile["points"])
    assert set(profile["fit"]) == set(COST_TERMS) and all(v >= 0 for v in profile["fit"].values())
    h = profile["holdout"]
    assert h["num_test"] >= 1 and 0 <= h["median_rel_error"] <= h["max_rel_error"]
    assert load_latency_profile(path).degrees[0].cost.fixed_s >= 0  # also a planner latency profile
    engine = Engine(llada, EngineConfig(num_pages=64, page_size=8, latency_profile=str(path)))
    assert isinstance(engine.cost, ProfiledCost) and engine.cost.cost == StepCost.from_profile(path)


def test_a_grid_whose_kv_cache_does_not_fit_is_refused_with_a_reason():
    """On a GPU the profiler checks the grid's KV cache against free memory before allocating
    it: LLaDA-8B's batch 32 x context 4096 with a 0.5 sparse region (gpu_checks' sparse-profile-kv)
    needs ~96 GiB of KV, more than an 80 GB H100 has beside the 16 GB of weights."""
    import torch

    from dilaserve.engine.profiling import Grid, kv_does_not_fit
    from dilaserve.models.paged_attention import PagedKVCache

    page = PagedKVCache.bytes_per_page(32, 16, 32, 128, torch.bfloat16)  # LLaDA-8B: 32 layers, 32 x 128 heads
    grid = Grid(batch_sizes=(1, 8, 32), contexts=(2048, 4096), kv_retention=0.5)
    gib = 2**30
    problem = kv_does_not_fit(grid, 16, page, free_bytes=62 * gib)
    assert problem is not None
    assert "96.2 GiB" in problem and "batch 32 x context 4096" in problem and "--batch-sizes" in problem
    assert kv_does_not_fit(grid, 16, page, free_bytes=120 * gib) is None  # an H200 holds it
    assert kv_does_not_fit(Grid(batch_sizes=(1, 8), contexts=(2048, 4096), kv_retention=0.5), 16, page,
                           free_bytes=62 * gib) is None  # batch 8 fits the H100


def test_grid_lists_must_be_positive_integers(capsys):
    """A zero or a word in a grid list is an argument error (exit 2), not a traceback from the
    page allocator once the model has loaded."""
    import pytest

    for flag, value, says in (("--batch-sizes", "0", ">= 1"), ("--chunks", "4,x", "integers"),
                              ("--contexts", ",", ">= 1"), ("--tensor-parallel", "-2", ">= 1")):
        with pytest.raises(SystemExit) as exc:
            main(["profile", "latency", "--device", "cpu", flag, value])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {flag}" in err and says in err, err
