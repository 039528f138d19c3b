"""Compares DiLaServe's decoding with outputs of the published LLaDA / Fast-dLLM / Dream code.

The published code is not part of this project. Run it yourself on a model directory and write
one JSON line per run (fields: family, variant, prompt_ids, gen_length, block_length, steps,
threshold, temperature, remasking or alg, canvas_ids, nfe); this script then decodes the same
prompts with the reference generator and with the engine (all prompts of a model in one batch)
and reports token-for-token agreement. Only deterministic runs (temperature 0, low-confidence
remasking, no top-k/top-p) are compared.

    python scripts/check_against_published.py --results results.jsonl --model llada=DIR --model dream=DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

from dilaserve.engine.config import EngineConfig
from dilaserve.engine.engine import Engine
from dilaserve.engine.sampling_params import SamplingParams
from dilaserve.generation.reference import GenerationConfig, generate
from dilaserve.models.registry import load_model

CACHE_OF_VARIANT = {
    "llada.generate": "none",
    "fastdllm.generate": "none",
    "fastdllm.generate_with_prefix_cache": "prefix",
    "fastdllm.generate_with_dual_cache": "dual",
    "dream.diffusion_generate": "none",
}


def comparable(run: dict) -> bool:
    return (
        run.get("variant") in CACHE_OF_VARIANT and not run.get("error") and run.get("temperature", 0) == 0
        and run.get("remasking", "low_confidence") == "low_confidence" and not run.get("cfg_scale")
        and run.get("alg", "maskgit_plus") != "origin"
        and not run.get("effective_top_k") and not run.get("effective_top_p")
    )


def settings(run: dict) -> dict:
    algorithm = run.get("alg", "llada") if run["family"] == "dream" else "llada"
    block = run.get("block_length") or run["gen_length"]
    return dict(
        gen_length=run["gen_length"], block_length=block, cache=CACHE_OF_VARIANT[run["variant"]],
        threshold=run.get("threshold"), steps=None if run.get("threshold") is not None else run["steps"],
        algorithm=algorithm,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", required=True)
    parser.add_argument("--model", action="append", required=True, help="family=DIR")
    args = parser.parse_args(argv)
    models = {k: load_model(v) for k, v in (m.split("=", 1) for m in args.model)}
    runs = [json.loads(line) for line in open(args.results)]
    runs = [r for r in runs if r.get("family") in models and comparable(r)]
    tally: Counter = Counter()
    for family, model in models.items():
        mine = [r for r in runs if r["family"] == family]
        engine = Engine(model, EngineConfig(num_pages=4096, page_size=8))
        for i, run in enumerate(mine):
            s = settings(run)
            ref = generate(model, run["prompt_ids"], GenerationConfig(**s))
            same = ref.canvas_ids == run["canvas_ids"]
            tally[(family, run["variant"], "reference", same)] += 1
            if not same:
                print(f"MISMATCH reference {family} {run['variant']} {s}\n  published {run['canvas_ids']}\n  ours      {ref.canvas_ids}")
            params = SamplingParams(max_tokens=s["gen_length"], block_size=s["block_length"], cache=s["cache"],
                                    threshold=s["threshold"], steps=s["steps"], algorithm=s["algorithm"])
            engine.add(engine.make_request(str(i), run["prompt_ids"], params))
        outputs: dict[str, list[int]] = {}
        while engine.has_work():
            for out in engine.step():
                outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
        eos = model.spec.eos_token_id
        for i, run in enumerate(mine):
            published = run["canvas_ids"]
            expected = published[: published.index(eos)] if eos in published else published
            same = outputs[str(i)] == expected
            tally[(family, run["variant"], "engine", same)] += 1
            if not same:
                print(f"MISMATCH engine {family} {run['variant']} {settings(run)}")
    print(f"{'family':8} {'published variant':40} {'ours':10} {'match':>6} {'differ':>6}")
    keys = sorted({k[:3] for k in tally})
    for key in keys:
        print(f"{key[0]:8} {key[1]:40} {key[2]:10} {tally[key + (True,)]:6d} {tally[key + (False,)]:6d}")
    return 1 if any(k[3] is False for k in tally) else 0


if __name__ == "__main__":
    sys.exit(main())
