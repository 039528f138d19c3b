"""A tensor-parallel replica served over HTTP by Ray Serve, end to end, on this machine.

Writes a random LLaDA checkpoint (published format, byte-level tokenizer) of a mid-size shape,
starts Ray and Serve, deploys one variant with ``tensor_parallel`` ranks (one GPU each on
CUDA; gloo processes on CPU), then sends completions (some streamed) from concurrent clients
and checks every answer: HTTP 200, tokens generated, the replica reporting its degree and its
worker processes. Prints a summary and writes it as JSON.

    python3 scripts/serve_tp_check.py --tensor-parallel 2 --device cuda --out DIR
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tensor-parallel", type=int, default=2)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--port", type=int, default=8311)
    parser.add_argument("--small", action="store_true", help="a toy model (CPU check of the script)")
    parser.add_argument("--out", default=None, help="directory for serve_tp_check.json")
    args = parser.parse_args()

    import ray
    from ray import serve

    from dilaserve.models.checkpoint import make_random_checkpoint
    from dilaserve.serving.app import build_app
    from dilaserve.serving.config import parse_config

    shape = (dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, vocab_size=320) if args.small else
             dict(hidden_size=2048, num_layers=8, num_heads=16, intermediate_size=5632, vocab_size=32768))
    tmp = tempfile.mkdtemp(prefix="dilaserve-tp-")
    model_dir = make_random_checkpoint(Path(tmp) / "model", "llada", seed=0, max_positions=4096, **shape)
    on_gpu = args.device == "cuda"
    config = parse_config({
        "app_name": "tp-check",
        "models": [{"name": "tp-model", "path": str(model_dir), "device": args.device,
                    "dtype": "bfloat16" if on_gpu else "float32"}],
        "variants": [{"name": f"tp{args.tensor_parallel}", "model": "tp-model",
                      "tensor_parallel": args.tensor_parallel, "num_cpus_per_replica": 1,
                      "engine": {"kv_memory_gib": 4.0 if on_gpu else 0.05}}],
        "http": {"host": "127.0.0.1", "port": args.port, "ingress_num_cpus": 0.5},
        "defaults": {"max_tokens": 64, "block_length": 32},
    }, "serve_tp_check")
    ray.init(num_cpus=4, num_gpus=args.tensor_parallel if on_gpu else 0, include_dashboard=False,
             logging_level=logging.WARNING)
    summary: dict = {"tensor_parallel": args.tensor_parallel, "device": args.device, "shape": shape}
    try:
        t0 = time.perf_counter()
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        serve.run(build_app(config), name=config.app_name, route_prefix="/")
        summary["deploy_s"] = time.perf_counter() - t0
        url = f"http://127.0.0.1:{args.port}"
        replicas = httpx.get(f"{url}/v1/dilaserve/replicas", timeout=30).json()["replicas"]
        (stats,) = replicas.values()
        summary["replica"] = {k: stats[k] for k in ("name", "tensor_parallel", "worker_pids")}

        def one(i: int) -> dict:
            body = {"model": "tp-model", "prompt": f"request {i}: 12+{i}=", "max_tokens": 64, "temperature": 0}
            start = time.perf_counter()
            if i % 4 == 0:  # streamed
                events = 0
                with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=120) as r:
                    for line in r.iter_lines():
                        events += line.startswith("data: ")
                    return {"status": r.status_code, "seconds": time.perf_counter() - start, "events": events}
            r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
            usage = r.json().get("usage", {}) if r.status_code == 200 else {}
            return {"status": r.status_code, "seconds": time.perf_counter() - start,
                    "completion_tokens": usage.get("completion_tokens", 0), "body": None if r.status_code == 200 else r.text}

        with ThreadPoolExecutor(args.clients) as pool:
            results = list(pool.map(one, range(args.requests)))
        ok = [r for r in results if r["status"] == 200]
        summary["requests"] = len(results)
        summary["ok"] = len(ok)
        summary["latency_p50_s"] = statistics.median(r["seconds"] for r in ok) if ok else None
        summary["failures"] = [r for r in results if r["status"] != 200][:3]
        summary["completion_tokens"] = sum(r.get("completion_tokens", 0) for r in ok)
        summary["streamed_events"] = sum(r.get("events", 0) for r in ok)
        passed = (len(ok) == len(results) and summary["replica"]["tensor_parallel"] == args.tensor_parallel
                  and len(summary["replica"]["worker_pids"]) == args.tensor_parallel - 1
                  and summary["completion_tokens"] > 0 and summary["streamed_events"] > 0)
        summary["passed"] = passed
    finally:
        serve.shutdown()
        ray.shutdown()
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "serve_tp_check.json").write_text(json.dumps(summary, indent=1))
    raise SystemExit(0 if summary.get("passed") else 1)


if __name__ == "__main__":
    main()
