"""The engine's core: request intake, the step loop, predictions and statistics (torch-free).

    plan = scheduler.schedule(); out = runner.run(plan); updates = scheduler.update(plan, out)

The runner is anything with ``run(plan) -> StepOutput`` and ``release(request_id)``: the
model runner in a replica (``engine.Engine``), a simulated one in the simulator, so both drive
this same loop. ``begin_step`` / ``end_step`` split a step at the runner call for callers
that advance their own clock (the simulator); ``step`` does all three.

Requests and aborts arrive through a locked inbox (callers may live on another thread, as the
async wrapper's event loop does) and are applied at the start of each step.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from dilaserve.engine.chunk_control import make_chunk_controller
from dilaserve.engine.config import EngineConfig
from dilaserve.engine.cost_model import (
    BlockPace, OnlineCostModel, TokensPerStepEstimator, Work, batch_finish_s, batch_work_s, request_work,
    with_block_steps, work_s,
)
from dilaserve.engine.kv_pages import PageAllocator
from dilaserve.engine.latency_profile import engine_cost_model
from dilaserve.engine.load_control import LoadControl
from dilaserve.engine.memory import StepMemoryModel
from dilaserve.engine.plan import StepOutput, StepPlan
from dilaserve.engine.request import Request
from dilaserve.engine.sampling_params import RequestOutput, SamplingParams
from dilaserve.engine.scheduler import Scheduler
from dilaserve.engine.stats import EngineStats
from dilaserve.errors import InvalidRequestError, QueueFullError
from dilaserve.generation.blocks import block_origin, check_block_causal_settings
from dilaserve.models.spec import ModelSpec

logger = logging.getLogger(__name__)


class Runner(Protocol):
    def run(self, plan: StepPlan) -> StepOutput: ...

    def release(self, request_id: str) -> None: ...


def check_cache_for_model(spec: ModelSpec, params: SamplingParams) -> None:
    """Block-causal models decode their own blocks with cache 'exact' or 'none'; bidirectional
    models have no exact cache. Raises InvalidRequestError."""
    if spec.causal_block_size:
        check_block_causal_settings(spec.causal_block_size, params.block_size, params.cache, params.refresh_interval)
    elif params.cache == "exact":
        raise InvalidRequestError(
            f"cache 'exact' is for block-causal models (SDAR); model {spec.model_type!r} is bidirectional: "
            "use 'none', 'prefix' or 'dual'"
        )
    if params.is_sparse_kv and spec.causal_block_size:
        raise InvalidRequestError(f"kv_retention is for bidirectional models; {spec.model_type!r} is block-causal")


CALIBRATION_STEPS = 32  # own steps the step-cost fit needs before its predictions count as measured
PREDICTION_WINDOW_S = 60.0  # how long a finished request's prediction error counts (prediction_scale)
PREDICTION_MIN_SAMPLES = 16  # finish predictions a prediction scale needs
PREDICTIONS_PER_REQUEST = 8  # finish predictions kept per request to measure their error


class EngineCore:
    def __init__(self, spec: ModelSpec, config: EngineConfig, runner: Runner, num_pages: int,
                 clock=time.monotonic, cost_prior=None, memory: StepMemoryModel | None = None):
        self.config = config
        self.spec = spec
        self.clock = clock
        self.allocator = PageAllocator(num_pages, self.config.page_size)
        self.runner = runner
        self.cost = engine_cost_model(self.config.latency_profile, cost_prior)
        self.tokens_per_step_estimate = TokensPerStepEstimator()
        self.block_pace = BlockPace()
        self.load_control = LoadControl(self.config.threshold_step, clock, self._remaining_steps) \
            if self.config.load_control else None
        self.scheduler = Scheduler(
            self.config, self.allocator,
            make_chunk_controller(self.config.chunk_control, cost=lambda: self.cost.cost, clock=clock,
                                  shift_logits=self.spec.shift_logits, acceptance_profile=self.config.acceptance_profile),
            self.spec.shift_logits, clock, self._remaining_s, step_cost=lambda: self.cost.cost,
            memory=memory or StepMemoryModel.for_spec(spec),
            tokens_per_step=lambda r: self.tokens_per_step(r.params, r.threshold),
        )
        self._inbox: deque[tuple[str, object]] = deque()
        self._lock = threading.Lock()
        self.default_threshold = self.config.default_threshold
        self.max_waiting = self.config.max_waiting
        self._recent_steps: deque[StepRecord] = deque(maxlen=64)
        self._busy_since: float | None = None  # end of the last step, if it left work to do
        # Actual / predicted seconds to finish of recent requests with deadlines (see prediction_scale).
        self._prediction_ratios: deque[tuple[float, float, int]] = deque(maxlen=2048)  # (finish time, ratio, load)
        self.num_finished = 0

    # -- intake -------------------------------------------------------------------------
    def make_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                     deadline_s: float | None = None) -> Request:
        """Validates a request (raising InvalidRequestError) and builds its state."""
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty")
        bad = next((t for t in prompt_ids if not isinstance(t, int) or not 0 <= t < self.spec.vocab_size), None)
        if bad is not None:
            raise InvalidRequestError(f"token id {bad} is outside the vocabulary [0, {self.spec.vocab_size})")
        params.validate()
        check_cache_for_model(self.spec, params)
        seq_len = len(prompt_ids) + params.max_tokens
        if seq_len > self.spec.max_positions:
            raise InvalidRequestError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the model's "
                f"maximum of {self.spec.max_positions} positions"
            )
        # Sparse KV with a scratch region: the prompt (less the position a shifted-logit reuse
        # step reads) lives only in refresh steps' scratch slots, when it fits there.
        lead = 1 if self.spec.shift_logits else 0
        transient = len(prompt_ids) - lead
        kv_offset = transient if params.is_sparse_kv and 0 < transient <= self.config.sparse_scratch_tokens else 0
        threshold = params.threshold if params.threshold is not None else self.default_threshold
        request = Request(
            request_id, list(prompt_ids), params, self.spec.mask_token_id,
            frozenset({self.spec.eos_token_id, *params.stop_token_ids}), self.clock(), deadline_s,
            threshold=threshold, block_origin=block_origin(len(prompt_ids), self.spec.causal_block_size),
            window_lead=lead, kv_offset=kv_offset,
        )
        if self.allocator.pages_for(request.kv_tokens) > self.allocator.num_pages:
            raise InvalidRequestError(
                f"the request needs {request.kv_tokens} tokens of KV cache; this replica holds {self.allocator.num_pages * self.allocator.page_size}"
            )
        if self.num_waiting() >= self.max_waiting:
            raise QueueFullError(f"the waiting queue is full ({self.max_waiting} requests)")
        return request

    def add(self, request: Request) -> None:
        with self._lock:
            self._inbox.append(("add", request))

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._inbox.append(("abort", request_id))

    def _drain_inbox(self) -> list[RequestOutput]:
        with self._lock:
            commands = list(self._inbox)
            self._inbox.clear()
        outputs = []
        for kind, payload in commands:
            if kind == "add":
                if payload.deadline_s is not None and self.is_calibrated:
                    # Judged only once the step-cost fit has data: before that the prior prices
                    # steps, and its error says nothing about the fitted model's.
                    self._predict_on_arrival(payload)
                self.scheduler.add(payload)
            else:
                request = self.scheduler.abort(payload)
                if request is not None:
                    self.runner.release(request.request_id)
                    outputs.append(self._output(request, []))
        return outputs

    def num_waiting(self) -> int:
        return len(self.scheduler.waiting) + sum(1 for kind, _ in list(self._inbox) if kind == "add")

    def has_work(self) -> bool:
        return bool(self._inbox) or self.scheduler.has_work()

    # -- the step -----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs, plan = self.begin_step()
        if plan:
            outputs += self.end_step(plan, self.runner.run(plan))
        return outputs

    def begin_step(self) -> tuple[list[RequestOutput], StepPlan]:
        """Applies the inbox and load control, and plans the step (possibly empty)."""
        outputs = self._drain_inbox()
        if self.load_control is not None and self._recent_steps:
            self.load_control.apply(self.scheduler.running, self._step_s())
        return outputs, self.scheduler.schedule()

    def end_step(self, plan: StepPlan, result: StepOutput) -> list[RequestOutput]:
        """Applies the runner's decisions and learns from the step's cost and yield."""
        self.cost.observe(plan.num_tokens, plan.num_context_tokens, result.elapsed_s)
        blocks = []  # threshold requests' blocks before the step, to see which ended
        for item in plan.items:
            if item.request.params.steps is None and item.request.threshold is not None:
                decision = result.decisions[item.request.request_id]
                self.tokens_per_step_estimate.observe(item.request.threshold, len(decision.positions))
                blocks.append((item.request, item.request.block_idx, item.request.step_in_block))
        updates = self.scheduler.update(plan, result)
        for request, block_idx, step_in_block in blocks:  # blocks that ended: how many steps they took
            if request.block_idx != block_idx or request.finish_reason in ("eos", "length", "stop"):
                self.block_pace.observe(request.threshold, request.params.block_size, step_in_block + 1)
        decided = sum(len(d.positions) for d in result.decisions.values())
        now = self.clock()
        # Wall time beyond the runner's own, counted only when the previous step left work
        # (otherwise the gap is idle time, not overhead).
        overhead = None if self._busy_since is None else max(0.0, now - self._busy_since - result.elapsed_s)
        self._recent_steps.append(StepRecord(
            now, decided, len(plan.items), result.elapsed_s, sum(i.chunk for i in plan.items), overhead
        ))
        outputs = []
        for request, new_tokens in updates:
            if request.is_finished:
                self.runner.release(request.request_id)
                self.num_finished += 1
                if request.finish_reason in ("eos", "length", "stop"):
                    for at, predicted, charged, load in request.predictions:
                        hindsight = predicted + request.charged_s - charged
                        if hindsight > 0:
                            self._prediction_ratios.append((now, (now - at) / hindsight, load))
            outputs.append(self._output(request, new_tokens))
        self._busy_since = self.clock() if self.has_work() else None
        return outputs

    def _output(self, request: Request, new_tokens: list[int]) -> RequestOutput:
        emitted = request.canvas[request.prompt_len: request.prompt_len + request.num_emitted]
        return RequestOutput(
            request.request_id, new_tokens, emitted, request.is_finished, request.finish_reason,
            request.prompt_len, request.counters, threshold=request.threshold,
        )

    # -- statistics and predictions --------------------------------------------------------
    def seed_quality_profile(self, profile: dict) -> int:
        """Seeds tokens decided per step from a quality profile (threshold entries decoded a
        whole block per query); returns how many thresholds were seeded."""
        block_size = int(profile.get("block_size", 0))
        return self.tokens_per_step_estimate.seed_from_profile(profile.get("entries", []), block_size)

    def tokens_per_step(self, params: SamplingParams, threshold: float | None) -> float:
        if params.steps is not None:
            return max(params.block_size / (params.steps // params.num_blocks), 1.0)
        return self.tokens_per_step_estimate.estimate(threshold, params.block_size)

    def _step_s(self) -> float:
        """Mean seconds of the recent steps (the current batch's step time)."""
        return sum(s.seconds for s in self._recent_steps) / len(self._recent_steps)

    def _remaining_steps(self, request: Request, threshold: float) -> float:
        return self._work(request, threshold).steps

    def _new_work(self, prompt_len: int, params: SamplingParams, threshold: float | None) -> Work:
        """The work of a prospective request at ``threshold`` (default: its own, else the engine's)."""
        t = threshold if threshold is not None else (params.threshold or self.default_threshold)
        return request_work(prompt_len + params.max_tokens, params.max_tokens, params.block_size,
                            self.tokens_per_step(params, t), params.cache, params.kv_retention)

    @property
    def is_calibrated(self) -> bool:
        """Whether step costs are priced from measurements: a latency profile's, or this
        engine's own steps (else from its prior)."""
        return self.cost.measured or self.cost.num_observed >= CALIBRATION_STEPS

    def predict_latency_s(self, prompt_len: int, params: SamplingParams, threshold: float | None = None) -> float:
        """Predicted seconds for such a request alone on an idle engine."""
        work = self._new_work(prompt_len, params, threshold)
        return work_s(self.prediction_cost(), work) * self.prediction_scale(load=0)

    def _work(self, request: Request, threshold: float | None = None) -> Work:
        """What is left of ``request`` at ``threshold`` (default: its own); part-way through a
        block, its steps left there as blocks that ran as long went on (``BlockPace``)."""
        params = request.params
        threshold = request.threshold if threshold is None else threshold
        tokens_per_step = self.tokens_per_step(params, threshold)
        work = request_work(request.seq_len, request.num_masked_remaining(), params.block_size, tokens_per_step,
                            params.cache, params.kv_retention)
        if params.steps is not None or threshold is None or request.step_in_block == 0:
            return work
        expected = self.block_pace.remaining(threshold, params.block_size, request.step_in_block)
        if expected is None:
            return work
        counted = max(1, math.ceil(min(params.block_size, request.num_masked_remaining()) / tokens_per_step))
        return with_block_steps(work, counted, expected)

    def _remaining_s(self, request: Request) -> float:
        return work_s(self.cost.cost, self._work(request))

    def backlog_s(self) -> float:
        """Predicted seconds to finish everything admitted and queued, batched together."""
        requests = self._admitted()
        return batch_work_s(self.cost.cost, [self._work(r) for r in requests])

    def predict_finish_s(self, prompt_len: int, params: SamplingParams, threshold: float | None = None,
                         reserve: float = 0.0) -> float:
        """Predicted seconds from now until such a request, added now, would finish; with a
        ``reserve``, as ``prediction_factor`` prices it for a check against ``(1 - reserve)`` x
        the time left."""
        new = self._new_work(prompt_len, params, threshold)
        requests = self._admitted()
        return (batch_work_s(self.prediction_cost(), [self._work(r) for r in requests] + [new])
                * self.prediction_factor(reserve))

    def _load(self) -> int:
        return len(self._admitted())

    def _admitted(self, with_inbox: bool = True) -> list[Request]:
        """Every request the engine holds: running, waiting, and (``with_inbox``) added but
        not yet drained from the inbox (a step in progress leaves them there). Predictions
        must count the last kind too: a request admitted a moment ago will share the batch
        all the same."""
        held = list(self.scheduler.running) + list(self.scheduler.waiting)
        if not with_inbox:
            return held
        with self._lock:
            return held + [payload for kind, payload in self._inbox if kind == "add"]

    def step_overhead_s(self) -> float:
        """Median wall time between recent steps beyond the runner's own time (planning,
        streaming outputs, the caller's event loop, CPU contention): the cost model fits the
        runner's time only, and on a small model the rest can be most of a step."""
        gaps = sorted(s.overhead_s for s in self._recent_steps if s.overhead_s is not None)
        return gaps[len(gaps) // 2] if gaps else 0.0

    def _predict_on_arrival(self, request: Request) -> None:
        """Records finish predictions as ``request`` joins the batch: its own, and those of the
        requests already there (up to ``PREDICTIONS_PER_REQUEST`` each), whose predictions so
        far are charged the delay the newcomer adds to them.

        A prediction's error is then actual seconds to finish / (predicted + the delays charged
        after it): what the cost and work models got wrong, not the newcomers that joined
        later, which admission prices on their own (``predict_min_slack_s``). Measured against
        the prediction at arrival alone, the error grew with the load that followed (4-6x at
        three times capacity), inflated every deadline built from it, and lagged a load step by
        a whole request latency. Predictions made part-way through a request count as much as
        the first: admission relies on them whenever a newcomer asks to join."""
        now = self.clock()
        # Not the inbox: a request still there is charged for when it is drained.
        others = [r for r in self._admitted(with_inbox=False) if not r.is_finished]
        cost = self.prediction_cost()
        works = [self._work(r) for r in others]
        after = batch_finish_s(cost, works + [self._work(request)])
        load = len(others) + 1
        # From its arrival: waiting in the inbox for a step to end is part of what it takes.
        request.predictions.append((request.arrival_s, float(after[-1]), 0.0, load))
        if not others:
            return
        delays = after[:-1] - batch_finish_s(cost, works)
        for other, delay, finish in zip(others, delays, after[:-1]):
            if not other.predictions:  # taken before the cost model had data: not judged
                continue
            other.charged_s += float(delay)
            if len(other.predictions) < PREDICTIONS_PER_REQUEST:
                other.predictions.append((now, float(finish), other.charged_s, load))

    def prediction_scale(self, load: int | None = None) -> float:
        """How much the finish predictions of recent requests fell short, at a load like
        ``load`` (requests admitted or queued; default: now): the 95th percentile of actual /
        predicted seconds to finish (the delays of later newcomers charged to the prediction,
        ``_predict_on_arrival``) over the predictions of requests with deadlines that finished
        in the last ``PREDICTION_WINDOW_S`` seconds, made at between half and twice that load
        (all of them when fewer than ``PREDICTION_MIN_SAMPLES`` were); at least 0.5, at most 8;
        1 with too few samples.

        The cost model prices steps and the work model counts them, but what a batch actually
        does also depends on the scheduler's budgets, how blocks really unmask and the host;
        this closes the loop on the measured error, so admission keeps its promises under
        overload.
        The error grows with load (large batches, a busy host), so it is measured per load:
        the error of a crowded engine does not make an idle one refuse. The window makes it
        forget: a scale that makes admission refuse everything would otherwise never see
        another request finish, and never come down.
        """
        horizon = self.clock() - PREDICTION_WINDOW_S
        recent = [(r, n) for t, r, n in self._prediction_ratios if t >= horizon]
        if len(recent) < PREDICTION_MIN_SAMPLES:
            return 1.0
        load = self._load() if load is None else load
        near = sorted(r for r, n in recent if load // 2 <= n <= max(1, 2 * load))
        ratios = near if len(near) >= PREDICTION_MIN_SAMPLES else sorted(r for r, _ in recent)
        return min(8.0, max(0.5, ratios[int(0.95 * (len(ratios) - 1))]))

    def prediction_factor(self, reserve: float = 0.0, load: int | None = None) -> float:
        """What raw predictions are multiplied by before they are compared with ``(1 -
        reserve)`` x a deadline's time left. The reserve and the measured error
        (``prediction_scale``) both allow for prediction error, so they do not compound: a
        prediction must fit the time left with a margin of the larger of the two, i.e.
        ``raw x max(scale, 1 / (1 - reserve)) <= time left``."""
        scale = self.prediction_scale(load)
        return scale if reserve <= 0 else max(scale * (1.0 - reserve), 1.0)

    def prediction_cost(self):
        """The step cost that admission predictions use: the fitted one plus the step overhead."""
        cost, overhead = self.cost.cost, self.step_overhead_s()
        return dataclasses.replace(cost, fixed_s=cost.fixed_s + overhead) if overhead > 0 else cost

    def predict_min_slack_s(self, prompt_len: int, params: SamplingParams, threshold: float | None = None,
                            reserve: float = 0.0) -> float:
        """The least slack any admitted request would keep if such a request were added now:
        ``(1 - reserve)`` x its seconds to the deadline minus its predicted seconds to finish
        (raw x ``prediction_scale``), among the requests with a deadline whose slack is >= 0
        without it; inf when there are none.

        Admission checks this as well as the newcomer's own finish: otherwise every request
        admitted later slows the earlier ones down, and under overload they all run late.
        Here the reserve and the measured error compound (for the newcomer's own finish they
        do not, ``prediction_factor``): every newcomer pushes the requests already admitted
        towards the edge of what the p95 error allows, and the reserve is the margin beyond
        it for a promise already made. With the larger of the two, 3-4% of admitted requests
        were late at three times capacity; with the product for the newcomer too, a third
        more requests were refused at moderate load (deadlines 3x the idle latency).
        """
        requests = [r for r in self._admitted()
                    if r.deadline_s is not None and not r.is_finished]
        if not requests:
            return float("inf")
        new = self._new_work(prompt_len, params, threshold)
        works = [self._work(r) for r in requests]
        time_left = [r.deadline_s - self.clock() for r in requests]
        cost, scale = self.prediction_cost(), self.prediction_scale()
        before = batch_finish_s(cost, works) * scale
        after = batch_finish_s(cost, works + [new])[:-1] * scale
        usable = [(1.0 - reserve) * left for left in time_left]
        slacks = [u - a for u, b, a in zip(usable, before, after) if u - b >= 0]
        return min(slacks, default=float("inf"))

    def stats(self) -> EngineStats:
        steps = list(self._recent_steps)
        span = steps[-1].time - steps[0].time if len(steps) > 1 else 0.0
        slots = sum(s.num_requests for s in steps)
        return EngineStats(
            num_waiting=self.num_waiting(),
            num_running=len(self.scheduler.running),
            tokens_in_flight=sum(r.num_masked_remaining() for r in self.scheduler.running),
            pages_free=self.allocator.num_free,
            pages_total=self.allocator.num_pages,
            steps_per_s=(len(steps) - 1) / span if span > 0 else 0.0,
            tokens_decided_per_step=sum(s.num_decided for s in steps) / slots if slots else 0.0,
            predicted_backlog_s=self.backlog_s(),
            threshold_default=self.default_threshold,
            num_finished=self.num_finished,
            num_threshold_lowerings=self.load_control.num_lowerings if self.load_control else 0,
            mean_chunk_size=sum(s.chunk_sum for s in steps) / slots if slots else 0.0,
            step_cost=(self.cost.cost.fixed_s, self.cost.cost.per_token_s, self.cost.cost.per_context_s),
            prediction_scale=self.prediction_scale(),
        )


@dataclass(frozen=True)
class StepRecord:
    time: float
    num_decided: int
    num_requests: int
    seconds: float
    chunk_sum: int
    overhead_s: float | None = None  # wall time since the previous step beyond the runner's (None: was idle)
