"""``scripts/bench_load.py --smoke``: every mode at every load point, on CPU, in about a minute."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_load_smoke(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_load.py"), "--smoke", "--out", str(tmp_path)],
                            capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [path] = tmp_path.glob("load_*_smoke.json")
    report = json.loads(path.read_text())
    assert report["acceptance_profile"].endswith("acceptance_dilaserve-tiny-arith.json") and report["random_weights"]
    rows = [r for r in report["rows"] if "error" not in r and "skipped" not in r]
    assert not [r for r in report["rows"] if "error" in r]
    modes = {r["mode"] for r in rows}
    assert modes == {"block", "chunk16", "chunk8", "chunk4", "chunk2", "ar1", "adaptive", "adaptive_unbounded"}
    assert {r["load"]["kind"] for r in rows} == {"closed", "poisson"}
    for r in rows:
        assert r["decided_tokens_per_s"] > 0 and r["engine_steps"] > 0
        if r["mode"].startswith("chunk") or r["mode"] == "ar1":
            assert r["mean_chunk"] == r["chunk"]
        if r["mode"] == "block":
            assert r["mean_chunk"] == 32
    md = path.with_suffix(".md").read_text()
    assert "| adaptive |" in md and "acceptance" in md.lower()
    assert path.with_name(path.stem + "_chunks.png").stat().st_size > 0
    # A p99 over the finished requests is marked a lower bound where a request still running at
    # the end had waited longer (the window cut off the tail), and only then.
    for r in rows:
        oldest, p99 = r["oldest_unfinished_s"], r["e2e_p99_s"]
        assert r["e2e_p99_is_lower_bound"] == (oldest is not None and (p99 is None or oldest > p99))
    marked = [r for r in rows if r["e2e_p99_is_lower_bound"]]
    assert ("the window cut off the tail" in md) == bool(marked)


def test_bench_load_fixed_steps(tmp_path):
    """``--steps-per-block 8``: #9's 4-tokens-per-step workload, whole blocks with and without
    the phase-mixed refresh bound; every step commits what the schedule sets (block 32 / 8)."""
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_load.py"), "--smoke", "--steps-per-block", "8",
                             "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [path] = tmp_path.glob("load_*_steps8_smoke.json")
    report = json.loads(path.read_text())
    rows = report["rows"]
    closed = {(r["mode"], r["load"]["concurrency"]) for r in rows if r["load"]["kind"] == "closed"}
    assert closed == {(m, c) for m in ("block", "block_phase_mixed") for c in (1, 8)}
    assert {r["mode"] for r in rows if r["load"]["kind"] == "poisson"} == {"block", "block_phase_mixed"}
    for r in rows:
        assert "error" not in r and "skipped" not in r, r
        assert r["decided_per_request_step"] == 4.0 and r["mean_chunk"] == 32, r
    assert "fixed steps (8 a block: 4 tokens decided per step" in path.with_suffix(".md").read_text()


def test_bench_load_refuses_chunk_modes_with_fixed_steps(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_load.py"), "--smoke", "--steps-per-block", "8",
                             "--modes", "block,chunk8", "--out", str(tmp_path)], capture_output=True, text=True,
                            cwd=ROOT, timeout=600)
    assert result.returncode == 2 and "only block, block_phase_mixed apply" in result.stderr, result.stderr
    assert not list(tmp_path.glob("load_*"))
