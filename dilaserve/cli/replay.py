"""``dilaserve replay``: replay a trace against an endpoint and report SLO attainment.

The trace pipeline, in this order: load (or synthesize) -> scale lengths -> cap lengths ->
scale the rate -> keep the window ``[--start, --start + --duration)`` of *replay* time (after
rate scaling) -> keep the first ``--max-requests``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path

from dilaserve.cli.args import positive
from dilaserve.errors import InvalidRequestError

log = logging.getLogger(__name__)

FILE_FORMATS = ("auto", "azure", "burstgpt")
SYNTHETIC_FORMATS = ("synthetic-poisson", "synthetic-gamma", "synthetic-onoff")


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("--extra-body takes a JSON object")
    return value


def add_parser(sub) -> None:
    p = sub.add_parser("replay", help="replay a trace against an OpenAI-compatible endpoint and report SLO attainment",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("trace")
    g.add_argument("--trace", help="trace CSV (Azure or BurstGPT); with a synthetic format, lengths are resampled from it")
    g.add_argument("--format", default="auto", choices=FILE_FORMATS + SYNTHETIC_FORMATS)
    g.add_argument("--max-rows", type=positive(int), help="read at most this many data rows of --trace")
    g.add_argument("--burstgpt-model", help="keep only BurstGPT rows of this model (ChatGPT, GPT-4)")
    g.add_argument("--rate", type=positive(float), default=2.0, help="synthetic: mean request rate (req/s; on-rate for on/off)")
    g.add_argument("--cv", type=positive(float), default=3.0, help="synthetic-gamma: coefficient of variation of gaps")
    g.add_argument("--on-s", type=positive(float), default=10.0, help="synthetic-onoff: mean on period (s)")
    g.add_argument("--off-s", type=positive(float), default=20.0, help="synthetic-onoff: mean off period (s)")
    g.add_argument("--off-rate", type=float, default=0.0, help="synthetic-onoff: rate during off periods (req/s)")
    g.add_argument("--prompt-tokens", type=positive(int), default=256, help="synthetic: mean prompt length (tokens)")
    g.add_argument("--output-tokens", type=positive(int), default=64, help="synthetic: mean output length (tokens)")
    g.add_argument("--length-cv", type=float, default=0.5, help="synthetic: CV of log-normal lengths (0: fixed)")
    g.add_argument("--rate-scale", type=positive(float), default=1.0, help="compress inter-arrival times by this factor")
    g.add_argument("--length-scale", type=positive(float), default=1.0, help="multiply prompt and output lengths")
    g.add_argument("--max-prompt-tokens", type=positive(int))
    g.add_argument("--max-output-tokens", type=positive(int))
    g.add_argument("--max-total-tokens", type=positive(int))
    g.add_argument("--cap-mode", default="clip", choices=["clip", "drop"], help="fit over-long requests, or drop them")
    g.add_argument("--start", type=float, default=0.0, help="window start, seconds of replay time")
    g.add_argument("--duration", type=positive(float), help="window length, seconds of replay time")
    g.add_argument("--max-requests", type=positive(int))
    g.add_argument("--seed", type=int, default=0)

    g = p.add_argument_group("endpoint and requests")
    g.add_argument("--endpoint", required=True, help="base URL, e.g. http://127.0.0.1:8000")
    g.add_argument("--model", help="model name to send (default: the first one /v1/models lists)")
    g.add_argument("--api", default="completions", choices=["completions", "chat"])
    g.add_argument("--task", default="arith", help="prompt content: a task name (scored) or 'filler'")
    g.add_argument("--tokenizer", help="tokenizer.json or model directory, to count prompt tokens exactly")
    g.add_argument("--system", default="dilaserve", help="name of the system under test, in records and tables")
    g.add_argument("--max-in-flight", type=positive(int), default=1024)
    g.add_argument("--timeout", type=positive(float), default=600.0, help="per-request timeout (s)")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--extra-body", type=_json_object, default={}, help="JSON object merged into every request body")
    g.add_argument("--no-progress", action="store_true")

    g = p.add_argument_group("SLO")
    g.add_argument("--slo-scale", type=positive(float), default=5.0, help="deadline = S x latency alone on an idle replica")
    g.add_argument("--baseline-base-ms", type=float, help="idle latency: fixed part (ms)")
    g.add_argument("--baseline-prompt-ms", type=float, default=0.0, help="idle latency: ms per prompt token")
    g.add_argument("--baseline-output-ms", type=float, default=0.0, help="idle latency: ms per output token")
    g.add_argument("--calibrate", type=int, default=0, metavar="N",
                   help="measure the idle latency first with N requests sent one at a time")
    g.add_argument("--no-deadline-field", action="store_true", help="do not send deadline_ms to the server")

    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, help="records, one JSON object per request and line")
    g.add_argument("--report-dir", help="write report.md and PNG plots here")
    g.add_argument("--compare", nargs="*", default=[], help="records files of other systems to put in the table")
    p.set_defaults(run=run)


def build_trace(args: argparse.Namespace):
    """The trace to replay, after every transformation the flags ask for."""
    from dilaserve.replay import synthetic as syn
    from dilaserve.replay.loaders import load_trace

    source = None
    if args.trace:
        source, report = load_trace(args.trace, "auto" if args.format in SYNTHETIC_FORMATS else args.format,
                                    model=args.burstgpt_model, max_rows=args.max_rows)
        print(report.summary(), file=sys.stderr)
    if args.format in SYNTHETIC_FORMATS:
        if args.format == "synthetic-poisson":
            arrivals = syn.PoissonArrivals(args.rate)
        elif args.format == "synthetic-gamma":
            arrivals = syn.GammaArrivals(args.rate, args.cv)
        else:
            arrivals = syn.OnOffArrivals(args.rate, args.on_s, args.off_s, args.off_rate)
        if source is not None and len(source):
            lengths = syn.ResampledLengths.from_trace(source)
        elif args.length_cv > 0:
            lengths = syn.IndependentLengths(syn.LogNormalLength(args.prompt_tokens, args.length_cv),
                                             syn.LogNormalLength(args.output_tokens, args.length_cv))
        else:
            lengths = syn.IndependentLengths(syn.FixedLength(args.prompt_tokens), syn.FixedLength(args.output_tokens))
        if args.duration is None and args.max_requests is None:
            raise InvalidRequestError("a synthetic trace needs --duration or --max-requests")
        if args.duration is not None:
            trace = syn.synthesize(arrivals, lengths, duration_s=(args.start + args.duration) * args.rate_scale,
                                   seed=args.seed, name=args.format)
        else:
            trace = syn.synthesize(arrivals, lengths, num_requests=args.max_requests, seed=args.seed, name=args.format)
    elif source is None:
        raise InvalidRequestError(f"--format {args.format} needs --trace FILE")
    else:
        trace = source
    if args.length_scale != 1.0:
        trace = trace.scale_lengths(args.length_scale, args.length_scale)
    if args.max_prompt_tokens or args.max_output_tokens or args.max_total_tokens:
        trace = trace.cap_lengths(max_prompt_tokens=args.max_prompt_tokens, max_output_tokens=args.max_output_tokens,
                                  max_total_tokens=args.max_total_tokens, mode=args.cap_mode)
    trace = trace.scale_rate(args.rate_scale)
    if args.start or args.duration is not None:
        trace = trace.window(args.start, args.duration)
    if args.max_requests is not None:
        trace = trace.head(args.max_requests)
    if not len(trace):
        raise InvalidRequestError("the trace selection holds no request: check --start, --duration and the caps")
    return trace


def _calibration_shapes(trace, num: int) -> list[tuple[int, int]]:
    ordered = sorted(trace, key=lambda r: (r.output_tokens, r.prompt_tokens))
    picks = [ordered[round(i * (len(ordered) - 1) / max(1, num - 1))] for i in range(num)]
    return [(r.prompt_tokens, r.output_tokens) for r in picks]


def _raise_open_file_limit(wanted: int) -> None:
    """Each request in flight holds a socket: lift the soft limit on open files toward the hard one."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, exc)


def run(args: argparse.Namespace) -> int:
    from dilaserve.replay.client import ReplayConfig, calibrate_baseline, check_endpoint, replay
    from dilaserve.replay.metrics import compute_metrics
    from dilaserve.replay.prompts import approx_token_count, make_prompt_builder, tokenizer_counter
    from dilaserve.replay.records import load_records, save_records
    from dilaserve.replay.report import metrics_table, write_report
    from dilaserve.replay.slo import LinearLatency

    trace = build_trace(args)
    _raise_open_file_limit(args.max_in_flight + 256)
    print(f"replaying {len(trace)} requests over {trace.span_s:.1f} s ({trace.mean_rate_rps:.2f} req/s) "
          f"against {args.endpoint}", file=sys.stderr)
    count_tokens = approx_token_count
    if args.tokenizer:
        try:
            count_tokens = tokenizer_counter(args.tokenizer)
        except Exception as exc:  # tokenizers raises plain Exception for unreadable files
            raise InvalidRequestError(f"--tokenizer {args.tokenizer}: {exc}") from None
    try:
        builder = make_prompt_builder(args.task, count_tokens=count_tokens, seed=args.seed)
    except ValueError as exc:
        raise InvalidRequestError(f"--task: {exc}") from None
    config = ReplayConfig(
        endpoint=args.endpoint, model=args.model, api=args.api, system=args.system, slo_scale=args.slo_scale,
        send_deadline=not args.no_deadline_field, max_in_flight=args.max_in_flight, request_timeout_s=args.timeout,
        temperature=args.temperature, extra_body=args.extra_body, show_progress=not args.no_progress, seed=args.seed,
    )
    check_endpoint(config)
    baseline = None
    if args.calibrate > 0:
        baseline = asyncio.run(calibrate_baseline(config, builder, _calibration_shapes(trace, args.calibrate)))
        print(f"calibrated idle latency: {1000 * baseline.base_s:.1f} ms + {1000 * baseline.prompt_token_s:.3f} "
              f"ms/prompt token + {1000 * baseline.output_token_s:.3f} ms/output token", file=sys.stderr)
    elif args.baseline_base_ms is not None:
        baseline = LinearLatency(args.baseline_base_ms / 1000, args.baseline_prompt_ms / 1000,
                                 args.baseline_output_ms / 1000)
    else:
        print("no baseline latency (--baseline-base-ms or --calibrate): no deadlines, SLO met = completed",
              file=sys.stderr)
    records = replay(trace, config, builder, baseline=baseline)
    save_records(records, args.out)
    by_system = {args.system: records}
    for path in args.compare:
        for record in load_records(path):
            name = record.system or Path(path).stem
            if name == args.system:
                name = f"{name} ({Path(path).stem})"
            by_system.setdefault(name, []).append(record)
    print(metrics_table([compute_metrics(rs, system=name) for name, rs in by_system.items()]))
    if args.report_dir:
        files = write_report(args.report_dir, by_system, title=f"Trace replay: {trace.name}")
        print(f"report: {files.markdown}", file=sys.stderr)
    return 0
