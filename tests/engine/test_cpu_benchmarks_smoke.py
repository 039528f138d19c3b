"""The CPU engine benchmarks run end to end at small sizes and write what they say they write."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str, *args: str, interpret: bool = False) -> None:
    """Runs a script to exit 0 (``interpret``: its kernels in Triton's CPU interpreter)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"} if interpret else None
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args],
                            capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.parametrize("decoding", [[], ["--threshold", "0.9", "--chunk", "4"]])
def test_bench_engine_cpu(tmp_path, decoding):
    _run("bench_engine_cpu.py", "--requests", "4", "--max-tokens", "16", "--prompt-len", "8", "--block", "8",
         "--repeats", "1", "--tag", "t", "--out", str(tmp_path), *decoding)
    [path] = tmp_path.glob("engine_cpu_batching_*_t.json")
    report = json.loads(path.read_text())
    rows = {r["mode"]: r for r in report["rows"]}
    assert ("reference generator, one by one" in rows) == (not decoding)  # no chunking in the reference
    batched = rows["engine, batched (4 at once)"]
    sequential = rows["engine, one by one"]
    assert batched["steps"] < sequential["steps"] and report["speedup"] > 0
    assert "Speed-up of batching" in path.with_suffix(".md").read_text()


def test_bench_mixed_steps_cpu(tmp_path):
    _run("bench_mixed_steps_cpu.py", "--requests", "6", "--max-tokens", "16", "--block", "8", "--chunk", "4",
         "--min-prompt", "4", "--max-prompt", "40", "--repeats", "1", "--out", str(tmp_path))
    [path] = tmp_path.glob("mixed_steps_tiny_cpu_*.json")
    report = json.loads(path.read_text())
    assert report["same_tokens"] is True
    assert [r["mode"] for r in report["rows"]] == ["one padded batch", "grouped by query count"]
    assert all(r["steps"] > 0 and r["seconds"] > 0 for r in report["rows"])


def test_sim_refresh_bound(tmp_path):
    _run("sim_refresh_bound.py", "--concurrency", "4", "--rates", "2", "--burst-cv", "2", "--duration-s", "30",
         "--warmup-s", "5", "--seeds", "1", "--max-tokens", "64", "--out", str(tmp_path))
    [path] = tmp_path.glob("sim_refresh_bound_quality_*.json")
    report = json.loads(path.read_text())
    assert [(r["load"], r["refresh_bound"]) for r in report["rows"]] == [
        ("c=4", "fixed"), ("c=4", "auto"), ("2 req/s (CV 2)", "fixed"), ("2 req/s (CV 2)", "auto")]
    for r in report["rows"]:
        assert r["finished"] > 0 and r["tokens_per_s"] > 0 and r["p99_e2e_s"] >= r["p50_e2e_s"] > 0


def test_sim_refresh_bound_fixed_steps(tmp_path):
    """At 4 tokens a step (LLaDA's schedule) requests admitted together stay in lockstep when
    refreshes are unbounded: every one takes the same time."""
    _run("sim_refresh_bound.py", "--steps-per-block", "8", "--concurrency", "4", "--rates", "", "--duration-s", "30",
         "--warmup-s", "5", "--seeds", "1", "--max-tokens", "64", "--max-batch-tokens", "4096", "--out", str(tmp_path))
    [path] = tmp_path.glob("sim_refresh_bound_steps8_*.json")
    report = json.loads(path.read_text())
    assert report["tokens_per_step"] == 4 and report["settings"]["max_batch_tokens"] == 4096
    unbounded, auto = report["rows"]
    assert unbounded["refresh_bound"] == "fixed" and unbounded["p50_e2e_s"] > 0
    assert unbounded["p99_e2e_s"] == pytest.approx(unbounded["p50_e2e_s"], rel=1e-9)
    assert auto["refresh_bound"] == "auto" and auto["tokens_per_s"] > 0
    assert "fixed steps, 4 tokens decided per step" in path.with_suffix(".md").read_text()


def test_bench_sim_cluster(tmp_path):
    """Issue 13's simulated evaluation end to end, on a small synthetic trace in the Azure format."""
    from dilaserve.replay.loaders import write_azure_csv
    from dilaserve.replay.trace import Trace, TraceRequest

    trace = Trace(tuple(TraceRequest(0.25 * i, 200 + 37 * (i % 9), 20 + 11 * (i % 7)) for i in range(240)))
    csv_path = write_azure_csv(trace, tmp_path / "trace.csv")
    _run("bench_sim_cluster.py", "--trace", str(csv_path), "--gpus", "2", "--rate-scales", "1", "--phase-s", "20",
         "--fidelity", "fast", "--out", str(tmp_path))
    [path] = tmp_path.glob("sim_cluster_*.json")
    [point] = json.loads(path.read_text())["points"]
    assert point["gpus"] == 2 and point["requests"] > 0
    assert set(point["systems"]) == {"static-rr", "policies", "dilaserve"}
    for system in point["systems"].values():
        for phase in ("before", "after"):
            assert 0.0 <= system["phases"][phase]["attainment"] <= 1.0
    assert "| 2 | 1 |" in path.with_suffix(".md").read_text()


def test_bench_engine_divides_by_a_fast_dllm_run_of_the_same_device_only(tmp_path):
    """``bench_engine.py --fast-dllm-result``: the column divides each row's tokens/s by the dual-cache
    row of ``bench_fast_dllm.py``'s JSON; a run from another device is refused."""
    baseline = tmp_path / "fd.json"
    baseline.write_text(json.dumps({"device": "CPU", "date": "2026-12-06", "rows": [
        {"mode": "prefix", "ms_per_forward": 1.0, "tokens_per_s": 1000.0},
        {"mode": "dual", "ms_per_forward": 48.2, "tokens_per_s": 83.0}]}))
    _run("bench_engine.py", "--tiny", "--paths", "torch", "--concurrency", "2", "--out", str(tmp_path),
         "--fast-dllm-result", str(baseline))
    [path] = tmp_path.glob("engine_gpu_cpu_*.json")
    report = json.loads(path.read_text())
    [row] = report["end_to_end"]
    table = path.with_suffix(".md").read_text()
    assert "x Fast-dLLM dual here (83.0 tok/s)" in table
    assert f"| {row['tokens_per_s'] / 83.0:.1f}x |" in table
    # the matmul peak is measured again at the end; the conservative share divides by the larger one
    first, again = report["ceilings"]["matmul_tflops"], report["ceilings_after"]["matmul_tflops"]
    assert first > 0 and again > 0 and "share at the higher peak" in table
    assert f"| {row['share_of_bound'] * first / max(first, again):.0%} |" in table
    baseline.write_text(baseline.read_text().replace('"CPU"', '"NVIDIA H100 80GB HBM3"'))
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_engine.py"), "--tiny", "--paths", "torch",
                             "--out", str(tmp_path), "--fast-dllm-result", str(baseline)],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 2 and "was measured on NVIDIA H100 80GB HBM3, this is CPU" in result.stderr


def test_sweep_silu_mul_checks_every_tile_against_the_one_row_tile(tmp_path):
    """The GPU sweep's CPU mode (Triton interpreter): every tile timed, and each gave the same bits."""
    _run("sweep_silu_mul.py", "--interpret", "--out", str(tmp_path), interpret=True)
    [path] = tmp_path.glob("silu_mul_*.json")
    report = json.loads(path.read_text())
    assert {r["in_dtype"] for r in report["rows"]} == {"float32", "bfloat16"}
    tiles = [e for r in report["rows"] for e in r["tiles"]]
    assert len(tiles) > 10 and all(e["same_bits_as_first"] and e["us"] > 0 for e in tiles)


def test_sweep_large_gemms_runs_every_config_under_the_interpreter(tmp_path):
    """The GPU sweep's CPU mode: every SwiGLU config and row order ran (pointer loads, tensor
    descriptors, persistent, interleaved) and matched the composed path within one rounding."""
    _run("sweep_large_gemms.py", "--interpret", "--out", str(tmp_path), interpret=True)
    [path] = tmp_path.glob("large_gemms_*.json")
    report = json.loads(path.read_text())
    configs = [c for r in report["rows"] for c in r["gate_up"]["configs"]]
    assert len(configs) == 2 * len(report["rows"][0]["gate_up"]["configs"]) > 20
    assert all("error" not in c and c["relative_error"] < 1e-3 for c in configs), configs
    assert {c["config"]["group"] for c in configs} == {0, 1, 64, 128}
    assert all(r["o"]["addmm_max_abs_diff"] == 0.0 for r in report["rows"])


def test_profile_engine_steps_runs_each_variant(tmp_path):
    _run("profile_engine_steps.py", "--tiny", "--concurrency", "4", "--variants", "default,one-host-thread",
         "--out", str(tmp_path))
    [path] = tmp_path.glob("engine_steps_*.json")
    rows = {r["variant"]: r for r in json.loads(path.read_text())["rows"]}
    assert rows["one-host-thread"]["host_threads"] == 1 and rows["default"]["steps"] == rows["one-host-thread"]["steps"]
    assert "kernels" in rows["default"]  # the first variant's profiled window
