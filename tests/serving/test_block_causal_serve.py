"""An SDAR (block-causal) model and a LLaDA (bidirectional) model served side by side by one
Serve application: concurrent HTTP requests to both, each equal to its model's reference
generator token for token; SDAR requests that set no block or cache get the model's own."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from dilaserve.generation.reference import GenerationConfig, generate
from dilaserve.models.registry import load_model
from dilaserve.serving.config import parse_config
from serving_helpers import needs_engine, wait_for

pytestmark = needs_engine
PROMPTS = [[17, 4, 99, 23, 5], [8, 8, 1], [120, 3, 44, 61, 2, 9, 30], [5]]


def up_to_eos(ids: list[int], eos: int) -> list[int]:
    return ids[:ids.index(eos)] if eos in ids else ids


@pytest.fixture(scope="module")
def mixed(served, llada_dir, sdar_dir):
    """A second application on the session's Serve instance, under /mixed."""
    from ray import serve

    from dilaserve.serving.app import build_app

    config = parse_config({
        "app_name": "mixed",
        "models": [{"name": "sdar", "path": str(sdar_dir)}, {"name": "llada", "path": str(llada_dir)}],
        "variants": [
            {"name": "sdar-cpu", "model": "sdar", "num_cpus_per_replica": 0.25, "threshold": 0.9,
             "engine": {"kv_memory_gib": 0.05}},
            {"name": "llada-cpu", "model": "llada", "num_cpus_per_replica": 0.25, "threshold": 0.9,
             "engine": {"kv_memory_gib": 0.05}},
        ],
        "http": {"host": "127.0.0.1", "port": int(served.url.rsplit(":", 1)[1]), "ingress_num_cpus": 0.1},
        "defaults": {"max_tokens": 12, "block_length": 8},
    }, "mixed test config")
    serve.run(build_app(config), name=config.app_name, route_prefix="/mixed")
    with httpx.Client(base_url=f"{served.url}/mixed", timeout=120) as client:
        wait_for(lambda: client.get("/v1/models").status_code == 200, 60)
        yield client
    serve.delete(config.app_name)


def test_block_causal_and_bidirectional_models_served_side_by_side(mixed, llada_dir, sdar_dir):
    models = {"sdar": load_model(sdar_dir), "llada": load_model(llada_dir)}
    jobs = [(name, prompt) for prompt in PROMPTS for name in ("sdar", "llada")]

    def ask(job):
        name, prompt = job
        body = {"model": name, "prompt": prompt, "max_tokens": 16, "temperature": 0, "threshold": 0.9}
        if name == "llada":
            body["cache"] = "dual"
        r = mixed.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["dilaserve"]["token_ids"]

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(ask, jobs))
    decoded = {"sdar": 0, "llada": 0}
    for (name, prompt), ids in zip(jobs, answers):
        model = models[name]
        # SDAR set no block or cache: its own block (4) and the exact cache; LLaDA: the server's 8.
        block, cache = (4, "exact") if name == "sdar" else (8, "dual")
        ref = generate(model, prompt, GenerationConfig(gen_length=16, block_length=block, threshold=0.9, cache=cache))
        eos = model.spec.eos_token_id
        assert up_to_eos(ids, eos) == up_to_eos(ref.token_ids, eos), (name, prompt)
        decoded[name] += len(up_to_eos(ids, eos))
    assert min(decoded.values()) >= 8, decoded  # the comparison covers real tokens, not early stops


def test_a_block_size_the_model_cannot_decode_is_a_400(mixed):
    r = mixed.post("/v1/completions", json={"model": "sdar", "prompt": [5, 6], "max_tokens": 8, "block_length": 8})
    assert r.status_code == 400 and "block" in r.json()["error"]["message"]
