"""On a lent GPU: experiments 1-3 in-process on the built-in ~1B Llama (bf16), and transformers' own continuous
batching (`generate_batch`) on the same prompts. `--smoke` runs the same code on this CPU with the tiny model."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from flover_backend import Engine, EngineConfig
from flover_backend.inprocess_bench import decode_sweep, measure
from flover_backend.models.loader import resolve_model_path
from flover_backend.workload import make_trace

POLICIES = ("fused", "window", "solo")


def run_policies(base: dict, trace, label: str, policies: tuple[str, ...] = POLICIES) -> dict:
    """Each policy on the same trace, in a fresh engine; the summaries by policy."""
    results = {}
    for policy in policies:
        with Engine(EngineConfig(**base, policy=policy, window_ms=20.0)) as engine:
            summary = measure(engine, trace)
        results[policy] = summary
        print(f"{label:<22} {policy:>6}: {summary['total_s']:7.2f}s {summary['tokens_per_s']:8.1f} tok/s "
              f"iterations {summary['iterations']}", flush=True)
    return results


def transformers_batch(model_path: Path, trace, dtype: torch.dtype, device: str) -> dict:
    """transformers' continuous batching on the trace's prompts, all at once (it takes no arrival times)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
    config = GenerationConfig(max_new_tokens=trace[0].max_tokens, do_sample=False, eos_token_id=-1,
                              pad_token_id=0)
    prompts = [list(item.prompt_token_ids) for item in trace]
    model.generate_batch(inputs=prompts[:2], generation_config=config)  # warm-up
    start = time.perf_counter()
    outputs = model.generate_batch(inputs=prompts, generation_config=config)
    seconds = time.perf_counter() - start
    tokens = sum(len(output.generated_tokens) for output in outputs.values())
    return {"total_s": seconds, "total_tokens": tokens, "tokens_per_s": tokens / seconds}


def main(argv: list[str] | None = None) -> int:
    """Run everything, print a short table last, write JSON and Markdown into --out."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, few requests: checks the script")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu"))
    args = parser.parse_args(argv)
    model, device, dtype = ("builtin:tiny", "cpu", "float32") if args.smoke else ("builtin:1b", "cuda", "bfloat16")
    counts, gen_len = ([1, 4], 8) if args.smoke else ([1, 8, 32], 128)
    card = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    base = {"model": model, "device": device, "dtype": dtype, "max_num_seqs": 32, "max_model_len": 512}
    results: dict = {"card": card, "model": model, "dtype": dtype, "exp1": {}, "exp3": {}}
    for n in counts:  # experiments 1 and 2: constant arrivals, and throughput by requests in flight
        results["exp1"][n] = run_policies(base, make_trace(n, interval_s=0.01, gen_len=(gen_len,) * 2), f"exp1 N={n}")
    for gap_ms in (5.0, 20.0):  # experiment 3: Poisson arrivals
        trace = make_trace(counts[-1], mean_gap_s=gap_ms / 1000, gen_len=(gen_len // 2, gen_len), seed=7)
        results["exp3"][gap_ms] = run_policies(base, trace, f"exp3 gap={gap_ms:.0f}ms")
    with Engine(EngineConfig(**base)) as engine:
        results["decode_steps"] = decode_sweep(engine, [1, counts[-1]])
    trace = make_trace(counts[-1], interval_s=0.0, gen_len=(gen_len,) * 2, seed=3)
    results["transformers_generate_batch"] = transformers_batch(resolve_model_path(model), trace,
                                                                getattr(torch, dtype), device)
    results["fused_same_prompts"] = run_policies(base, trace, "same prompts", ("fused",))["fused"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(results, indent=2))
    last = results["exp1"][counts[-1]]
    rows = [f"| {p} | {last[p]['total_s']:.2f} | {last[p]['tokens_per_s']:.1f} |" for p in POLICIES]
    hf = results["transformers_generate_batch"]
    rows.append(f"| transformers generate_batch (all at once) | {hf['total_s']:.2f} | {hf['tokens_per_s']:.1f} |")
    same = results["fused_same_prompts"]
    rows.append(f"| fused, same prompts all at once | {same['total_s']:.2f} | {same['tokens_per_s']:.1f} |")
    table = "\n".join([f"{card}, {model} {dtype}, {counts[-1]} requests x {gen_len} tokens", "",
                       "| run | total (s) | tokens/s |", "|---|---|---|", *rows])
    (args.out / "gpu_check.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
