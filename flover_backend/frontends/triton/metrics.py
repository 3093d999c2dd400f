"""The engine's stats as Triton custom metrics (`pb_utils.MetricFamily`) on the server's metrics port.

Every metric is declared once in METRICS (the README's table and the Grafana dashboard are checked against
it). Names follow vllm_backend's with our prefix: `flover_` rather than `vllm:`, since the server is not
vLLM and Prometheus reserves colons for recording rules.
"""

from __future__ import annotations

from dataclasses import dataclass

from flover_backend.engine.stats import EngineStats
from flover_backend.errors import EngineBusyError, EngineDeadError, InvalidRequestError
from flover_backend.request import FINISH_REASONS

COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TOKEN_TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
REQUEST_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
                   300.0, 600.0)
COMPACTION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
REFUSAL_REASONS = ("invalid", "busy", "unavailable", "internal")


@dataclass(frozen=True)
class MetricSpec:
    """One metric family: its name, kind, meaning and vllm_backend's counterpart, if any."""

    name: str
    kind: str
    description: str
    vllm: str | None = None
    buckets: tuple[float, ...] | None = None  # histograms; None: token counts, 1-2-5 buckets up to max_model_len
    label: str | None = None  # one series per value of this label, besides the model's own labels
    label_values: tuple[str, ...] = ()


METRICS = (
    MetricSpec("flover_requests_running", GAUGE, "Requests holding an arena row", "vllm:num_requests_running"),
    MetricSpec("flover_requests_waiting", GAUGE, "Requests queued for an arena row", "vllm:num_requests_waiting"),
    MetricSpec("flover_iterations_total", COUNTER, "Iterations of the inference loop"),
    MetricSpec("flover_prompt_tokens_total", COUNTER, "Prompt tokens prefilled", "vllm:prompt_tokens_total"),
    MetricSpec("flover_generated_tokens_total", COUNTER, "Tokens generated", "vllm:generation_tokens_total"),
    MetricSpec("flover_iteration_seconds", HISTOGRAM, "Duration of one loop iteration", buckets=LATENCY_BUCKETS),
    MetricSpec("flover_time_to_first_token_seconds", HISTOGRAM, "Request arrival to its first token",
               "vllm:time_to_first_token_seconds", LATENCY_BUCKETS),
    MetricSpec("flover_time_per_output_token_seconds", HISTOGRAM,
               "Mean time between a request's tokens after the first", "vllm:time_per_output_token_seconds",
               TOKEN_TIME_BUCKETS),
    MetricSpec("flover_e2e_request_latency_seconds", HISTOGRAM, "Request arrival to its final output",
               "vllm:e2e_request_latency_seconds", REQUEST_BUCKETS),
    MetricSpec("flover_request_queue_time_seconds", HISTOGRAM, "Request arrival to admission into an arena row",
               "vllm:request_queue_time_seconds", REQUEST_BUCKETS),
    MetricSpec("flover_request_prompt_tokens", HISTOGRAM, "Prompt tokens per finished request",
               "vllm:request_prompt_tokens"),
    MetricSpec("flover_request_generation_tokens", HISTOGRAM, "Generated tokens per finished request",
               "vllm:request_generation_tokens"),
    MetricSpec("flover_request_success_total", COUNTER, "Finished requests by finish reason",
               "vllm:request_success_total", label="finished_reason", label_values=FINISH_REASONS),
    MetricSpec("flover_request_refused_total", COUNTER,
               "Requests refused before reaching the loop: invalid input, busy (queue full), unavailable "
               "(engine stopped), internal (a bug, logged)", label="reason", label_values=REFUSAL_REASONS),
    MetricSpec("flover_arena_rows", GAUGE, "Rows of the KV arena (max_num_seqs)"),
    MetricSpec("flover_arena_rows_in_use", GAUGE, "Arena rows held by running requests"),
    MetricSpec("flover_kv_cache_bytes_allocated", GAUGE, "Bytes of the preallocated KV arena"),
    MetricSpec("flover_kv_cache_bytes_in_use", GAUGE, "KV bytes holding running requests' positions"),
    MetricSpec("flover_kv_cache_usage_perc", GAUGE, "KV arena usage, 1 means full", "vllm:gpu_cache_usage_perc"),
    MetricSpec("flover_compaction_bytes_total", COUNTER, "KV bytes moved by compaction"),
    MetricSpec("flover_prefix_cache_queries_total", COUNTER, "Prompt tokens of admitted requests looked up for reuse",
               "vllm:prefix_cache_queries"),
    MetricSpec("flover_prefix_cache_hits_total", COUNTER, "Prompt tokens whose keys were copied from a held row",
               "vllm:prefix_cache_hits"),
    MetricSpec("flover_prefix_cache_retained_rows", GAUGE, "Arena rows finished requests keep for prefix reuse"),
    MetricSpec("flover_kv_cache_bytes_retained", GAUGE, "KV bytes of the positions retained rows hold"),
    MetricSpec("flover_compaction_seconds", HISTOGRAM, "Duration of one compaction (iterations that moved rows)",
               buckets=COMPACTION_BUCKETS),
)


def token_buckets(max_model_len: int) -> list[float]:
    """1, 2, 5, 10, 20, 50, ... up to max_model_len, as vLLM buckets token counts."""
    buckets, magnitude = [], 1
    while True:
        for step in (1, 2, 5):
            if step * magnitude > max_model_len:
                return buckets
            buckets.append(float(step * magnitude))
        magnitude *= 10


def refusal_reason(error: Exception) -> str:
    """The `reason` label of a request refused with `error`."""
    if isinstance(error, InvalidRequestError):
        return "invalid"
    if isinstance(error, EngineBusyError):
        return "busy"
    if isinstance(error, EngineDeadError):
        return "unavailable"
    return "internal"


class EngineMetrics:
    """Publishes EngineStats; call `update` from one thread (the adapter's response thread).

    Each metric call is a round trip to the server, so gauges are set only when they change, counters get
    the difference since the last update, and histograms observe only the records added since then.
    """

    def __init__(self, pb_utils, labels: dict[str, str], max_model_len: int):
        kinds = {COUNTER: pb_utils.MetricFamily.COUNTER, GAUGE: pb_utils.MetricFamily.GAUGE,
                 HISTOGRAM: pb_utils.MetricFamily.HISTOGRAM}
        self._families = {}  # a Metric is only usable while its family object is alive
        self._metrics = {}
        for spec in METRICS:
            family = pb_utils.MetricFamily(name=spec.name, description=spec.description, kind=kinds[spec.kind])
            self._families[spec.name] = family
            extra = {}
            if spec.kind == HISTOGRAM:
                extra["buckets"] = list(spec.buckets) if spec.buckets is not None else token_buckets(max_model_len)
            if spec.label is None:
                self._metrics[spec.name] = family.Metric(labels=labels, **extra)
            else:
                self._metrics[spec.name] = {value: family.Metric(labels=labels | {spec.label: value}, **extra)
                                            for value in spec.label_values}
        self._seen: dict[str, float] = {}  # the last value published per gauge or counter (series)
        self._seen_iterations = 0
        self._seen_finished = 0
        self._refused = dict.fromkeys(REFUSAL_REASONS, 0)

    def count_refused(self, reason: str) -> None:
        """Count one refused request; cheap (no round trip), so callable from the thread that refused it."""
        self._refused[reason] += 1

    def update(self, stats: EngineStats) -> None:
        """Bring every metric up to date with the engine's stats."""
        self._set_gauges(stats)
        self._observe_iterations(stats)
        self._observe_finished(stats)
        self._add("flover_prompt_tokens_total", stats.num_prompt_tokens)
        self._add("flover_generated_tokens_total", stats.num_generated_tokens)
        self._add("flover_compaction_bytes_total", stats.compaction_bytes)
        self._add("flover_prefix_cache_queries_total", stats.prefix_queried_tokens)
        self._add("flover_prefix_cache_hits_total", stats.prefix_hit_tokens)
        for reason, count in stats.finish_reasons.items():
            self._add("flover_request_success_total", count, reason)
        for reason, count in self._refused.items():
            self._add("flover_request_refused_total", count, reason)

    def _set_gauges(self, stats: EngineStats) -> None:
        usage = stats.kv_bytes_in_use / stats.kv_bytes_allocated if stats.kv_bytes_allocated else 0.0
        for name, value in (("flover_requests_running", stats.num_running),
                            ("flover_requests_waiting", stats.num_waiting),
                            ("flover_arena_rows", stats.num_rows),
                            ("flover_arena_rows_in_use", stats.num_running),  # one row per running request
                            ("flover_kv_cache_bytes_allocated", stats.kv_bytes_allocated),
                            ("flover_kv_cache_bytes_in_use", stats.kv_bytes_in_use),
                            ("flover_prefix_cache_retained_rows", stats.num_retained_rows),
                            ("flover_kv_cache_bytes_retained", stats.kv_bytes_retained),
                            ("flover_kv_cache_usage_perc", usage)):
            if self._seen.get(name) != value:
                self._metrics[name].set(value)
                self._seen[name] = value

    def _add(self, name: str, total: int, label_value: str | None = None) -> None:
        """Increment a counter (series) by how much `total` grew since the last call."""
        key = name if label_value is None else f"{name}/{label_value}"
        grown = total - self._seen.get(key, 0)
        if grown > 0:
            metric = self._metrics[name] if label_value is None else self._metrics[name][label_value]
            metric.increment(grown)
            self._seen[key] = total

    def _observe_iterations(self, stats: EngineStats) -> None:
        total, records = stats.iterations.since(self._seen_iterations)
        for record in records:
            self._metrics["flover_iteration_seconds"].observe(record.seconds)
            if record.moved_bytes:
                self._metrics["flover_compaction_seconds"].observe(record.compaction_seconds)
        self._add("flover_iterations_total", total)
        self._seen_iterations = total

    def _observe_finished(self, stats: EngineStats) -> None:
        self._seen_finished, records = stats.finished.since(self._seen_finished)
        for record in records:
            for name, value in (("flover_request_prompt_tokens", record.num_prompt_tokens),
                                ("flover_request_generation_tokens", record.num_output_tokens),
                                ("flover_e2e_request_latency_seconds", record.e2e_latency),
                                ("flover_request_queue_time_seconds", record.queue_time),
                                ("flover_time_to_first_token_seconds", record.time_to_first_token),
                                ("flover_time_per_output_token_seconds", record.time_per_output_token)):
                if value is not None:
                    self._metrics[name].observe(value)
