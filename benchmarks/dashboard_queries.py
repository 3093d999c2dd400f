"""The Grafana dashboard's PromQL, evaluated over metrics pages sampled by hand: the few forms its panels use.

Not a PromQL engine: a query of any other form is an error, so the dashboard and this stay in step.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass

Series = tuple[str, tuple[tuple[str, str], ...]]  # (metric name, sorted labels)
_SELECTOR = r'(?P<metric>flover_\w+)\{model=~"\$model"\}'
_RANGE = r"\[\$__rate_interval\]"
_GAUGE = re.compile(rf"^(?P<agg>sum|max)\({_SELECTOR}\)$")
_RATE = re.compile(rf"^sum(?: by \((?P<by>\w+)\) )?\(rate\({_SELECTOR}{_RANGE}\)\)$")
_QUANTILE = re.compile(rf"^histogram_quantile\((?P<q>[0-9.]+), sum by \(le\) \(rate\({_SELECTOR}{_RANGE}\)\)\)$")
_LINE = re.compile(r"^(flover_\w+)\{([^}]*)\} (\S+)$", re.MULTILINE)


@dataclass
class Sample:
    """One read of the metrics page: seconds since the run began, and the value of every flover series."""

    t: float
    values: dict[Series, float]


def parse_page(text: str, model: str) -> dict[Series, float]:
    """The flover series of `model` on a Prometheus text page, summed over the model's instances."""
    values: dict[Series, float] = defaultdict(float)
    for name, labels, value in _LINE.findall(text):
        pairs = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if pairs.pop("model", None) == model:
            pairs.pop("instance", None)
            values[(name, tuple(sorted(pairs.items())))] += float(value)
    return dict(values)


def evaluate(query: str, samples: list[Sample], window_s: float) -> dict[str, list[float]]:
    """The query's value at every sample, per group (a label value, or '' when not grouped); NaN where undefined."""
    if match := _GAUGE.fullmatch(query):
        aggregate = sum if match["agg"] == "sum" else max
        return {"": [aggregate([v for (name, _), v in s.values.items() if name == match["metric"]] or [math.nan])
                     for s in samples]}
    if match := _RATE.fullmatch(query):
        return _grouped_rates(match["metric"], match["by"], samples, window_s)
    if match := _QUANTILE.fullmatch(query):
        by_le = _grouped_rates(match["metric"], "le", samples, window_s)
        return {"": [_quantile(float(match["q"]), {le: rates[i] for le, rates in by_le.items()})
                     for i in range(len(samples))]}
    raise ValueError(f"not a query form this snapshot evaluates: {query}")


def _grouped_rates(metric: str, by: str | None, samples: list[Sample], window_s: float) -> dict[str, list[float]]:
    """Per-second increase of the summed counters of each group over the `window_s` before each sample."""
    totals: list[dict[str, float]] = []
    for sample in samples:
        groups: dict[str, float] = defaultdict(float)
        for (name, labels), value in sample.values.items():
            if name == metric:
                groups[dict(labels).get(by, "") if by else ""] += value
        totals.append(groups)
    rates: dict[str, list[float]] = {group: [] for groups in totals for group in groups}
    start = 0
    for i, sample in enumerate(samples):
        while samples[start].t < sample.t - window_s:
            start += 1
        elapsed = sample.t - samples[start].t
        for group, series in rates.items():
            grown = totals[i].get(group, 0.0) - totals[start].get(group, 0.0)
            series.append(grown / elapsed if elapsed > 0 else math.nan)
    return rates


def _quantile(q: float, rate_by_le: dict[str, float]) -> float:
    """Prometheus' histogram_quantile over cumulative bucket rates: linear within the bucket holding the rank."""
    buckets = sorted((float(le), rate) for le, rate in rate_by_le.items())
    if not buckets or math.isnan(buckets[-1][1]) or buckets[-1][1] <= 0:
        return math.nan
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if math.isinf(upper):  # past the last finite bound: Prometheus answers that bound
                return lower
            return lower + (upper - lower) * (rank - below) / (count - below) if count > below else upper
        lower, below = upper, count
    return lower
