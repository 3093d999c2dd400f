"""The metrics exporter against a stand-in for pb_utils: each stat reaches its metric once, and only its change."""

import re
from pathlib import Path
from typing import ClassVar

import pytest

from flover_backend.engine.stats import EngineStats, FinishedRecord, IterationRecord
from flover_backend.errors import EngineBusyError, EngineDeadError, InvalidRequestError
from flover_backend.frontends.triton.metrics import (
    COUNTER,
    HISTOGRAM,
    METRICS,
    EngineMetrics,
    refusal_reason,
    token_buckets,
)

ROOT = Path(__file__).resolve().parents[1]


class FakeMetric:
    def __init__(self, labels, buckets=None):
        self.labels, self.buckets = labels, buckets
        self.value, self.observed, self.calls = 0.0, [], 0

    def increment(self, value):
        self.value += value
        self.calls += 1

    def set(self, value):
        self.value = value
        self.calls += 1

    def observe(self, value):
        self.observed.append(value)


class FakeFamily:
    COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
    created: ClassVar[dict] = {}  # name -> family, reset by each test's fixture

    def __init__(self, name, description, kind):
        self.name, self.kind, self.metrics = name, kind, []
        FakeFamily.created[name] = self

    def Metric(self, labels, buckets=None):
        self.metrics.append(FakeMetric(labels, buckets))
        return self.metrics[-1]


class FakePbUtils:
    MetricFamily = FakeFamily


def series(name: str, **labels) -> FakeMetric:
    (found,) = [m for m in FakeFamily.created[name].metrics if labels.items() <= m.labels.items()]
    return found


def iteration(seconds: float, moved_bytes: int = 0, compaction_seconds: float = 0.0) -> IterationRecord:
    return IterationRecord(seconds=seconds, decode_seconds=seconds, num_decode=2, decode_span=2, num_prefill=1,
                           num_waiting=0, num_prompt_tokens=7, moved_bytes=moved_bytes,
                           compaction_seconds=compaction_seconds)


def finished(reason: str, num_output_tokens: int, first_token: float | None = 0.2) -> FinishedRecord:
    tpot = 0.05 if num_output_tokens > 1 else None
    return FinishedRecord("r", reason, 7, num_output_tokens, 0.1 if first_token else None, first_token, tpot, 1.0)


@pytest.fixture
def exported():
    FakeFamily.created = {}
    stats = EngineStats(num_rows=4, kv_bytes_allocated=1000)
    return stats, EngineMetrics(FakePbUtils, {"model": "m"}, max_model_len=256)


def test_every_declared_metric_is_created_with_its_labels_and_buckets(exported):
    assert set(FakeFamily.created) == {spec.name for spec in METRICS}
    for spec in METRICS:
        metrics = FakeFamily.created[spec.name].metrics
        assert [m.labels.get(spec.label) for m in metrics] == list(spec.label_values or [None])
        assert all(m.labels["model"] == "m" for m in metrics)
        assert all((m.buckets is not None) == (spec.kind == HISTOGRAM) for m in metrics)
    assert series("flover_request_prompt_tokens").buckets == [1, 2, 5, 10, 20, 50, 100, 200]


def test_updates_publish_each_record_once_and_counters_by_their_growth(exported):
    stats, metrics = exported
    stats.record(iteration(0.03))
    stats.record(iteration(0.04, moved_bytes=512, compaction_seconds=0.001))
    stats.record_finished(finished("length", 5))
    stats.record_finished(finished("abort", 0, first_token=None))
    stats.num_running, stats.num_waiting, stats.kv_bytes_in_use = 2, 1, 250
    metrics.count_refused("invalid")
    metrics.update(stats)
    stats.record(iteration(0.05))
    stats.record_finished(finished("stop", 1))
    metrics.count_refused("busy")
    metrics.count_refused("busy")
    metrics.update(stats)
    metrics.update(stats)  # nothing new: nothing more published

    assert series("flover_iteration_seconds").observed == [0.03, 0.04, 0.05]
    assert series("flover_compaction_seconds").observed == [0.001]
    assert series("flover_iterations_total").value == 3
    assert series("flover_prompt_tokens_total").value == 21
    assert series("flover_generated_tokens_total").value == 9
    assert series("flover_compaction_bytes_total").value == 512
    assert series("flover_request_generation_tokens").observed == [5, 0, 1]
    assert series("flover_request_prompt_tokens").observed == [7, 7, 7]
    assert series("flover_time_to_first_token_seconds").observed == [0.2, 0.2]  # the aborted one had no token
    assert series("flover_time_per_output_token_seconds").observed == [0.05]  # only one with two tokens or more
    assert series("flover_e2e_request_latency_seconds").observed == [1.0, 1.0, 1.0]
    assert series("flover_request_queue_time_seconds").observed == [0.1, 0.1]
    assert {r: series("flover_request_success_total", finished_reason=r).value
            for r in ("length", "stop", "abort", "error")} == {"length": 1, "stop": 1, "abort": 1, "error": 0}
    assert {r: series("flover_request_refused_total", reason=r).value
            for r in ("invalid", "busy", "unavailable", "internal")} == {"invalid": 1, "busy": 2, "unavailable": 0,
                                                                         "internal": 0}
    assert series("flover_requests_running").value == series("flover_arena_rows_in_use").value == 2
    assert series("flover_arena_rows").value == 4 and series("flover_kv_cache_bytes_allocated").value == 1000
    assert series("flover_kv_cache_usage_perc").value == 0.25
    assert series("flover_arena_rows").calls == 1  # a gauge that never changes is set once


def test_refusal_reasons():
    assert refusal_reason(InvalidRequestError("prompt", "empty")) == "invalid"
    assert refusal_reason(EngineBusyError("full")) == "busy"
    assert refusal_reason(EngineDeadError("stopped")) == "unavailable"
    assert refusal_reason(KeyError("bug")) == "internal"


def test_token_buckets_are_one_two_five_up_to_the_model_length():
    assert token_buckets(512) == [1, 2, 5, 10, 20, 50, 100, 200, 500]
    assert token_buckets(1) == [1]


def test_readme_table_lists_every_metric_with_its_vllm_name():
    rows = re.findall(r"^\| `(flover_\w+)` \| (.+?) \| (.+?) \| (.+?) \|$", (ROOT / "README.md").read_text(),
                      re.MULTILINE)
    table = {name: (kind, vllm) for name, kind, vllm, _ in rows}
    assert set(table) == {spec.name for spec in METRICS}
    for spec in METRICS:
        kind, vllm = table[spec.name]
        assert kind == spec.kind and vllm == (f"`{spec.vllm}`" if spec.vllm else "-"), spec.name
    assert all(spec.kind != COUNTER or spec.name.endswith("_total") for spec in METRICS)
