"""Request traces (constant or Poisson arrivals, fixed or uniform lengths) and the timing summary of a run."""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass, field

# Byte tokens of the built-in tokenizer (ids 3..258): valid in any vocabulary of at least that size.
PROMPT_TOKEN_RANGE = (3, 258)


@dataclass(frozen=True)
class TraceRequest:
    """One request of a trace: when it arrives (seconds after the start) and what it asks for."""

    index: int
    arrival_s: float
    prompt_token_ids: tuple[int, ...]
    max_tokens: int


def make_trace(
    num_requests: int,
    *,
    interval_s: float | None = None,
    mean_gap_s: float | None = None,
    gen_len: tuple[int, int] = (128, 128),
    prompt_len: int | tuple[int, int] = 16,
    seed: int = 0,
    prompt_seed: int | None = None,
) -> list[TraceRequest]:
    """A replayable trace: arrivals every `interval_s`, or Poisson with mean gap `mean_gap_s`; output lengths
    ~ U(a, b), prompt lengths fixed or ~ U(a, b). The prompts' tokens come from `prompt_seed` where given
    (traces with one `seed` and other prompt seeds share arrivals and lengths), else from `seed` like the rest."""
    if (interval_s is None) == (mean_gap_s is None):
        raise ValueError("give exactly one of interval_s (constant arrivals) or mean_gap_s (Poisson)")
    low, high = gen_len
    if not 1 <= low <= high:
        raise ValueError(f"gen_len must satisfy 1 <= a <= b, got {gen_len}")
    rng = random.Random(seed)
    prompt_rng = rng if prompt_seed is None else random.Random(prompt_seed)
    trace, clock = [], 0.0
    for index in range(num_requests):
        if index:
            clock += interval_s if interval_s is not None else rng.expovariate(1.0 / mean_gap_s)
        length = prompt_len if isinstance(prompt_len, int) else rng.randint(*prompt_len)
        prompt = tuple(prompt_rng.randint(*PROMPT_TOKEN_RANGE) for _ in range(length))
        trace.append(TraceRequest(index, clock, prompt, rng.randint(low, high)))
    return trace


@dataclass
class RequestTiming:
    """Wall-clock times (one clock, seconds) of one request: sent, each token, done."""

    arrival: float
    token_times: list[float] = field(default_factory=list)
    end: float | None = None
    finish_reason: str | None = None

    @property
    def num_tokens(self) -> int:
        """Tokens received."""
        return len(self.token_times)

    @property
    def ttft(self) -> float:
        """Time to first token."""
        return self.token_times[0] - self.arrival

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first; None for a one-token answer."""
        if self.num_tokens < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (self.num_tokens - 1)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[min(max(round(q), 1), 99) - 1]


def summarize(timings: list[RequestTiming]) -> dict[str, float]:
    """Total time, throughput and latency percentiles of one run."""
    start = min(t.arrival for t in timings)
    end = max(t.end for t in timings)
    ttfts = [t.ttft for t in timings]
    tpots = [t.tpot for t in timings if t.tpot is not None]
    # Every gap between two tokens of one stream: a stall when a long prompt is prefilled shows here, where a
    # request's mean time per token would average it away.
    gaps = [later - earlier for t in timings for earlier, later in zip(t.token_times, t.token_times[1:])]
    total_tokens = sum(t.num_tokens for t in timings)
    return {
        "num_requests": len(timings),
        "total_s": end - start,
        "total_tokens": total_tokens,
        "tokens_per_s": total_tokens / (end - start),
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
        "tpot_p50_s": percentile(tpots, 50) if tpots else float("nan"),
        "tpot_p99_s": percentile(tpots, 99) if tpots else float("nan"),
        "itl_p50_s": percentile(gaps, 50) if gaps else float("nan"),
        "itl_p99_s": percentile(gaps, 99) if gaps else float("nan"),
        "mean_latency_s": statistics.fmean(t.end - t.arrival for t in timings),
    }
