"""Per-request work from the cost model's ``request_work``, computed for a whole trace."""

from __future__ import annotations

import numpy as np
import pytest

from dilaserve.engine.cost_model import request_work
from dilaserve.replay.trace import Trace, TraceRequest
from dilaserve.sim import Workload
from dilaserve.sim.workload import expected_work_arrays, work_arrays


def random_workload(seed: int = 0, n: int = 300) -> Workload:
    rng = np.random.default_rng(seed)
    prompts, outputs = rng.integers(1, 2000, n), rng.integers(1, 400, n)
    return Workload.from_trace(Trace(tuple(TraceRequest(float(i), int(p), int(o))
                                           for i, (p, o) in enumerate(zip(prompts, outputs)))))


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
@pytest.mark.parametrize("block_size,tokens_per_step", [(32, 3.0), (32, 1.0), (16, 5.5), (8, 8.0)])
def test_work_arrays_equal_request_work_request_by_request(cache, block_size, tokens_per_step):
    workload = random_workload()
    work = work_arrays(workload, block_size, tokens_per_step, cache)
    for i, (seq, out) in enumerate(zip(workload.seq_len.tolist(), workload.output_tokens.tolist())):
        direct = request_work(seq, out, block_size, tokens_per_step, cache)
        assert (work.steps[i], work.tokens[i], work.context_tokens[i]) == pytest.approx(
            (direct.steps, direct.tokens, direct.context_tokens), rel=1e-12)


@pytest.mark.parametrize("tokens_per_step", [1.0, 2.5, 3.0, 4.0, 7.3])
def test_expected_work_takes_block_over_rate_steps_per_full_block(tokens_per_step):
    workload = Workload.from_trace(Trace((TraceRequest(0.0, 100, 96), TraceRequest(1.0, 50, 32))))
    work = expected_work_arrays(workload, 32, tokens_per_step, "dual")
    assert work.steps.tolist() == pytest.approx([3 * 32 / tokens_per_step, 32 / tokens_per_step])
    # Every step after a block's refresh computes the block: tokens follow the steps.
    assert work.tokens[1] == pytest.approx(82 + (32 / tokens_per_step - 1) * 32)
