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
