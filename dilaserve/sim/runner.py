"""The simulated model runner: the ``ModelRunner`` interface with no model behind it.

``run(plan)`` returns the same ``StepOutput`` the real runner does. Each scheduled request
commits the first ``k`` of its query positions, ``k`` drawn from the acceptance model at the
request's current threshold (capped by the queried positions: the block's still-masked ones,
or fewer under a chunk) (so streaming, block advance and finishing go through the real
``Request`` and ``Scheduler`` code); a fixed-steps request (``params.steps``) commits what
LLaDA's schedule sets for its step of the block, as the engine does. The step takes
``cost.step_s(tokens, context)`` seconds.
"""

from __future__ import annotations

import numpy as np

from dilaserve.engine.cost_model import StepCost
from dilaserve.engine.plan import Decision, StepOutput, StepPlan
from dilaserve.sim.acceptance import AcceptanceModel


class SimulatedRunner:
    def __init__(self, cost: StepCost, acceptance: AcceptanceModel, seed: int = 0, token_id: int = 0):
        self.cost = cost
        self.acceptance = acceptance
        self.rng = np.random.default_rng(seed)
        self.token_id = token_id  # what committed positions hold: any id that is not a stop id

    def run(self, plan: StepPlan) -> StepOutput:
        decisions = {}
        for item in plan.items:
            request = item.request
            if request.params.steps is not None:  # LLaDA's schedule: the count is set, not drawn
                k = request.scheduled_commits(len(item.query_positions))
            else:
                lam = self.acceptance.draw_parameter(request.threshold, request.params.block_size)
                k = self.acceptance.draw(self.rng, lam, len(item.query_positions))
            decisions[request.request_id] = Decision(item.query_positions[:k], (self.token_id,) * k)
        return StepOutput(decisions, self.cost.step_s(plan.num_tokens, plan.num_context_tokens))

    def release(self, request_id: str) -> None:
        pass
