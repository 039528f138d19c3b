"""``dilaserve plan``: how many instances of each parallelism degree, at which thresholds (dense
or sparse KV), for a load.

Exit status: 0 with a plan (all traffic served, or as much as the GPUs allow), 1 when no
traffic can be served or the solver failed, 2 for bad arguments or unreadable files.
"""

from __future__ import annotations

import argparse
import json

from dilaserve.errors import InvalidRequestError


def _number(kind, minimum: float, inclusive: bool = True):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value < minimum or (not inclusive and value == minimum):
            raise argparse.ArgumentTypeError(f"must be {'>=' if inclusive else '>'} {minimum}, got {text}")
        return value
    return parse


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="choose instances per parallelism degree and threshold for a load (ILP)",
                       description="Solve the planner's integer program and print the plan.")
    p.add_argument("--gpus", type=_number(int, 0), required=True, help="GPUs available")
    p.add_argument("--rate", type=_number(float, 0), required=True, help="arrival rate (requests/s)")
    p.add_argument("--slo-scale", type=_number(float, 0, inclusive=False), default=3.0,
                   help="deadline = this x a request's latency alone at the most accurate threshold on the "
                        "smallest degree (default 3)")
    p.add_argument("--quality-budget", type=_number(float, 0), default=1.0,
                   help="accuracy points the served traffic's mean accuracy may lose against the best (default 1)")
    p.add_argument("--profiles", default=None,
                   help="directory with latency.json and quality.json (default: the shipped illustrative ones)")
    p.add_argument("--latency-profile", default=None, help="latency profile file (replaces the directory's)")
    p.add_argument("--quality-profile", default=None, help="quality profile file (replaces the directory's)")
    p.add_argument("--lengths", default=None,
                   help="request lengths: a trace CSV (Azure, BurstGPT) or JSON samples / summary (docs/planner.md)")
    p.add_argument("--length-statistic", default="mean",
                   help="which length to plan for: mean, work (the mean work of the samples) or pNN, e.g. p90")
    p.add_argument("--prompt-len", type=_number(int, 0), default=None, help="prompt tokens (default 256)")
    p.add_argument("--output-len", type=_number(int, 1), default=None, help="generated tokens (default 256)")
    p.add_argument("--utilization", type=_number(float, 0, inclusive=False), default=0.9,
                   help="share of an instance's SLO capacity a plan may use, <= 1 (default 0.9)")
    p.add_argument("--solver", default="auto", choices=["auto", "cbc", "highs"],
                   help="auto: HiGHS if highspy is installed, else CBC")
    p.add_argument("--time-limit", type=_number(float, 0, inclusive=False), default=10.0,
                   help="seconds per solver call (default 10)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(run=run)


def format_result(result, profiles, workload) -> str:
    """A person's view of a ``PlanResult``: the decision, the instance table, the predictions."""
    lines = [f"plan: {result.status.value}: {result.message}"]
    if profiles.is_illustrative:
        lines.append("note: ILLUSTRATIVE default profiles (not measured); pass --profiles for real numbers")
    lines.append(f"load: {workload.rate_rps:g} req/s, requests of {workload.prompt_tokens} + {workload.output_tokens} "
                 f"tokens ({workload.length_statistic})"
                 + (f", deadline {result.deadline_s:.3g} s" if result.deadline_s is not None else ""))
    plan = result.plan
    if plan is None:
        return "\n".join(lines)
    if plan.groups:
        header = ("degree", "threshold", "sparse KV", "instances", "GPUs", "traffic", "req/s per inst", "batch",
                  "accuracy")
        rows = [(str(g.degree), f"{g.threshold:g}", "dense" if g.kv_retention is None else f"{g.kv_retention:g}",
                 str(g.count), str(g.gpus), f"{100 * g.traffic_share:.1f}%",
                 f"{g.capacity_rps:.2f}", str(g.max_batch), f"{100 * g.accuracy:.1f}%") for g in plan.groups]
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        lines.append("  ".join(h.rjust(w) for h, w in zip(header, widths)))
        lines.extend("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows)
    lines.append(f"predicted: SLO attainment {100 * plan.served_share:.1f}%, accuracy {100 * plan.accuracy:.1f}% "
                 f"(best {100 * plan.best_accuracy:.1f}%, floor {100 * plan.min_accuracy:.1f}%), "
                 f"GPUs {plan.gpus_used}/{plan.gpus_available}, solved in {1000 * plan.solve_time_s:.0f} ms by {plan.solver}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from dilaserve.planner import PlannerOptions, PlanStatus, Workload, load_profile_set, load_workload, plan

    if args.lengths and (args.prompt_len is not None or args.output_len is not None):
        raise InvalidRequestError("give either --lengths or --prompt-len/--output-len, not both")
    profiles = load_profile_set(args.profiles, latency=args.latency_profile, quality=args.quality_profile)
    if args.lengths:
        workload = load_workload(args.lengths, args.rate, args.length_statistic)
    else:
        workload = Workload(args.rate, 256 if args.prompt_len is None else args.prompt_len,
                            256 if args.output_len is None else args.output_len, "fixed")
    options = PlannerOptions(solver=args.solver, time_limit_s=args.time_limit, utilization=args.utilization)
    result = plan(profiles, workload, args.gpus, args.slo_scale, args.quality_budget, options)
    if result.status is PlanStatus.INVALID:
        raise InvalidRequestError(result.message)
    if args.json:
        record = result.to_dict()
        record["inputs"] = {"gpus": args.gpus, "rate_rps": args.rate, "slo_scale": args.slo_scale,
                            "quality_budget": args.quality_budget, "prompt_tokens": workload.prompt_tokens,
                            "output_tokens": workload.output_tokens, "length_statistic": workload.length_statistic,
                            "profiles": profiles.source, "profiles_illustrative": profiles.is_illustrative}
        print(json.dumps(record, indent=2))
    else:
        print(format_result(result, profiles, workload))
    return 0 if result.has_plan else 1
