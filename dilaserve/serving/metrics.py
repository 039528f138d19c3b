"""Prometheus metrics through Ray's metrics API (exported by every node's metrics agent with
the ``ray_`` prefix; Serve adds application / deployment / replica tags).

The ingress records per-request metrics; each replica reports its engine's load as gauges.
"""

from __future__ import annotations

from ray.serve.metrics import Counter, Gauge, Histogram

from dilaserve.engine.stats import EngineStats

_LATENCY_BOUNDS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120]
_TPOT_BOUNDS_S = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1]
_THRESHOLD_BOUNDS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99, 1.0]
_TOKENS_PER_STEP_BOUNDS = [1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64]


class IngressMetrics:
    def __init__(self) -> None:
        self.requests = Counter("dilaserve_requests_total", "HTTP requests by endpoint and status code",
                                tag_keys=("endpoint", "status"))
        self.admission = Counter("dilaserve_admission_total", "admission decisions (admitted, refused, best_effort)",
                                 tag_keys=("model", "decision"))
        self.slo = Counter("dilaserve_slo_total", "finished requests that met or missed their deadline",
                           tag_keys=("model", "outcome"))
        self.ttft = Histogram("dilaserve_ttft_seconds", "time to first streamed token (s)",
                              boundaries=_LATENCY_BOUNDS_S, tag_keys=("model",))
        self.tpot = Histogram("dilaserve_tpot_seconds", "mean time per output token after the first (s)",
                              boundaries=_TPOT_BOUNDS_S, tag_keys=("model",))
        self.e2e = Histogram("dilaserve_e2e_latency_seconds", "arrival to last token (s)",
                             boundaries=_LATENCY_BOUNDS_S, tag_keys=("model",))
        self.threshold = Histogram("dilaserve_request_threshold", "confidence threshold requests ran at",
                                   boundaries=_THRESHOLD_BOUNDS, tag_keys=("model",))
        self.tokens_per_step = Histogram("dilaserve_request_tokens_per_step", "tokens decided per step, per request",
                                         boundaries=_TOKENS_PER_STEP_BOUNDS, tag_keys=("model",))
        self.generated_tokens = Counter("dilaserve_generated_tokens_total", "completion tokens", tag_keys=("model",))
        self.prompt_tokens = Counter("dilaserve_prompt_tokens_total", "prompt tokens", tag_keys=("model",))


class ReplicaMetrics:
    def __init__(self, model: str, variant: str) -> None:
        tags = ("model", "variant")
        self._tags = {"model": model, "variant": variant}
        self.threshold = Gauge("dilaserve_replica_threshold", "default confidence threshold of a replica",
                               tag_keys=tags)
        self.queue = Gauge("dilaserve_replica_queue_length", "requests waiting or running on a replica",
                           tag_keys=(*tags, "state"))
        self.chunk_size = Gauge("dilaserve_replica_chunk_size", "mean positions queried per request and step",
                                tag_keys=tags)
        self.tokens_per_step = Gauge("dilaserve_replica_tokens_decided_per_step", "recent tokens decided per step",
                                     tag_keys=tags)
        self.backlog = Gauge("dilaserve_replica_predicted_backlog_seconds", "predicted seconds to finish queued work",
                             tag_keys=tags)
        self.pages_free = Gauge("dilaserve_replica_kv_pages_free", "free KV cache pages", tag_keys=tags)
        self.prediction_scale = Gauge("dilaserve_replica_prediction_scale",
                                      "factor admission applies to its finish predictions (measured error)",
                                      tag_keys=tags)

    def report(self, stats: EngineStats, default_threshold: float | None) -> None:
        tags = self._tags
        if default_threshold is not None:
            self.threshold.set(default_threshold, tags)
        self.queue.set(stats.num_waiting, {**tags, "state": "waiting"})
        self.queue.set(stats.num_running, {**tags, "state": "running"})
        chunk = getattr(stats, "mean_chunk_size", None)  # reported once the engine provides it
        if chunk is not None:
            self.chunk_size.set(chunk, tags)
        self.tokens_per_step.set(stats.tokens_decided_per_step, tags)
        self.backlog.set(stats.predicted_backlog_s, tags)
        self.pages_free.set(stats.pages_free, tags)
        self.prediction_scale.set(getattr(stats, "prediction_scale", 1.0), tags)
