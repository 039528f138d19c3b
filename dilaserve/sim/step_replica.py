"""Step fidelity: every replica runs the engine's real step loop, step by step.

A ``StepReplica`` is ``engine.core.EngineCore`` (the torch-free core that ``Engine`` also is)
with ``SimulatedRunner`` as its runner and a simulated clock: the real ``Scheduler``,
``PageAllocator``, chunk controller, ``Request`` state, ``LoadControl``, ``OnlineCostModel``,
``TokensPerStepEstimator`` and prediction methods, not copies of them.

A step is split at the runner call: ``start_step`` plans it at the step's start and draws the
decisions; ``finish_step`` applies them when the step's simulated time has passed, so arrivals
in between wait for the next step, as requests in the engine's inbox do.
"""

from __future__ import annotations

import heapq
import itertools
import statistics
from typing import Callable

import numpy as np

from dilaserve.engine.core import EngineCore
from dilaserve.engine.plan import StepOutput, StepPlan
from dilaserve.engine.request import Request
from dilaserve.engine.sampling_params import SamplingParams
from dilaserve.models.spec import ModelSpec
from dilaserve.sim.acceptance import AcceptanceModel
from dilaserve.sim.config import ClusterConfig, ReplicaGroup, SimPolicies
from dilaserve.sim.ingress import Estimates
from dilaserve.sim.runner import SimulatedRunner
from dilaserve.sim.workload import Workload

MASK_ID = -1  # simulated canvases: prompt positions hold 0, committed ones SimulatedRunner.token_id

# The core needs a model's token facts only to validate requests, which the simulator builds itself.
SIMULATED_SPEC = ModelSpec(
    model_type="simulated", vocab_size=1, hidden_size=1, intermediate_size=1, num_layers=1, num_heads=1,
    num_kv_heads=1, rope_theta=1.0, norm_eps=1e-6, max_positions=1 << 30, mask_token_id=MASK_ID, eos_token_id=-2,
)


class StepReplica(EngineCore):
    def __init__(self, name: str, group: ReplicaGroup, acceptance: AcceptanceModel, seed: int):
        self.now = 0.0
        # Predictions as a profiled replica makes them: the online cost model starts at the profile.
        super().__init__(SIMULATED_SPEC, group.engine, SimulatedRunner(group.cost, acceptance, seed),
                         group.num_pages, clock=self.clock, cost_prior=group.cost)
        self.name = name
        self.group = group
        self.default_threshold = group.default_threshold  # set_threshold changes it, as set_policy does
        # A served replica seeds its tokens-per-step estimates from its model's quality profile
        # (``async_engine``); the simulated one from the acceptance model, which plays that role.
        for threshold, tokens_per_step in acceptance.profile:
            self.tokens_per_step_estimate.seed(threshold, tokens_per_step)
        self._step: tuple[StepPlan, StepOutput] | None = None

    def clock(self) -> float:
        return self.now

    @property
    def is_busy(self) -> bool:
        return self._step is not None

    def start_step(self, now_s: float) -> float | None:
        """Plans a step at ``now_s``; returns when it ends (None: nothing to run)."""
        self.now = now_s
        _, plan = self.begin_step()
        if not plan:
            return None
        result = self.runner.run(plan)
        self._step = (plan, result)
        return now_s + result.elapsed_s

    @property
    def step_output(self) -> StepOutput | None:
        """The running step's decisions (None between steps)."""
        return None if self._step is None else self._step[1]

    def finish_step(self, now_s: float) -> list[Request]:
        """Applies the step's decisions at its end; returns the requests it finished."""
        self.now = now_s
        plan, result = self._step
        self._step = None
        self.end_step(plan, result)
        return [item.request for item in plan.items if item.request.is_finished]


class StepCluster:
    """Step-fidelity replicas and the heap of their step ends."""

    def __init__(self, cluster: ClusterConfig, policies: SimPolicies, workload: Workload,
                 release: Callable[[int], None]):
        self.names = [name for name, _ in cluster.replicas()]
        self.replicas = [StepReplica(name, group, policies.acceptance, seed=policies.seed * 1_000_003 + i)
                         for i, (name, group) in enumerate(cluster.replicas())]
        self.defaults = cluster.defaults
        self.floor = policies.slo.quality_floor
        self.workload = workload
        self.release = release
        self.first_token_s = np.full(len(workload), np.nan)
        self.finish_s = np.full(len(workload), np.nan)
        self.threshold_used = np.full(len(workload), np.nan)  # at the end (load control may lower it)
        self._step_ends: list[tuple[float, int, int]] = []  # (end time, tiebreak, replica)
        self._tiebreak = itertools.count()
        self._replica_of: dict[str, int] = {}

    def _params(self, replica: StepReplica, index: int) -> SamplingParams:
        """The request's params as the replica resolves them (its default threshold, never
        below the request's floor)."""
        threshold = replica.default_threshold
        if self.floor is not None:
            threshold = max(threshold, self.floor)
        return SamplingParams(max_tokens=int(self.workload.output_tokens[index]), block_size=self.defaults.block_length,
                              threshold=threshold, cache=self.defaults.cache, threshold_floor=self.floor)

    def set_threshold(self, replica_index: int, threshold: float) -> None:
        """The replica's default threshold, for the requests it admits from now on."""
        self.replicas[replica_index].default_threshold = threshold

    def estimates(self, now_s: float, index: int) -> Estimates:
        prompt = int(self.workload.prompt_tokens[index])
        finish, solo = [], []
        for replica in self.replicas:
            params = self._params(replica, index)
            finish.append(replica.predict_finish_s(prompt, params))
            solo.append(replica.predict_latency_s(prompt, params))
        return Estimates(np.asarray(finish), np.asarray(solo), statistics.median(solo),
                         [len(r.scheduler.waiting) for r in self.replicas])

    def submit(self, now_s: float, replica_index: int, index: int, deadline_s: float) -> str | None:
        """Adds request ``index`` to a replica; returns an error when the engine would refuse it."""
        replica = self.replicas[replica_index]
        params = self._params(replica, index)
        prompt = int(self.workload.prompt_tokens[index])
        if replica.allocator.pages_for(prompt + params.max_tokens) > replica.allocator.num_pages:
            return f"the request needs {prompt + params.max_tokens} tokens of KV cache; the replica holds fewer"
        if len(replica.scheduler.waiting) >= replica.config.max_waiting:
            return f"the waiting queue is full ({replica.config.max_waiting} requests)"
        request = Request(str(index), [0] * prompt, params, MASK_ID, frozenset(), now_s, deadline_s,
                          threshold=params.threshold)
        replica.scheduler.add(request)
        self._replica_of[request.request_id] = replica_index
        if not replica.is_busy:
            self._begin(replica_index, now_s)
        return None

    def _begin(self, replica_index: int, now_s: float) -> None:
        end = self.replicas[replica_index].start_step(now_s)
        if end is not None:
            heapq.heappush(self._step_ends, (end, next(self._tiebreak), replica_index))

    def advance(self, until_s: float) -> None:
        """Runs every step that ends at or before ``until_s``."""
        while self._step_ends and self._step_ends[0][0] <= until_s:
            now, _, r = heapq.heappop(self._step_ends)
            for request in self.replicas[r].finish_step(now):
                index = int(request.request_id)
                self.first_token_s[index] = request.first_token_s
                self.finish_s[index] = now
                self.threshold_used[index] = request.threshold
                self.release(self._replica_of.pop(request.request_id))
            self._begin(r, now)
