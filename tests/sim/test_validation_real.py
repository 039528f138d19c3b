"""A short real replay against a local Ray Serve deployment, and the simulator validated on it.

The embedded model ``dilaserve-tiny-arith`` is served on one CPU replica with DiLaServe's
policies (slack routing, deadline-aware admission), in its own Serve application at
``/sim-validation``: on the Ray instance another suite left running (the serving tests keep one
per session), else on a new 2-CPU one with Serve's proxy at 127.0.0.1:8123. In order:

1. warm-up: requests 0.25 s apart without deadlines. The replica's tokens-per-step estimate
   must converge before deadlines are enforced (a cold estimate is the prior, ~8x too many
   steps for this model, and admission would refuse nearly everything); they also measure the
   serving overhead (below);
2. ``calibrate_baseline``: idle latency by shape, which sets every request's deadline
   (``slo_scale`` x it), as ``dilaserve replay --calibrate`` does;
3. the replay: a Poisson trace (``SETTINGS``), open loop, through ``dilaserve.replay.client``
   with checkable arithmetic prompts (so accuracy is measured);
4. the replica's fitted ``StepCost`` (``EngineStats.step_cost``) and recent tokens decided
   per step, from ``GET /v1/dilaserve/replicas``.

Then the same requests (warm-up, then the trace) go through ``simulate`` at step fidelity,
configured like the deployment: ``ClusterConfig.from_serve_config`` of the same serving config
with the fitted cost, the quality profile's ``AcceptanceModel`` (full-block entries), the
client's deadlines, the same routing / admission / SLO settings and the measured overhead;
five acceptance seeds, pooled. ``compare`` must find attainment and TTFT / end-to-end
percentiles within ``TOLERANCE`` (if not, the real run is replayed once more, and that one
must agree: see the test).

How the simulator's inputs are matched to what really ran:

- *Output lengths.* The model stops at end-of-sequence (answers are ~20-45 of the 64
  positions asked) and the engine then finishes the request, while a simulated request decodes
  all its ``output_tokens``. It gets the whole blocks the real request decoded: up to the block
  holding its stop (received tokens + the EOS position). Whole blocks, because the stop's
  block takes as many steps as a full one (its positions after the stop are end-of-sequence
  fill, decided along), and the profile's tokens per step are per full block: 1.5 blocks x
  32 / 22.5 = 2.1 steps per request, the profile's measured 2.13. The canvas positions never
  decoded join the simulated prompt, so sequence lengths (what refresh steps compute and
  read) are the real ones. Requests the real run refused get the median.
- *Prompt lengths* are the server's: the chat template adds ~23 tokens to the client's count.
- *Deadlines* are the client's, request by request (``SimPolicies.baseline`` looks them up).
- *Overhead* (HTTP proxy, ingress, Ray hops, tokenization, the client: time outside the
  engine) is the median of real minus simulated (zero-overhead) end-to-end latency over the
  warm-up requests, which ran on an idle replica.

What the tolerance absorbs (measured in docs/benchmarks/sim_validation_cpu_2026-11-22.md):
the simulator is optimistic in bursts. On 2 shared cores the HTTP proxy, the ingress and the
client take CPU from each other and from the replica when several requests arrive together;
the simulator's overhead is a constant, and its front door and replicas never contend. The
real run itself varies by up to 2x at p90 between identical runs on this machine. Also, real
admission predicts all 64 positions where the simulated replica predicts the decoded blocks,
so the real run refuses a few percent more in bursts; and a simulated step commits the first
positions of a block (its first token streams at once) where the model commits any.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from dilaserve.engine.cost_model import StepCost
from dilaserve.replay.metrics import compute_metrics
from dilaserve.replay.records import RequestRecord, Status
from dilaserve.replay.report import metrics_table
from dilaserve.replay.synthetic import FixedLength, IndependentLengths, LogNormalLength, PoissonArrivals, synthesize
from dilaserve.replay.trace import Trace
from dilaserve.sim import AcceptanceModel, ClusterConfig, SimPolicies, Workload, simulate
from dilaserve.sim.validation import Comparison, Tolerance, compare

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
MODEL = "dilaserve-tiny-arith"
QUALITY_PROFILE = ROOT / "docs/benchmarks/quality_dilaserve-tiny-arith_cpu_2026-11-22/quality_dilaserve-tiny-arith_arith.json"
BLOCK = 32
APP, ROUTE = "sim-validation", "/sim-validation"
PORT = 8123  # when this test starts Ray: not Serve's default 8000 (taken: any free port)


@dataclass(frozen=True)
class Settings:
    # Poisson arrivals at 3 req/s on one replica: ~60 requests in 20 s, where the real
    # deployment meets ~95% of deadlines at slo_scale 3; at 4 req/s it drops to ~80%, so this
    # is ~75% of the rate the SLO sustains (the engine itself computes ~25% of the time: what
    # breaks first on 2 shared cores is bursts, see the module docstring).
    rate_rps: float = 3.0
    duration_s: float = 20.0
    prompt_mean_tokens: int = 96
    max_tokens: int = 64
    slo_scale: float = 3.0
    threshold: float = 0.9
    # One replica: on 2 cores, two replica engines plus the HTTP proxy, the ingress and the
    # client contend for CPU in ways the simulator does not model (the simulated replicas are
    # independent), which made two-replica runs 9-52% slower than simulated at the median.
    num_replicas: int = 1
    routing: str = "slack"
    warmup_requests: int = 40
    warmup_gap_s: float = 0.25  # idle replica: a request takes ~0.1 s alone
    seed: int = 11


SETTINGS = Settings()
SIM_SEEDS = range(5)  # simulations pooled per comparison
# Stated tolerance of the simulated run against the real one (see the module docstring and
# docs/benchmarks/sim_validation_cpu_2026-11-22.md for the measured errors).
TOLERANCE = Tolerance(attainment=0.20, latency=0.40, p90_latency=0.60, tail_latency=0.75)


def serve_config(s: Settings):
    from dilaserve.models.store import EMBEDDED_MODELS_DIR
    from dilaserve.serving.config import parse_config

    return parse_config({
        "app_name": APP,
        "models": [{"name": MODEL, "path": str(EMBEDDED_MODELS_DIR / MODEL)}],
        "variants": [{"name": "cpu", "model": MODEL, "num_replicas": s.num_replicas, "num_cpus_per_replica": 0.5,
                      "threshold": s.threshold,
                      "engine": {"max_batch_tokens": 4096, "max_refresh_tokens": 2048, "kv_memory_gib": 0.25}}],
        "slo": {"slo_scale": s.slo_scale},
        "routing": {"policy": s.routing},
        "admission": {"enabled": True},
        "http": {"host": "127.0.0.1", "port": PORT, "ingress_num_cpus": 0.25},
        "defaults": {"max_tokens": s.max_tokens, "block_length": BLOCK, "cache": "dual"},
    }, "validation config")


def make_trace(s: Settings) -> Trace:
    lengths = IndependentLengths(LogNormalLength(s.prompt_mean_tokens, 0.5, min_tokens=32, max_tokens=256),
                                 FixedLength(s.max_tokens))
    return synthesize(PoissonArrivals(s.rate_rps), lengths, duration_s=s.duration_s, seed=s.seed, name="validation")


def warmup_trace(s: Settings) -> Trace:
    lengths = IndependentLengths(LogNormalLength(s.prompt_mean_tokens, 0.5, min_tokens=32, max_tokens=256),
                                 FixedLength(s.max_tokens))
    base = synthesize(PoissonArrivals(1.0), lengths, num_requests=s.warmup_requests, seed=s.seed + 1)
    return Trace([r._replace(arrival_s=i * s.warmup_gap_s) for i, r in enumerate(base)], name="warmup")


def _is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RealRun:
    config: object  # ServeConfig
    warmup: list[RequestRecord]
    records: list[RequestRecord]
    warmup_prompt_tokens: list[int]  # as the server tokenizes them (chat template included)
    prompt_tokens: list[int]
    deadlines_s: list[float]
    baseline: object  # LinearLatency
    replica_stats: dict
    wall_s: dict


def run_real(s: Settings) -> RealRun:
    """Deploys, warms up, calibrates and replays; tears everything down before returning."""
    import httpx
    import ray
    from ray import serve

    from dilaserve.models.tokenizer import load_tokenizer
    from dilaserve.replay.client import ReplayConfig, calibrate_baseline, prepare_requests, replay_prepared
    from dilaserve.replay.prompts import TaskPromptBuilder, tokenizer_counter
    from dilaserve.serving.app import build_app
    from dilaserve.serving.model_store import resolve_model_dir

    config = serve_config(s)
    model_dir = resolve_model_dir(config.models[0])
    tokenizer = load_tokenizer(model_dir)
    counter = tokenizer_counter(model_dir)

    def server_tokens(prompt: str) -> int:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
        return len(tokenizer.encode(text, add_special_tokens=False))

    wall = {}
    t0 = time.perf_counter()
    owns_ray = not ray.is_initialized()
    if owns_ray:  # else: join the instance another suite started (the serving tests keep one per session)
        ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    try:
        if owns_ray:
            port = PORT if _is_free(PORT) else _free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
        else:
            from ray.serve.context import _get_global_client

            serve.start()
            port = _get_global_client().http_config.port
        serve.run(build_app(config), name=APP, route_prefix=ROUTE)
        url = f"http://127.0.0.1:{port}{ROUTE}"
        rc = ReplayConfig(endpoint=url, model=MODEL, api="chat", system="real", slo_scale=s.slo_scale,
                          show_progress=False, seed=s.seed, request_timeout_s=60.0)
        wall["deploy"] = time.perf_counter() - t0

        t = time.perf_counter()
        warm = prepare_requests(warmup_trace(s), TaskPromptBuilder("arith", count_tokens=counter, seed=s.seed + 1),
                                seed=s.seed + 1)
        warmup = asyncio.run(replay_prepared(warm, dataclasses.replace(rc, system="warmup")))
        baseline = asyncio.run(calibrate_baseline(
            rc, TaskPromptBuilder("arith", count_tokens=counter, seed=s.seed + 2),
            [(p, s.max_tokens) for p in (48, 96, 192)], repeats=2))
        wall["warmup+calibration"] = time.perf_counter() - t

        t = time.perf_counter()
        prepared = prepare_requests(make_trace(s), TaskPromptBuilder("arith", count_tokens=counter, seed=s.seed),
                                    baseline=baseline, slo_scale=s.slo_scale, seed=s.seed)
        records = asyncio.run(replay_prepared(prepared, rc))
        wall["replay"] = time.perf_counter() - t
        stats = httpx.get(f"{url}/v1/dilaserve/replicas", timeout=30.0, trust_env=False).json()
    finally:
        t = time.perf_counter()
        if owns_ray:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
        elif APP in serve.status().applications:
            serve.delete(APP)
        wall["teardown"] = time.perf_counter() - t
    return RealRun(config, warmup, records, [server_tokens(p.prompt) for p in warm],
                   [server_tokens(p.prompt) for p in prepared], [p.deadline_s for p in prepared], baseline,
                   stats["replicas"], wall)


# -- the simulation of the same run ----------------------------------------------------------
def decoded_tokens(records: list[RequestRecord], max_tokens: int, block_size: int) -> list[int]:
    """Positions each request decoded: the whole blocks up to the one holding its stop (the
    received tokens and the EOS position), at most ``max_tokens``. Requests that never ran
    get the median of those that did."""
    def blocks(r: RequestRecord) -> int:
        return min(max_tokens, -(-(r.output_tokens_received + 1) // block_size) * block_size)

    ran = [blocks(r) for r in records if r.status is Status.OK]
    fill = int(statistics.median_low(ran)) if ran else max_tokens
    return [blocks(r) if r.status is Status.OK else fill for r in records]


def workload_of(arrival_s: list[float], prompt_tokens: list[int], decoded: list[int], max_tokens: int) -> Workload:
    """Decoded positions as the output; the canvas positions never decoded join the prompt, so
    sequence lengths are the real ones (prompt + max_tokens)."""
    import numpy as np

    return Workload(np.asarray(arrival_s, dtype=np.float64),
                    np.asarray([p + max_tokens - d for p, d in zip(prompt_tokens, decoded)], dtype=np.int64),
                    np.asarray(decoded, dtype=np.int64))


def concat(a: Workload, b: Workload, offset_s: float) -> Workload:
    import numpy as np

    return Workload(np.concatenate([a.arrival_s, b.arrival_s + offset_s]),
                    np.concatenate([a.prompt_tokens, b.prompt_tokens]),
                    np.concatenate([a.output_tokens, b.output_tokens]))


class DeadlineLookup:
    """``SimPolicies.baseline`` giving each request the client's deadline: ``slo_scale`` x this
    = the deadline that request was sent with, looked up by its simulated (prompt, output)."""

    def __init__(self, workload: Workload, deadlines_s: list[float | None], slo_scale: float, default_s: float):
        self.slo_scale = slo_scale
        self.default_s = default_s
        self.table: dict[tuple[int, int], list[float]] = {}
        for p, o, d in zip(workload.prompt_tokens.tolist(), workload.output_tokens.tolist(), deadlines_s):
            if d is not None:
                self.table.setdefault((p, o), []).append(d)

    def __call__(self, prompt_tokens: int, output_tokens: int) -> float:
        found = self.table.get((prompt_tokens, output_tokens))
        return (statistics.mean(found) if found else self.default_s) / self.slo_scale


def fitted_costs(replica_stats: dict) -> dict[str, StepCost]:
    """Each variant's cost: the mean of its replicas' fitted ``StepCost``."""
    by_variant: dict[str, list[StepCost]] = {}
    for stats in replica_stats.values():
        by_variant.setdefault(stats["variant"], []).append(StepCost(*stats["engine"]["step_cost"]))
    return {v: StepCost(*(statistics.mean(getattr(c, f) for c in costs) for f in ("fixed_s", "per_token_s",
                                                                                  "per_context_s")))
            for v, costs in by_variant.items()}


@dataclass
class Validation:
    real: list[RequestRecord]
    simulated: list[RequestRecord]
    comparison: Comparison
    overhead_s: float
    costs: dict[str, StepCost]


def simulate_run(run: RealRun, s: Settings, seeds=SIM_SEEDS, *, acceptance: AcceptanceModel | None = None,
                 decoded=decoded_tokens) -> Validation:
    """The real run's requests through the simulator once per seed (acceptance draws), pooled:
    what is compared is the simulator's distribution, not one draw of it."""
    config = run.config
    costs = fitted_costs(run.replica_stats)
    policies = SimPolicies(routing=config.routing, admission=config.admission, slo=config.slo, fidelity="step",
                           acceptance=acceptance or AcceptanceModel.from_quality_profile(QUALITY_PROFILE),
                           system="simulated")
    warm = workload_of([r.arrival_s for r in run.warmup], run.warmup_prompt_tokens,
                       decoded(run.warmup, s.max_tokens, BLOCK), s.max_tokens)
    main = workload_of([r.arrival_s for r in run.records], run.prompt_tokens,
                       decoded(run.records, s.max_tokens, BLOCK), s.max_tokens)
    offset = float(warm.arrival_s[-1]) + 5.0  # the trace starts on an idle cluster, as the real one did
    both = concat(warm, main, offset)
    # Warm-up requests carried no deadline; any generous one admits them on idle replicas.
    lookup = DeadlineLookup(both, [None] * len(warm) + run.deadlines_s, s.slo_scale, default_s=30.0)
    policies = dataclasses.replace(policies, baseline=lookup)

    # The overhead: real minus simulated (zero-overhead) latency of the idle warm-up requests.
    gaps = []
    for seed in seeds:
        idle = simulate(warm, ClusterConfig.from_serve_config(config, costs, overhead_s=0.0),
                        dataclasses.replace(policies, seed=seed))
        gaps += [r.e2e_s - sim.e2e_s for r, sim in zip(run.warmup, idle) if r.e2e_s is not None and sim.e2e_s is not None]
    overhead_s = max(0.0, statistics.median(gaps))

    cluster = ClusterConfig.from_serve_config(config, costs, overhead_s=overhead_s)
    simulated = []
    for seed in seeds:
        records = simulate(both, cluster, dataclasses.replace(policies, seed=seed))[len(warm):]
        simulated += [_as_real(r, real, offset) for r, real in zip(records, run.records)]
    return Validation(run.records, simulated, compare(run.records, simulated, TOLERANCE), overhead_s, costs)


def _as_real(r: RequestRecord, real: RequestRecord, offset_s: float) -> RequestRecord:
    """A simulated record on the trace's clock, with the real request's id and lengths (tokens
    received where it ran for real, so TPOT and goodput read alike)."""
    def shift(t: float | None) -> float | None:
        return None if t is None else t - offset_s

    received = real.output_tokens_received if real.status is Status.OK and r.status is Status.OK \
        else r.output_tokens_received
    return dataclasses.replace(r, request_id=real.request_id, arrival_s=real.arrival_s, send_s=shift(r.send_s),
                               first_token_s=shift(r.first_token_s), finish_s=shift(r.finish_s),
                               prompt_tokens=real.prompt_tokens, output_tokens_requested=real.output_tokens_requested,
                               output_tokens_received=received)


_COUNTS = ("num_requests", "num_ok", "num_refused", "num_errors", "num_timeouts", "num_slo_met", "offered_rps",
           "throughput_rps", "goodput_rps", "goodput_tokens_per_s", "num_scored", "num_correct")


def per_run(m, runs: int):
    """Pooled metrics of ``runs`` simulations shown per run (counts and rates divided)."""
    changes = {f: getattr(m, f) / runs for f in _COUNTS}
    return dataclasses.replace(m, **{f: round(v) if f.startswith("num_") else v for f, v in changes.items()})


def report(run: RealRun, v: Validation) -> str:
    real_m = v.comparison.real
    sim_m = per_run(v.comparison.simulated, len(v.simulated) // max(1, len(v.real)))
    observed = {name: round(st["engine"]["tokens_decided_per_step"], 2) for name, st in run.replica_stats.items()}
    lines = [
        metrics_table([dataclasses.replace(real_m, system="real"),
                       dataclasses.replace(sim_m, system=f"simulated (mean of {len(SIM_SEEDS)} seeds)")]),
        "",
        f"baseline (idle latency): {run.baseline}",
        f"fitted step costs: {v.costs}; per replica: "
        f"{ {n: st['engine']['step_cost'] for n, st in run.replica_stats.items()} }",
        f"observed tokens decided / step: {observed}; profile at {SETTINGS.threshold}: "
        f"{AcceptanceModel.from_quality_profile(QUALITY_PROFILE).mean(SETTINGS.threshold, BLOCK):.2f}",
        f"measured overhead: {1e3 * v.overhead_s:.1f} ms; wall: { {k: round(x, 1) for k, x in run.wall_s.items()} }",
        f"tolerance: {TOLERANCE}",
        v.comparison.summary(),
    ]
    return "\n".join(lines)


# -- the tests -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_run() -> RealRun:
    pytest.importorskip("ray")
    return run_real(SETTINGS)


def test_short_real_replay_accounts_for_every_request(real_run):
    trace = make_trace(SETTINGS)
    records = real_run.records
    assert len(records) == len(trace) and [r.request_id for r in records] == list(range(len(trace)))
    statuses = {r.status for r in records}
    assert statuses <= {Status.OK, Status.REFUSED}, [r.error for r in records if r.error][:3]
    assert all(r.status is Status.OK for r in real_run.warmup), [r.error for r in real_run.warmup if r.error][:3]
    m = compute_metrics(records)
    print(metrics_table([m]))
    print({name: round(stats["engine"]["prediction_scale"], 2) for name, stats in real_run.replica_stats.items()})
    assert m.num_requests == len(trace) == m.num_ok + m.num_refused
    # Moderate load: most are admitted. What this guards against is admission refusing nearly
    # everything (a cold tokens-per-step estimate does); local runs refused 0-7%, and one CI run
    # on a busier 2-core machine refused 21% (14 of 68) of a burstier stretch.
    assert m.num_ok >= 0.6 * len(trace)
    assert 0.0 < m.slo_attainment <= 1.0 and m.goodput_rps > 0
    assert m.ttft_s is not None and m.e2e_s is not None and m.ttft_s.p50 <= m.e2e_s.p50
    assert all(r.deadline_s is not None and r.deadline_s > 0 for r in records)
    # Accuracy is measured: every completed request is scored, and the model mostly answers right.
    assert m.num_scored == m.num_ok and m.accuracy is not None and m.accuracy >= 0.7
    # The replicas report their fitted step costs.
    for name, stats in real_run.replica_stats.items():
        cost = stats["engine"]["step_cost"]
        assert len(cost) == 3 and cost[0] + cost[1] + cost[2] > 0, (name, cost)


def test_simulator_matches_the_real_replay(real_run):
    validation = simulate_run(real_run, SETTINGS)
    print("\n" + report(real_run, validation))
    assert len(validation.simulated) == len(SIM_SEEDS) * len(validation.real)
    assert 0.0 <= validation.overhead_s < 1.0
    if not validation.comparison.is_within:
        # Other processes on these 2 cores can slow a 20 s window of the real run at random
        # (identical runs differ up to 2x at p90): the whole real run is replayed once more,
        # and the simulation of that one must agree. A real disagreement fails both.
        first = validation.comparison.summary()
        again = run_real(SETTINGS)
        validation = simulate_run(again, SETTINGS)
        print("\nsecond real run:\n" + report(again, validation))
        assert validation.comparison.is_within, f"first run:\n{first}\nsecond run:\n{validation.comparison.summary()}"
