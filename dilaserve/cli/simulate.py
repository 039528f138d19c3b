"""``dilaserve simulate``: replay a trace on a simulated cluster and report SLO attainment.

The simulator drives the engine's scheduler (``--fidelity step``) or a request-level model of
it (``--fidelity fast``, for hundreds of replicas and millions of requests), with the serving
layer's admission and routing code, and writes the same records ``dilaserve replay`` writes.

    dilaserve simulate --synthetic poisson:5000:1000000 --replicas 256 --policy slack --out sim.jsonl

With ``--controller`` the controller (``dilaserve.controller.Controller``, the code the Ray
actor runs) re-plans and reconfigures the simulated cluster on the simulated clock, from
``--replicas`` replicas of the profile's smallest degree, within ``--max-gpus``:

    dilaserve simulate --synthetic step:36:120:360 --controller default --replicas 16 --max-gpus 32 \
        --startup-s 30 --slo-scale 3 --out sim.jsonl
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from dilaserve.cli.args import positive
from dilaserve.errors import InvalidRequestError

log = logging.getLogger(__name__)


def add_parser(sub) -> None:
    p = sub.add_parser("simulate", help="replay a trace on a simulated cluster (1 to hundreds of replicas)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("trace")
    source = g.add_mutually_exclusive_group(required=True)
    source.add_argument("--trace", help="trace CSV (Azure or BurstGPT format)")
    source.add_argument("--synthetic", metavar="SPEC",
                        help="poisson:RATE:N or gamma:RATE:CV:N (RATE in req/s, N requests), or "
                             "step:RATE:STEP_S:END_S (Poisson at RATE, at 2 x RATE from STEP_S to END_S)")
    g.add_argument("--prompt-tokens", type=positive(int), default=256, help="synthetic: mean prompt length (tokens)")
    g.add_argument("--output-tokens", type=positive(int), default=64, help="synthetic: mean output length (tokens)")
    g.add_argument("--length-cv", type=float, default=0.5, help="synthetic: CV of log-normal lengths (0: fixed)")
    g.add_argument("--rate-scale", type=positive(float), default=1.0, help="compress inter-arrival gaps by this")
    g.add_argument("--max-requests", type=positive(int), help="keep the first N arrivals")
    g.add_argument("--max-total-tokens", type=positive(int), help="clip prompt + output to this (the model's limit)")
    g.add_argument("--seed", type=int, default=0, help="synthetic trace and acceptance draws")

    g = p.add_argument_group("cluster")
    g.add_argument("--replicas", type=positive(int), default=1)
    g.add_argument("--fixed-ms", type=float, help="step cost: fixed part per step (ms); default: the cost prior")
    g.add_argument("--per-token-us", type=float, help="step cost: per token computed (microseconds)")
    g.add_argument("--per-context-ns", type=float, help="step cost: per key/value read (nanoseconds)")
    g.add_argument("--max-running", type=positive(int), help="requests decoding at once per replica")
    g.add_argument("--max-batch-tokens", type=positive(int), help="token budget per step")
    g.add_argument("--num-pages", type=positive(int), help="KV pages per replica")
    g.add_argument("--block-size", type=positive(int), default=32)
    g.add_argument("--cache", default="dual", choices=["none", "prefix", "dual"])
    g.add_argument("--quality-profile", help="tokens decided per step per threshold (dilaserve profile quality)")
    g.add_argument("--overhead-ms", type=float, default=0.0,
                   help="time outside the engine per request (HTTP, hops), simulated and predicted")

    g = p.add_argument_group("policies")
    g.add_argument("--policy", default="slack", choices=["slack", "round_robin", "power_of_two"])
    g.add_argument("--admission", default="on", choices=["on", "off"])
    g.add_argument("--threshold", type=float, help="replicas' confidence threshold (default: the engine's)")
    g.add_argument("--slo-scale", type=positive(float), default=5.0, help="deadline = S x predicted latency alone")
    g.add_argument("--fidelity", default="fast", choices=["step", "fast"])

    g = p.add_argument_group("controller (re-plans and reconfigures the simulated cluster)")
    g.add_argument("--controller", metavar="PROFILES", help="run the controller with the planner's profiles from "
                   "this directory (latency.json + quality.json), or 'default' for the planner's defaults; the "
                   "replicas' step cost is then the latency profile's (the --*-ms/us/ns flags are ignored)")
    g.add_argument("--max-gpus", type=positive(int), help="the controller's GPU budget (default: --replicas)")
    g.add_argument("--startup-s", type=float, default=10.0, help="seconds a started replica takes to be ready")
    g.add_argument("--quality-budget", type=float, default=1.0, help="accuracy points below the best allowed")
    g.add_argument("--tick-s", type=positive(float), default=2.0)
    g.add_argument("--window-s", type=positive(float), default=20.0)
    g.add_argument("--period-s", type=positive(float), default=20.0)
    g.add_argument("--min-interval-s", type=float, default=60.0)

    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, help="records, one JSON object per request and line")
    g.add_argument("--system", help="name in records and tables (default: sim-<policy>)")
    g.add_argument("--report-dir", help="write report.md and PNG plots here")
    g.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(run=run)


def build_trace(args: argparse.Namespace):
    from dilaserve.replay import synthetic as syn
    from dilaserve.replay.loaders import load_trace

    if args.trace:
        trace, report = load_trace(args.trace)
        print(report.summary(), file=sys.stderr)
    else:
        parts = args.synthetic.split(":")
        try:
            if parts[0] == "poisson" and len(parts) == 3:
                arrivals, count = syn.PoissonArrivals(float(parts[1])), int(parts[2])
            elif parts[0] == "gamma" and len(parts) == 4:
                arrivals, count = syn.GammaArrivals(float(parts[1]), float(parts[2])), int(parts[3])
            elif parts[0] == "step" and len(parts) == 4:
                from dilaserve.sim.load_step import StepArrivals

                arrivals, count = StepArrivals(float(parts[1]), float(parts[2])), None
                duration_s = float(parts[3])
            else:
                raise ValueError("expected poisson:RATE:N, gamma:RATE:CV:N or step:RATE:STEP_S:END_S")
        except ValueError as exc:
            raise InvalidRequestError(f"--synthetic {args.synthetic!r}: {exc}") from None
        if args.length_cv > 0:
            lengths = syn.IndependentLengths(syn.LogNormalLength(args.prompt_tokens, args.length_cv),
                                             syn.LogNormalLength(args.output_tokens, args.length_cv))
        else:
            lengths = syn.IndependentLengths(syn.FixedLength(args.prompt_tokens), syn.FixedLength(args.output_tokens))
        if count is None:
            trace = syn.synthesize(arrivals, lengths, duration_s=duration_s, seed=args.seed, name=args.synthetic)
        else:
            trace = syn.synthesize(arrivals, lengths, num_requests=count, seed=args.seed, name=args.synthetic)
    if args.max_total_tokens:
        trace = trace.cap_lengths(max_total_tokens=args.max_total_tokens)
    if args.rate_scale != 1.0:
        trace = trace.scale_rate(args.rate_scale)
    if args.max_requests:
        trace = trace.head(args.max_requests)
    if not len(trace):
        raise InvalidRequestError("the trace holds no request")
    return trace


def build_cluster(args: argparse.Namespace):
    import dataclasses

    from dilaserve.engine.config import EngineConfig
    from dilaserve.engine.cost_model import StepCost
    from dilaserve.serving.config import RequestDefaults
    from dilaserve.sim import ClusterConfig

    prior = StepCost()
    cost = StepCost(
        prior.fixed_s if args.fixed_ms is None else args.fixed_ms / 1e3,
        prior.per_token_s if args.per_token_us is None else args.per_token_us / 1e6,
        prior.per_context_s if args.per_context_ns is None else args.per_context_ns / 1e9,
    )
    limits = {k: v for k, v in (("max_running", args.max_running), ("max_batch_tokens", args.max_batch_tokens),
                                 ("num_pages", args.num_pages)) if v is not None}
    engine = dataclasses.replace(EngineConfig(), **limits)
    if args.threshold is not None and not 0.0 < args.threshold <= 1.0:
        raise InvalidRequestError(f"--threshold must be in (0, 1], got {args.threshold}")
    return ClusterConfig.homogeneous(
        args.replicas, cost, engine, args.threshold,
        defaults=RequestDefaults(block_length=args.block_size, cache=args.cache), overhead_s=args.overhead_ms / 1e3,
    )


def build_control(args: argparse.Namespace, acceptance):
    """The cluster (one group per degree of the latency profile, ``--replicas`` of the smallest
    at the start), the acceptance model (the quality profile's, unless given) and the controller."""
    import dataclasses

    from dilaserve.controller.config import ControllerConfig
    from dilaserve.controller.decision import Planning
    from dilaserve.engine.config import EngineConfig
    from dilaserve.planner import load_profile_set
    from dilaserve.sim import AcceptanceModel, ClusterConfig, ReplicaGroup
    from dilaserve.sim.controlled import ControlSetup

    # The simulated replicas do not model sparse KV: the controller plans dense settings only.
    profiles = load_profile_set(None if args.controller == "default" else args.controller).without_sparse()
    degrees = [d.degree for d in profiles.latency.degrees]
    variants = {d: f"tp{d}" for d in degrees}
    engine = EngineConfig()
    groups = tuple(ReplicaGroup(
        variants[d.degree], args.replicas if d.degree == degrees[0] else 0, d.cost,
        dataclasses.replace(engine, max_running=args.max_running or d.max_running,
                            num_pages=args.num_pages or max(1, d.kv_capacity_tokens // engine.page_size)),
        args.threshold) for d in profiles.latency.degrees)
    cluster = dataclasses.replace(build_cluster(args), groups=groups)
    if not args.quality_profile:
        acceptance = AcceptanceModel(tuple((e.threshold, e.tokens_per_step) for e in profiles.quality.settings()))
    gpus = args.max_gpus or args.replicas * degrees[0]
    config = ControllerConfig(gpus=gpus, slo_scale=args.slo_scale, quality_budget=args.quality_budget,
                              tick_s=args.tick_s, window_s=max(args.window_s, args.tick_s), period_s=args.period_s,
                              min_interval_s=args.min_interval_s)
    planning = Planning.for_degrees(profiles, degrees, gpus=gpus, slo_scale=args.slo_scale,
                                    quality_budget=args.quality_budget)
    return cluster, acceptance, ControlSetup(config, planning, variants, startup_s=args.startup_s)


def idle_latency(cluster, acceptance, threshold: float):
    """Deadlines that do not move with the controller's thresholds: the latency of a request
    alone on an idle replica of the first group at ``threshold`` (as ``dilaserve replay`` sends them)."""
    from dilaserve.engine.cost_model import request_work, work_s

    group, defaults = cluster.groups[0], cluster.defaults
    tokens_per_step = acceptance.mean(threshold, defaults.block_length)

    def latency_s(prompt: int, output: int) -> float:
        work = request_work(prompt + output, output, defaults.block_length, tokens_per_step, defaults.cache)
        return work_s(group.cost, work) + cluster.overhead_s

    return latency_s


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from tqdm.auto import tqdm

    from dilaserve.replay.metrics import compute_metrics
    from dilaserve.replay.records import save_records
    from dilaserve.replay.report import metrics_table, write_report
    from dilaserve.serving.config import AdmissionConfig, RoutingConfig, SLOConfig
    from dilaserve.sim import AcceptanceModel, SimPolicies, simulate

    trace = build_trace(args)
    cluster = build_cluster(args)
    acceptance = AcceptanceModel()
    if args.quality_profile:
        acceptance = AcceptanceModel.from_quality_profile(args.quality_profile)
    control = None
    if args.controller:
        cluster, acceptance, control = build_control(args, acceptance)
    system = args.system or f"sim-{args.policy}"
    policies = SimPolicies(
        routing=RoutingConfig(policy=args.policy, seed=args.seed),
        admission=AdmissionConfig(enabled=args.admission == "on"),
        slo=SLOConfig(slo_scale=args.slo_scale, overhead_ms=args.overhead_ms), fidelity=args.fidelity,
        acceptance=acceptance, seed=args.seed, system=system,
    )
    print(f"simulating {len(trace)} requests over {trace.span_s:.1f} s ({trace.mean_rate_rps:.1f} req/s) on "
          f"{cluster.num_replicas} replicas, {args.fidelity} fidelity", file=sys.stderr)
    start, start_cpu = time.perf_counter(), time.process_time()
    bar = tqdm(total=len(trace), unit="req", desc="simulated arrivals", disable=args.no_progress, file=sys.stderr)

    def progress(done: int) -> None:
        bar.update(done - bar.n)

    if control is None:
        records = simulate(trace, cluster, policies, progress=progress)
        bar.close()
    else:
        from dilaserve.sim.controlled import simulate_controlled

        policies = dataclasses.replace(policies, baseline=idle_latency(cluster, acceptance, args.threshold or 0.9))
        controlled = simulate_controlled(trace, cluster, policies, control, progress=progress)
        bar.close()
        records = controlled.records
        for tick in controlled.ticks:
            if tick.actions:
                print(f"t = {tick.time_s:.1f} s, {tick.kind}: {tick.reason}", file=sys.stderr)
        print(f"{controlled.num_reconfigurations} reconfigurations; {controlled.membership[-1].gpus_serving} GPUs "
              f"serving at the end", file=sys.stderr)
    print(f"simulated in {time.perf_counter() - start:.1f} s wall, {time.process_time() - start_cpu:.1f} s CPU",
          file=sys.stderr)
    save_records(records, args.out)
    print(metrics_table([compute_metrics(records, system=system)]))
    if args.report_dir:
        files = write_report(args.report_dir, {system: records}, title=f"Simulation: {trace.name}")
        print(f"report: {files.markdown}", file=sys.stderr)
    return 0
