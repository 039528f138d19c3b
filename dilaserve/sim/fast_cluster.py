"""Fast fidelity: events only at arrivals and departures, for clusters of hundreds of replicas.

The approximation. A replica's running requests advance in lockstep: every step, each of them
takes one step, and a step lasts ``cost.step_s(tokens, context)`` (the cost model's step time)
for the running set's composition, each request contributing its *average* token-forwards per
step (refresh and reuse steps blended) and its sequence length of keys read. A request needs
its expected number of steps (``workload.expected_work_arrays``: ``block / tokens per step``
per full block, tokens per step from the acceptance model at its threshold), so between two
events a replica's step count is linear in time and the next departure is computed, not
stepped to: ``t0 + (earliest finish step - current step) x step time``. Arrivals join the
running set at the next step boundary, in the scheduler's waiting order (least slack first:
deadline minus predicted solo time), while the scheduler's limits allow: ``max_running``, KV
pages (all of a request's pages at admission, as ``PageAllocator`` is used), and
``max_batch_tokens`` (the running set's average step tokens plus the newcomer's first, full
refresh). A newcomer's first token comes at the end of the step it joins, a step that refreshes
the newcomers' whole sequences.

Not modelled here (step fidelity models them): the token budget skipping some running requests
in some steps, the ``max_refresh_tokens`` cap, chunk control, load control (threshold
lowering), and the spread of steps per request (each takes its expectation).

A replica's threshold can change while it runs (``set_threshold``, as ``set_policy`` does on
a served replica): requests it admits from then on take the new threshold's work, those it
holds keep theirs.

Predictions are the engine's (``Engine.predict_finish_s`` once its tokens-per-step estimate has
converged): ``batch_work_s`` over every running and waiting request's remaining
``request_work`` plus the newcomer's. A running request's predicted remaining tokens and keys
fall linearly as it steps, and its remaining steps in proportion, so each replica's prediction
is kept as lines in time and evaluated for all replicas at once with numpy (the steps term
follows the request that finishes last). ``tests/sim/test_fast_cluster.py`` checks it against
``batch_work_s`` over the requests' own ``request_work``.
"""

from __future__ import annotations

import heapq
import math
from typing import Callable

import numpy as np

from dilaserve.engine.cost_model import StepCost, work_s
from dilaserve.sim.config import ClusterConfig, SimPolicies
from dilaserve.sim.ingress import Estimates
from dilaserve.sim.workload import Workload, expected_work_arrays, work_arrays

WAITING, RUNNING, DONE = 1, 2, 3
EPS = 1e-9


class _Replica:
    """One replica's lockstep state. Its step count is ``s0`` at time ``t0`` and grows by
    ``rate`` steps per second (0 while idle); ``s0`` is always a step boundary."""

    __slots__ = (
        "index", "cost", "max_running", "max_waiting", "max_batch_tokens", "num_pages", "page_size",
        "s0", "t0", "rate", "version", "running", "last_to_finish", "waiting", "longest_waiting",
        "num_running", "num_waiting", "pages_used", "step_tokens", "step_context",
        "tokens_rate", "tokens_due", "context_rate", "context_due", "waiting_tokens", "waiting_context",
        "join_boundary", "join_refresh", "joined",
    )

    def __init__(self, index: int, group) -> None:
        self.index = index
        self.cost: StepCost = group.cost
        engine = group.engine
        self.max_running, self.max_waiting = engine.max_running, engine.max_waiting
        self.max_batch_tokens, self.page_size = engine.max_batch_tokens, engine.page_size
        self.num_pages = group.num_pages
        self.s0 = self.t0 = self.rate = 0.0
        self.version = 0  # bumped whenever the next departure moves; older events are stale
        # Heaps. running: (finish step, request, step tokens, seq len, pages, predicted tokens
        # per step, predicted keys per step); last_to_finish: (-finish step, request, predicted
        # steps per step) and longest_waiting: (-predicted steps, request), both cleaned lazily;
        # waiting: (urgency, arrival, request, the running entry's fields but the finish).
        self.running: list[tuple] = []
        self.last_to_finish: list[tuple[float, int, float]] = []
        self.waiting: list[tuple] = []
        self.longest_waiting: list[tuple[float, int]] = []
        self.num_running = self.num_waiting = self.pages_used = 0
        self.step_tokens = self.step_context = 0.0  # what one step computes and reads
        # Predicted remaining work of the running set at step s: ``due - rate x s``.
        self.tokens_rate = self.tokens_due = self.context_rate = self.context_due = 0.0
        self.waiting_tokens = self.waiting_context = 0.0  # predicted whole work of the waiting
        # The step boundary requests last joined at, the extra tokens of their first (refresh)
        # step, and who they are: later joiners at the same boundary share that step.
        self.join_boundary = -1.0
        self.join_refresh = 0.0
        self.joined: list[int] = []


class FastCluster:
    def __init__(self, cluster: ClusterConfig, policies: SimPolicies, workload: Workload,
                 release: Callable[[int], None]):
        replicas = cluster.replicas()
        self.names = [name for name, _ in replicas]
        self.release = release
        self._groups = [g for g in cluster.groups if g.count > 0]
        self._replicas = [_Replica(i, g) for i, (_, g) in enumerate(replicas)]
        self._group_index = [self._groups.index(g) for _, g in replicas]
        self._workload, self._policies, self._defaults = workload, policies, cluster.defaults
        # Per work class, a (group, threshold) pair (the group sets the cost, the threshold tokens
        # per step): every request's predicted work (request_work, as the engine predicts), the
        # work it actually takes, and the threshold.
        self.steps, self.tokens, self.context, self.solo_s = [], [], [], []
        self.actual_steps, self.actual_tokens, self.class_threshold = [], [], []
        self._classes: dict[tuple[int, float], int] = {}
        self.group_of = np.array([self._work_class(self._group_index[i], g.default_threshold)
                                  for i, (_, g) in enumerate(replicas)])
        self._is_single_group = len(self.steps) == 1
        self.seq_len = workload.seq_len
        self.threshold_used = np.full(len(workload), np.nan)  # the threshold each request ran at
        costs = [g.cost for _, g in replicas]
        self._fixed_s = self._per_replica([c.fixed_s for c in costs])
        self._per_token_s = self._per_replica([c.per_token_s for c in costs])
        self._per_context_s = self._per_replica([c.per_context_s for c in costs])
        # Each replica's prediction as lines in time (see _sync).
        n = len(replicas)
        self._steps_at0, self._steps_rate, self._longest_waiting = np.zeros(n), np.zeros(n), np.zeros(n)
        self._cost_at0, self._cost_rate = np.zeros(n), np.zeros(n)
        self.num_waiting = [0] * n
        self.phase = bytearray(len(workload))
        self.first_token_s = np.full(len(workload), np.nan)
        self.finish_s = np.full(len(workload), np.nan)
        self._departures: list[tuple[float, int, int]] = []  # heap of (time, version, replica)

    def _work_class(self, group: int, threshold: float) -> int:
        """The index of the work arrays of ``group`` at ``threshold`` (never below the SLO's
        quality floor), computed the first time they are needed."""
        floor = self._policies.slo.quality_floor
        threshold = threshold if floor is None else max(threshold, floor)
        key = (group, threshold)
        if key not in self._classes:
            block, cache = self._defaults.block_length, self._defaults.cache
            tokens_per_step = self._policies.acceptance.mean(threshold, block)
            predicted = work_arrays(self._workload, block, tokens_per_step, cache)
            actual = expected_work_arrays(self._workload, block, tokens_per_step, cache)
            self.steps.append(predicted.steps)
            self.tokens.append(predicted.tokens)
            self.context.append(predicted.context_tokens)
            self.solo_s.append(work_s(self._groups[group].cost, predicted))
            self.actual_steps.append(actual.steps)
            self.actual_tokens.append(actual.tokens)
            self.class_threshold.append(threshold)
            self._classes[key] = len(self.steps) - 1
        return self._classes[key]

    def set_threshold(self, replica_index: int, threshold: float) -> None:
        """The replica's default threshold, for the requests it admits from now on."""
        self.group_of[replica_index] = self._work_class(self._group_index[replica_index], threshold)
        self._is_single_group = len(self.steps) == 1

    @staticmethod
    def _per_replica(values: list[float]) -> float | np.ndarray:
        return values[0] if len(set(values)) == 1 else np.asarray(values)

    # -- predictions ---------------------------------------------------------------------------
    def estimates(self, now_s: float, index: int) -> Estimates:
        """Every replica's ``batch_work_s`` over its running and waiting requests' remaining
        work plus request ``index``'s, at ``now_s``: ``fixed x max(steps) + linear terms``."""
        if self._is_single_group:
            steps, solo = self.steps[0].item(index), self.solo_s[0].item(index)
            new_linear = (self._per_token_s * self.tokens[0].item(index)
                          + self._per_context_s * self.context[0].item(index))
            solo_s, median_solo = np.full(len(self.names), solo), solo
        else:
            pick = self.group_of
            steps = np.array([a.item(index) for a in self.steps])[pick]
            new_linear = (self._per_token_s * np.array([a.item(index) for a in self.tokens])[pick]
                          + self._per_context_s * np.array([a.item(index) for a in self.context])[pick])
            solo_s = np.array([a.item(index) for a in self.solo_s])[pick]
            median_solo = float(np.median(solo_s))
        last_running = self._steps_at0 - self._steps_rate * now_s
        remaining_steps = np.maximum(np.maximum(last_running, self._longest_waiting), steps)
        finish_s = self._fixed_s * remaining_steps + (self._cost_at0 - self._cost_rate * now_s + new_linear)
        return Estimates(finish_s, solo_s, median_solo, self.num_waiting)

    # -- arrivals ----------------------------------------------------------------------------------
    def submit(self, now_s: float, replica_index: int, index: int, deadline_s: float) -> str | None:
        """Queues request ``index`` on a replica (joining at its next step boundary if it fits);
        returns an error when the engine would refuse it."""
        rep = self._replicas[replica_index]
        seq = int(self.seq_len[index])
        pages = -(-seq // rep.page_size)
        if pages > rep.num_pages:
            return f"the request needs {seq} tokens of KV cache; the replica holds {rep.num_pages * rep.page_size}"
        if rep.num_waiting >= rep.max_waiting:
            return f"the waiting queue is full ({rep.max_waiting} requests)"
        g = 0 if self._is_single_group else self.group_of[replica_index]
        self.threshold_used[index] = self.class_threshold[g]
        steps = self.actual_steps[g].item(index)
        predicted_steps = self.steps[g].item(index)
        predicted_tokens, predicted_context = self.tokens[g].item(index), self.context[g].item(index)
        # The scheduler's urgency (deadline - now - predicted remaining) orders waiting requests
        # alike at any common "now"; a waiting request's remaining time is its solo time.
        urgency = deadline_s - self.solo_s[g].item(index)
        step_tokens = self.actual_tokens[g].item(index) / steps
        heapq.heappush(rep.waiting, (urgency, now_s, index, steps, step_tokens, seq, pages, predicted_tokens / steps,
                                     predicted_context / steps, predicted_steps / steps))
        heapq.heappush(rep.longest_waiting, (-predicted_steps, index))
        self.phase[index] = WAITING
        rep.num_waiting += 1
        self.num_waiting[replica_index] = rep.num_waiting
        rep.waiting_tokens += predicted_tokens
        rep.waiting_context += predicted_context
        if self._admit(rep, now_s):
            self._retime(rep)
        else:
            self._sync(rep)
        return None

    def _admit(self, rep: _Replica, now_s: float) -> bool:
        """Moves waiting requests into the running set at the next step boundary while the
        scheduler's limits allow, most urgent first, stopping at the first that does not fit."""
        if not rep.waiting:
            return False
        if rep.num_running == 0:
            boundary, boundary_s = rep.s0, now_s
        else:
            boundary = rep.s0 + math.ceil((now_s - rep.t0) * rep.rate - EPS)
            if rep.running[0][0] < boundary - EPS:
                # A running request finishes (at a fractional step) before that boundary: its
                # departure comes first and admits from the waiting queue then. Joining here
                # would move the step origin past its finish and date its departure before now.
                return False
            boundary_s = rep.t0 + (boundary - rep.s0) / rep.rate
        if boundary != rep.join_boundary:
            rep.join_boundary, rep.join_refresh, rep.joined = boundary, 0.0, []
        joined = rep.joined
        num_joined = len(joined)
        while rep.waiting:
            _, _, index, steps, step_tokens, seq, pages, tokens_rate, context_rate, steps_ratio = rep.waiting[0]
            if rep.num_running >= rep.max_running or rep.pages_used + pages > rep.num_pages:
                break
            if rep.num_running and rep.step_tokens + seq > rep.max_batch_tokens:
                break
            heapq.heappop(rep.waiting)
            rep.num_waiting -= 1
            rep.waiting_tokens -= tokens_rate * steps
            rep.waiting_context -= context_rate * steps
            finish = boundary + steps
            heapq.heappush(rep.running, (finish, index, step_tokens, seq, pages, tokens_rate, context_rate))
            heapq.heappush(rep.last_to_finish, (-finish, index, steps_ratio))
            self.phase[index] = RUNNING
            rep.num_running += 1
            rep.pages_used += pages
            rep.step_tokens += step_tokens
            rep.step_context += seq
            rep.tokens_rate += tokens_rate
            rep.tokens_due += tokens_rate * finish
            rep.context_rate += context_rate
            rep.context_due += context_rate * finish
            rep.join_refresh += seq - step_tokens  # a newcomer's first step refreshes its whole sequence
            joined.append(index)
        if len(joined) == num_joined:
            return False
        if not rep.waiting:  # keep the waiting sums exact when the queue empties
            rep.waiting_tokens = rep.waiting_context = 0.0
        self.num_waiting[rep.index] = rep.num_waiting
        rep.s0, rep.t0 = boundary, boundary_s
        first_token_s = boundary_s + rep.cost.step_s(rep.step_tokens + rep.join_refresh, rep.step_context)
        self.first_token_s[joined] = first_token_s
        return True

    # -- departures --------------------------------------------------------------------------------
    def _retime(self, rep: _Replica) -> None:
        """After the running set changed: new step time, and the next departure event."""
        rep.version += 1
        if rep.num_running:
            step_s = rep.cost.step_s(rep.step_tokens, rep.step_context)
            rep.rate = 1.0 / step_s
            heapq.heappush(self._departures, (rep.t0 + (rep.running[0][0] - rep.s0) * step_s, rep.version, rep.index))
        else:
            rep.rate = 0.0
        self._sync(rep)

    def advance(self, until_s: float) -> None:
        """Processes every departure at or before ``until_s``."""
        departures, replicas = self._departures, self._replicas
        while departures and departures[0][0] <= until_s:
            now_s, version, r = heapq.heappop(departures)
            rep = replicas[r]
            if version == rep.version:
                self._depart(rep, now_s)

    def _depart(self, rep: _Replica, now_s: float) -> None:
        boundary = rep.running[0][0]
        rep.s0, rep.t0 = boundary, now_s
        phase, release, finish_s, r = self.phase, self.release, self.finish_s, rep.index
        while rep.running and rep.running[0][0] <= boundary + EPS:
            finish, index, step_tokens, seq, pages, tokens_rate, context_rate = heapq.heappop(rep.running)
            finish_s[index] = now_s
            phase[index] = DONE
            rep.num_running -= 1
            rep.pages_used -= pages
            rep.step_tokens -= step_tokens
            rep.step_context -= seq
            rep.tokens_rate -= tokens_rate
            rep.tokens_due -= tokens_rate * finish
            rep.context_rate -= context_rate
            rep.context_due -= context_rate * finish
            release(r)
        if not rep.num_running:  # idle: restart the step count, dropping rounding residue
            rep.s0, rep.join_boundary = 0.0, -1.0
            rep.step_tokens = rep.step_context = 0.0
            rep.tokens_rate = rep.tokens_due = rep.context_rate = rep.context_due = 0.0
        self._admit(rep, now_s)
        self._retime(rep)

    def _sync(self, rep: _Replica) -> None:
        """Refreshes the replica's prediction lines. With ``step(t) = origin + rate x t``: the
        request finishing last has ``ratio x (finish - step(t))`` predicted steps left; the
        linear part of ``work_s`` over the running set's predicted remaining tokens and keys
        (``due - rate' x step(t)`` each) and the waiting requests' whole work is
        ``at0 - rate'' x t``."""
        phase = self.phase
        last, longest = rep.last_to_finish, rep.longest_waiting
        while last and phase[last[0][1]] != RUNNING:
            heapq.heappop(last)
        while longest and phase[longest[0][1]] != WAITING:
            heapq.heappop(longest)
        cost, r, rate = rep.cost, rep.index, rep.rate
        origin = rep.s0 - rate * rep.t0
        if last:
            negative_finish, _, ratio = last[0]
            self._steps_at0[r] = ratio * (-negative_finish - origin)
            self._steps_rate[r] = ratio * rate
        else:
            self._steps_at0[r] = self._steps_rate[r] = 0.0
        self._longest_waiting[r] = -longest[0][0] if longest else 0.0
        per_step = cost.per_token_s * rep.tokens_rate + cost.per_context_s * rep.context_rate
        due = (cost.per_token_s * (rep.tokens_due + rep.waiting_tokens)
               + cost.per_context_s * (rep.context_due + rep.waiting_context))
        self._cost_at0[r] = due - per_step * origin
        self._cost_rate[r] = per_step * rate
