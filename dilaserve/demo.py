"""The main job: DiLaServe against a static baseline on one machine, same trace, same replicas.

A local Ray cluster serves the embedded model on ``num_replicas`` CPU replicas twice in turn:

- ``static``: fixed threshold, round-robin routing, first come first served, no admission
  control, no load control (how a dLLM is served without DiLaServe);
- ``dilaserve``: slack-aware routing, deadline-aware admission (429 at once when a deadline
  cannot be met), and per-request load control (a late request's threshold is lowered step by
  step, never below the quality floor).

Both replay the same bursty trace (on/off arrivals) with prompts of the trace's lengths built
from the checkable task, so accuracy is measured too. Deadlines are ``slo_scale`` x each
request's latency alone on an idle replica, calibrated once before the runs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from dilaserve.replay.client import ReplayConfig, calibrate_baseline, replay_async
from dilaserve.replay.metrics import compute_metrics
from dilaserve.replay.prompts import TaskPromptBuilder, tokenizer_counter
from dilaserve.replay.records import save_records
from dilaserve.replay.report import metrics_table, write_report
from dilaserve.replay.synthetic import FixedLength, IndependentLengths, LogNormalLength, OnOffArrivals, synthesize
from dilaserve.replay.trace import Trace

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoSettings:
    duration_s: float = 60.0  # trace length
    on_rate_rps: float = 20.0  # arrival rate in bursts: well past two CPU replicas' capacity
    off_rate_rps: float = 4.0  # arrival rate between bursts
    mean_on_s: float = 8.0
    mean_off_s: float = 8.0
    prompt_mean_tokens: int = 96
    max_tokens: int = 64  # generated positions per request (the task's answers fit)
    num_replicas: int = 2
    threshold: float = 0.9  # the static baseline's threshold, and DiLaServe's starting one
    quality_floor: float = 0.8  # lowest threshold DiLaServe may lower a late request to (93.5% vs 96% at 0.9)
    slo_scale: float = 4.0
    seed: int = 7
    port: int = 8000


def demo_trace(s: DemoSettings) -> Trace:
    arrivals = OnOffArrivals(on_rate_rps=s.on_rate_rps, mean_on_s=s.mean_on_s, mean_off_s=s.mean_off_s,
                             off_rate_rps=s.off_rate_rps)
    lengths = IndependentLengths(LogNormalLength(s.prompt_mean_tokens, 0.5, min_tokens=32, max_tokens=384),
                                 FixedLength(s.max_tokens))
    return synthesize(arrivals, lengths, duration_s=s.duration_s, seed=s.seed, name="demo_bursty")


def serve_config(s: DemoSettings, system: str, model_path: str | None):
    """The two systems differ only in policies; replicas, model and engine are the same."""
    from dilaserve.serving.config import parse_config

    is_dilaserve = system == "dilaserve"
    return parse_config({
        "app_name": f"demo-{system}",
        "models": [{"name": "dilaserve-tiny-arith", "path": model_path}],
        "variants": [{
            "name": "cpu", "model": "dilaserve-tiny-arith", "num_replicas": s.num_replicas,
            "num_cpus_per_replica": 0.75, "threshold": s.threshold,
            "engine": {"max_batch_tokens": 4096, "max_refresh_tokens": 2048, "kv_memory_gib": 0.25,
                       "load_control": is_dilaserve, "threshold_step": 0.1},
        }],
        "slo": {"slo_scale": s.slo_scale, "quality_floor": s.quality_floor if is_dilaserve else None},
        "routing": {"policy": "slack" if is_dilaserve else "round_robin"},
        "admission": {"enabled": is_dilaserve},
        "http": {"host": "127.0.0.1", "port": s.port},
        "defaults": {"max_tokens": s.max_tokens, "block_length": 32, "cache": "dual"},
    })


def run_demo(out_dir: str | Path, s: DemoSettings, model_path: str | None = None) -> dict:
    import ray
    from ray import serve

    from dilaserve.serving.app import build_app
    from dilaserve.serving.model_store import resolve_model_dir

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trace = demo_trace(s)
    model_dir = resolve_model_dir(serve_config(s, "static", model_path).models[0])
    builder = TaskPromptBuilder("arith", count_tokens=tokenizer_counter(model_dir), seed=s.seed)
    print(f"trace: {len(trace)} requests over {trace.span_s:.0f} s (bursts at {s.on_rate_rps} req/s), "
          f"{s.num_replicas} CPU replicas of {model_dir.name}", flush=True)
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    records_by_system = {}
    baseline = None
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": s.port})
        for system in ("static", "dilaserve"):
            config = serve_config(s, system, str(model_dir))
            t0 = time.perf_counter()
            serve.run(build_app(config), name=config.app_name, route_prefix="/")
            print(f"[{system}] deployed in {time.perf_counter() - t0:.0f} s", flush=True)
            rc = ReplayConfig(endpoint=f"http://127.0.0.1:{s.port}", system=system, slo_scale=s.slo_scale,
                              api="chat", show_progress=True, seed=s.seed)
            if baseline is None:  # latency alone on an idle replica, measured once for both systems
                shapes = [(p, s.max_tokens) for p in (48, 96, 192, 384)]
                baseline = asyncio.run(calibrate_baseline(rc, builder, shapes, repeats=2))
                print(f"idle latency: {baseline}", flush=True)
            records = asyncio.run(replay_async(trace, rc, builder, baseline=baseline))
            records_by_system[system] = records
            save_records(records, out / f"{system}.jsonl")
            serve.delete(config.app_name)
    finally:
        serve.shutdown()
        ray.shutdown()
    metrics = [compute_metrics(r, system=name) for name, r in records_by_system.items()]
    table = metrics_table(metrics)
    notes = (f"Settings: {json.dumps(dataclasses.asdict(s))}. Deadline = slo_scale x idle latency "
             f"({baseline}). Refused and failed requests count as missed.")
    files = write_report(out, records_by_system, title="DiLaServe demo: static baseline vs DiLaServe", notes=notes)
    print(table, flush=True)
    print(f"report: {files.markdown}; plots: {', '.join(str(p) for p in files.plots)}", flush=True)
    return {m.system: m for m in metrics}
