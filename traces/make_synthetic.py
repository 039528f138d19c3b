"""Write the synthetic sample traces of this folder (deterministic: same seed, same file).

    .venv/bin/python traces/make_synthetic.py            # rewrites traces/sample_bursty.csv

``sample_bursty.csv``: about 300 requests over two minutes in the Azure 2023 column format
(``TIMESTAMP,ContextTokens,GeneratedTokens``, seven fractional digits). Arrivals alternate
bursts (5 req/s, mean 8 s) with quiet spells (0.75 req/s, mean 12 s), exponential period
lengths, Poisson within each, so the mean rate is about 2.5 req/s and the peak twice that.
Lengths are log-normal, sized for the small embedded model: prompts mean 96 tokens (CV 0.6,
at most 384), outputs mean 48 tokens (CV 0.5, at most 128).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dilaserve.replay.loaders import write_azure_csv
from dilaserve.replay.synthetic import IndependentLengths, LogNormalLength, OnOffArrivals, interarrival_cv, synthesize

HERE = Path(__file__).resolve().parent


def make_sample_bursty(seed: int = 7, duration_s: float = 120.0):
    arrivals = OnOffArrivals(on_rate_rps=5.0, mean_on_s=8.0, mean_off_s=12.0, off_rate_rps=0.75)
    lengths = IndependentLengths(LogNormalLength(96, 0.6, min_tokens=8, max_tokens=384),
                                 LogNormalLength(48, 0.5, min_tokens=4, max_tokens=128))
    return synthesize(arrivals, lengths, duration_s=duration_s, seed=seed, name="sample_bursty")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE / "sample_bursty.csv")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--duration", type=float, default=120.0, help="seconds")
    args = parser.parse_args(argv)
    trace = make_sample_bursty(args.seed, args.duration)
    write_azure_csv(trace, args.out)
    print(f"{args.out}: {len(trace)} requests over {trace.span_s:.1f} s, mean {trace.mean_rate_rps:.2f} req/s, "
          f"inter-arrival CV {interarrival_cv([r.arrival_s for r in trace]):.2f}")


if __name__ == "__main__":
    main()
