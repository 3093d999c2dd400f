"""The sampling step alone, old per-row sampler against the batched one, in the same run: `make bench-sampling`.

32 rows x 32000 logits on the CPU, one table row per setting, median ms over `--calls` calls after a warm-up,
the samplers taking turns of a few calls each so that a busy machine slows all alike: the per-row baseline,
the batched pass in torch's operators (what runs on a GPU, or without a C compiler) and in the C kernel. Logits are Zipf-shaped (token of
rank r has logit -1.2 ln r, slightly jittered; at temperature 0.8 the top-p 0.9 nucleus holds tens of tokens,
as an LLM's often does) and, for top-p, also flat (Gaussian, sd 3: a nucleus of hundreds of tokens).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from flover_backend.native import sampling as native_sampling
from flover_backend.paths import kernels_dir
from flover_backend.request import Request
from flover_backend.sampling.params import SamplingParams
from flover_backend.sampling.sampler import Sampler

NUM_ROWS, VOCAB_SIZE, TEMPERATURE = 32, 32000, 0.8


class PerRowSampler(Sampler):
    """BASELINE, not the product: flover_backend/sampling/sampler.py's Sampler as it was before issue 15 (its per-request
    generators are the Sampler's own, unchanged), so both run side by side on the same machine and logits."""

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> list[int]:
        """Next token id for each row of `logits` (N, vocab), row i belonging to requests[i]."""
        greedy = np.argmax(logits.numpy(), axis=-1) if logits.device.type == "cpu" else logits.argmax(dim=-1)
        token_ids = greedy.tolist()
        sampled = [i for i, request in enumerate(requests) if not request.params.greedy]
        if sampled:
            host_logits = logits[sampled].float().cpu()
            for i, row_logits in zip(sampled, host_logits):
                token_ids[i] = per_row_sample(row_logits, requests[i].params, self._generator(requests[i]))
        return token_ids


def per_row_sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """BASELINE: the old `sample`, one row with its own sort: temperature, top-k mask, top-p mask, multinomial."""
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= params.top_p
        drop = torch.empty_like(drop_sorted).scatter_(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def zipf_logits(seed: int) -> torch.Tensor:
    """(NUM_ROWS, VOCAB_SIZE): each row's token of rank r at -1.2 ln r plus a little noise, ranks shuffled."""
    generator = torch.Generator().manual_seed(seed)
    by_rank = -1.2 * torch.log(torch.arange(1, VOCAB_SIZE + 1, dtype=torch.float32))
    rows = [by_rank[torch.randperm(VOCAB_SIZE, generator=generator)] for _ in range(NUM_ROWS)]
    return torch.stack(rows) + 0.05 * torch.randn(NUM_ROWS, VOCAB_SIZE, generator=generator)


def flat_logits(seed: int) -> torch.Tensor:
    """(NUM_ROWS, VOCAB_SIZE) Gaussian logits, sd 3."""
    return 3.0 * torch.randn(NUM_ROWS, VOCAB_SIZE, generator=torch.Generator().manual_seed(seed))


def nucleus_size(logits: torch.Tensor, top_p: float) -> float:
    """Median tokens in the top-p nucleus at TEMPERATURE, over the rows."""
    probs = (logits / TEMPERATURE).softmax(-1).sort(-1, descending=True).values
    return float(((probs.cumsum(-1) - probs) < top_p).sum(-1).float().median())


def sampled(**settings) -> Callable[[int], SamplingParams]:
    return lambda row: SamplingParams(temperature=TEMPERATURE, seed=row, **settings)


MIXED_SAMPLED = [{}, {"top_k": 50}, {"top_p": 0.9}, {"top_k": 50, "top_p": 0.9}]
SETTINGS: dict[str, tuple[Callable[[int], SamplingParams], Callable[[int], torch.Tensor]]] = {
    "greedy": (lambda row: SamplingParams(), zipf_logits),
    "temperature": (sampled(), zipf_logits),
    "top_k 50": (sampled(top_k=50), zipf_logits),
    "top_p 0.9": (sampled(top_p=0.9), zipf_logits),
    "top_k 50 + top_p 0.9": (sampled(top_k=50, top_p=0.9), zipf_logits),
    "mixed: 16 greedy, 16 sampled": (
        lambda row: SamplingParams() if row % 2 else sampled(**MIXED_SAMPLED[row // 2 % 4])(row), zipf_logits),
    "top_p 0.9, flat logits": (sampled(top_p=0.9), flat_logits),
}


def time_side_by_side(samplers: dict[str, Callable], requests: list[Request], steps: list[torch.Tensor],
                      calls: int, rounds: int = 5) -> dict[str, float]:
    """Median ms of each sampler over `calls` calls, in `rounds` turns of a few calls each (each sampler warm in
    its turn, both under the same spells of load), each call on the next step's logits."""
    times: dict[str, list[float]] = {name: [] for name in samplers}
    for turn in range(rounds):
        for name, sampler in samplers.items():
            for call in range(-1, calls // rounds):  # call -1 warms up
                logits = steps[call % len(steps)]
                start = time.perf_counter()
                sampler(logits, requests)
                if call >= 0:
                    times[name].append(time.perf_counter() - start)
    return {name: statistics.median(samples) * 1e3 for name, samples in times.items()}


def run(calls: int) -> dict:
    """Every setting, every sampler; the figures as one dict."""
    kernel = native_sampling.load(kernels_dir())
    if kernel is None:
        raise SystemExit("the sampling kernel could not be built (see the warning above)")
    rows = []
    for name, (params_of, make_logits) in SETTINGS.items():
        requests = [Request(f"req-{row}", [1], params_of(row)) for row in range(NUM_ROWS)]
        steps = [make_logits(seed) for seed in range(4)]
        samplers = {"per_row_ms": PerRowSampler(), "batched_ms": Sampler(), "kernel_ms": Sampler(kernel=kernel)}
        with torch.inference_mode():
            result = time_side_by_side(samplers, requests, steps, calls)
        top_p = next((r.params.top_p for r in requests if r.params.top_p < 1.0), None)
        rows.append({"setting": name, **result, "speedup": result["per_row_ms"] / result["kernel_ms"],
                     "nucleus_tokens": None if top_p is None else nucleus_size(steps[0], top_p)})
        print(f"{name:<30} per-row {result['per_row_ms']:8.2f} ms   batched {result['batched_ms']:6.2f} ms   "
              f"kernel {result['kernel_ms']:6.2f} ms   {rows[-1]['speedup']:6.1f}x", flush=True)
    return {"rows": rows, "num_rows": NUM_ROWS, "vocab_size": VOCAB_SIZE, "temperature": TEMPERATURE,
            "calls": calls, "torch_threads": torch.get_num_threads(), "torch": torch.__version__}


def write_markdown(results: dict, path: Path) -> None:
    """The table of `results` as Markdown."""
    about = (f"Median of {results['calls']} calls per sampler, in turns of a few calls in one run "
             f"(torch {results['torch']}, {results['torch_threads']} thread(s)); temperature "
             f"{results['temperature']} for every sampled row. Measured on a shared, noisy machine: compare the "
             "columns of one row, not runs.")
    lines = [f"# Sampling step: {results['num_rows']} rows x {results['vocab_size']} vocab on the CPU", "", about, "",
             ("| setting | per-row sampler (ms) | batched, torch (ms) | batched, C kernel (ms) | kernel speedup over "
              "per-row | top-p nucleus (median tokens) |"),
             "|---|---|---|---|---|---|"]
    for row in results["rows"]:
        nucleus = "" if row["nucleus_tokens"] is None else f"{row['nucleus_tokens']:.0f}"
        lines.append(f"| {row['setting']} | {row['per_row_ms']:.2f} | {row['batched_ms']:.2f} | "
                     f"{row['kernel_ms']:.2f} | {row['speedup']:.1f}x | {nucleus} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 by default: on a shared machine more threads mostly wait on each other)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = run(args.calls)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sampling.json").write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results, args.out / "sampling.md")
    both = next(row for row in results["rows"] if row["setting"] == "top_k 50 + top_p 0.9")
    print(f"top_k 50 + top_p 0.9 on {NUM_ROWS} x {VOCAB_SIZE}: {both['kernel_ms']:.2f} ms in the kernel, "
          f"{both['batched_ms']:.2f} ms batched in torch, {both['per_row_ms']:.2f} ms per row; tables in "
          f"{args.out}/sampling.md")


if __name__ == "__main__":
    main()
