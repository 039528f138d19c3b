"""The engine with the adaptive chunk controller, the auto refresh bound and a memory budget."""

from dilaserve.engine.cost_model import StepCost
from dilaserve.engine.latency_profile import profile_dict, save_profile
from dilaserve.engine.sampling_params import SamplingParams
from dilaserve.planner.profiles import DEFAULT_PROFILES_DIR

from tests.engine.helpers import make_prompts, new_engine, run_to_completion
from tests.engine.test_latency_profile import synthetic_points


def test_adaptive_engine_decodes_every_request_within_bounds(llada, tmp_path):
    profile = save_profile(profile_dict(synthetic_points(StepCost(5e-3, 2e-5, 1e-7)), {"model": "fake"}),
                           tmp_path / "latency.json")
    engine = new_engine(llada, chunk_control="adaptive", latency_profile=str(profile), refresh_bound="auto",
                        step_memory_gib=0.01,
                        acceptance_profile=str(DEFAULT_PROFILES_DIR / "acceptance_dilaserve-tiny-arith.json"))
    chunks = []
    observe = engine.scheduler.chunk_control.observe

    def spy(request, chunk, num_decided):
        chunks.append((request.params.chunk_bounds, chunk))
        observe(request, chunk, num_decided)

    engine.scheduler.chunk_control.observe = spy
    params = [SamplingParams(max_tokens=24, block_size=8, threshold=0.9, min_chunk=2, max_chunk=8),
              SamplingParams(max_tokens=16, block_size=8, threshold=0.7)]
    requests = [(f"r{i}", p, params[i % 2]) for i, p in enumerate(make_prompts(6, seed=4))]
    done = run_to_completion(engine, requests)
    assert len(done) == 6
    for rid, prompt, p in requests:
        tokens, reason, counters = done[rid]
        assert reason in ("length", "eos") and counters.num_tokens_decided >= len(tokens)
    assert chunks and all(lo <= c <= hi for (lo, hi), c in chunks)


def test_an_engine_priced_by_a_latency_profile_serves_requests_with_deadlines(llada, tmp_path):
    # A serving config may name a latency profile (engine settings); every request it serves
    # has a deadline. The engine used to fail its first such request (AttributeError on the
    # profiled cost model's calibration count).
    profile = save_profile(profile_dict(synthetic_points(StepCost(5e-3, 2e-5, 1e-7)), {"model": "fake"}),
                           tmp_path / "latency.json")
    engine = new_engine(llada, chunk_control="adaptive", latency_profile=str(profile), refresh_bound="auto")
    assert engine.is_calibrated  # measured costs price requests from the first step
    params = SamplingParams(max_tokens=16, block_size=8, threshold=0.9)
    prompts = make_prompts(4, seed=5)
    for i, prompt in enumerate(prompts):
        engine.add(engine.make_request(f"d{i}", prompt, params, deadline_s=engine.clock() + 60.0))
    finished = {}
    for _ in range(1000):
        if not engine.has_work():
            break
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.finish_reason
    assert sorted(finished) == [f"d{i}" for i in range(4)]
    assert set(finished.values()) <= {"length", "eos"}
