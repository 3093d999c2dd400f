"""The engine's counters as Triton custom metrics (`pb_utils.MetricFamily`) on the server's metrics port."""

from __future__ import annotations

from flover_backend.engine_stats import EngineStats

LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]


class EngineMetrics:
    """Publishes EngineStats deltas; call `update` from one thread (the adapter's response thread)."""

    def __init__(self, pb_utils, labels: dict[str, str]):
        family = pb_utils.MetricFamily
        self._families = []  # a Metric is only usable while its family object is alive

        def metric(name: str, description: str, kind, **kwargs):
            self._families.append(family(name=name, description=description, kind=kind))
            return self._families[-1].Metric(labels=labels, **kwargs)

        self.running = metric("flover_requests_running", "Requests holding an arena row", family.GAUGE)
        self.waiting = metric("flover_requests_waiting", "Requests queued for an arena row", family.GAUGE)
        self.iterations = metric("flover_iterations_total", "Iterations of the inference loop", family.COUNTER)
        self.tokens = metric("flover_generated_tokens_total", "Tokens generated", family.COUNTER)
        self.compaction_bytes = metric("flover_compaction_bytes_total", "KV bytes moved by compaction",
                                       family.COUNTER)
        self.iteration_seconds = metric("flover_iteration_seconds", "Duration of one loop iteration",
                                        family.HISTOGRAM, buckets=LATENCY_BUCKETS)
        self.ttft_seconds = metric("flover_time_to_first_token_seconds", "Request arrival to first token",
                                   family.HISTOGRAM, buckets=LATENCY_BUCKETS)
        self._seen_iterations = 0
        self._seen_tokens = 0
        self._seen_bytes = 0
        self._seen_gauges = (-1, -1)

    def update(self, stats: EngineStats) -> None:
        """Bring every metric up to date with the engine's totals."""
        gauges = (stats.num_running, stats.num_waiting)
        if gauges != self._seen_gauges:  # each call is a round trip to the server: skip the unchanged
            self.running.set(gauges[0])
            self.waiting.set(gauges[1])
            self._seen_gauges = gauges
        num_iterations, tokens, moved = stats.num_iterations, stats.num_generated_tokens, stats.compaction_bytes
        new = num_iterations - self._seen_iterations
        if new:
            for record in stats.recent(new):
                self.iteration_seconds.observe(record.seconds)
            self.iterations.increment(new)
        if tokens > self._seen_tokens:
            self.tokens.increment(tokens - self._seen_tokens)
        if moved > self._seen_bytes:
            self.compaction_bytes.increment(moved - self._seen_bytes)
        self._seen_iterations, self._seen_tokens, self._seen_bytes = num_iterations, tokens, moved

    def observe_ttft(self, seconds: float) -> None:
        """Record one request's time to first token."""
        self.ttft_seconds.observe(seconds)
