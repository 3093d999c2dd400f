"""On a lent GPU: first, greedy tokens with CUDA graphs against eager ones on mixed-length prompts joining while
others decode (benchmarks/graphs_vs_eager.py; any mismatch fails the run loudly), then the decode step with and
without CUDA graphs, experiments 1-3 in-process on the built-in ~1B
Llama (bf16), and transformers' own continuous batching (`generate_batch`) on the same prompts.
`--smoke` runs the same code on this CPU with the tiny model.

Each part runs on its own: one that fails records its error and the rest still run, and the results so far
are rewritten after every part, so a run cut short by its time limit still leaves figures behind.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks import graphs_vs_eager, kernel_check
from benchmarks.inprocess import decode_sweep, measure, replay
from benchmarks.prefix_reuse import shared_prefix_trace
from clients.workload import make_trace, summarize
from flover_backend import Engine, EngineConfig
from flover_backend.execution.models.loader import resolve_model_path

POLICIES = ("fused", "window", "solo")


def run_policies(base: dict, trace, label: str, policies: tuple[str, ...] = POLICIES,
                 prefill_graphs: bool = True) -> dict:
    """Each policy on the same trace, in a fresh engine (without its prefill graphs if told); the summaries by
    policy."""
    results = {}
    for policy in policies:
        with Engine(EngineConfig(**{"window_ms": 20.0, **base, "policy": policy})) as engine:
            if not prefill_graphs:
                engine.runner.prefill_graphs = None  # prompt chunks in eager forwards, as before they existed
            summary = measure(engine, trace)
        results[policy] = summary
        print(f"{label:<22} {policy:>6}: {summary['total_s']:7.2f}s {summary['tokens_per_s']:8.1f} tok/s "
              f"iterations {summary['iterations']}", flush=True)
    return results


def prefix_reuse(base: dict, trace) -> dict:
    """Issue 24's shared-prefix trace with prefix reuse off and on (CUDA graphs as configured): each run's summary,
    and how many greedy answers were the same both ways. In float32 (the CPU tests) all are; in bfloat16 the copied
    prompt's remaining chunk runs other kernels than a whole prompt does, so a near-tie may break otherwise."""
    results: dict = {}
    answers: dict[str, list[list[int]]] = {}
    for name, on in (("off", False), ("on", True)):
        with Engine(EngineConfig(**base, prefix_caching=on)) as engine:
            replay(engine, trace[:2])  # warm-up: the first prompts' shapes
            answers[name] = []
            hits_before = engine.stats.prefix_hit_tokens
            summary = summarize(replay(engine, trace, answers[name]))
            summary["prefix_hit_tokens"] = engine.stats.prefix_hit_tokens - hits_before
        results[name] = summary
        print(f"prefix reuse {name:>3}: {summary['tokens_per_s']:8.1f} tok/s TTFT p50 {summary['ttft_p50_s'] * 1e3:.1f} "
              f"ms, {summary['prefix_hit_tokens']} prompt tokens copied", flush=True)
    results["identical_answers"] = sum(on == off for on, off in zip(answers["on"], answers["off"]))
    results["answers"] = len(trace)
    return results


def decode_steps(base: dict, batch_sizes: list[int]) -> dict:
    """The fused decode step at each batch size, eager and replayed from CUDA graphs, with the graphs captured."""
    results = {}
    for graphs in (False, True):
        with Engine(EngineConfig(**base, cuda_graphs=graphs)) as engine:
            label = "graphs" if graphs else "eager"
            print(f"decode step, {label}:", flush=True)
            results[label] = decode_sweep(engine, batch_sizes)
            captured = engine.runner.decode_graphs
            if captured is not None:
                results["graph_shapes"] = [list(shape) for shape in captured.graphs]
                results["graph_replays"] = captured.num_replays
    return results


def transformers_batch(model_path: Path, trace, dtype: torch.dtype, device: str) -> dict:
    """transformers' continuous batching on the trace's prompts, all at once (it takes no arrival times)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
    config = GenerationConfig(max_new_tokens=trace[0].max_tokens, do_sample=False, eos_token_id=-1,
                              pad_token_id=0)
    prompts = [list(item.prompt_token_ids) for item in trace]
    try:
        model.generate_batch(inputs=prompts[:2], generation_config=config)  # warm-up
        start = time.perf_counter()
        outputs = model.generate_batch(inputs=prompts, generation_config=config)
        seconds = time.perf_counter() - start
    finally:
        # Its paged cache takes most of the free GPU memory and torch keeps it reserved; the engines
        # after this one allocate their arenas through CuPy, which cannot reuse torch's reservation.
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    tokens = sum(len(output.generated_tokens) for output in outputs.values())
    return {"total_s": seconds, "total_tokens": tokens, "tokens_per_s": tokens / seconds}


def graphs_equal_eager(device: str, overrides: dict) -> dict:
    """The staggered, mixed-length graphs-vs-eager token comparison on the issue's random Llama."""
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = graphs_vs_eager.write_checkpoint(Path(tmp) / "issue21")
        return graphs_vs_eager.compare(checkpoint, device, **overrides)


def run_part(results: dict, name: str, part: Callable[[], dict], out: Path) -> None:
    """Run one part; keep its figures or its error; write everything so far."""
    start = time.perf_counter()
    try:
        results[name] = part()
    except Exception as error:  # noqa: BLE001 - one broken part must not cost the lent device's other figures
        traceback.print_exc()
        results[name] = {"error": f"{type(error).__name__}: {error}"}
    results.setdefault("part_seconds", {})[name] = time.perf_counter() - start
    print(f"[{name}] {results['part_seconds'][name]:.1f}s", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2))
    (out / "gpu_check.md").write_text(summary_table(results) + "\n")


def summary_table(results: dict) -> str:
    """The short Markdown table printed last: whatever parts have figures, and the errors of those that failed."""
    title = (f"{results['card']}, {results['model']} {results['dtype']}, "
             f"{results['requests']} requests x {results['gen_len']} tokens")
    lines = [title, ""]
    equality = results.get("graphs_vs_eager", {})
    if "runs" in equality:
        lines += [("Greedy streams identical to the same prompt served alone, eagerly "
                   f"({equality['prompts']} prompts of 1-{max(equality['prompt_lens'])} tokens):"), "",
                  "| run | identical |", "|---|---|"]
        lines += [f"| {name} | {run['identical']} / {run['of']} |" for name, run in equality["runs"].items()]
        lines.append("")
    lines += ["| run | total (s) | tokens/s | TTFT p50 (ms) | TPOT p50 (ms) |", "|---|---|---|---|---|"]
    exp1 = results.get("exp1", {})
    for policy, summary in exp1.get(str(results["requests"]), {}).items():
        lines.append(_table_row(f"exp1 {policy}", summary))
    for name, label in (("exp1_fused_eager", "exp1 fused, no CUDA graphs"),
                        ("exp1_no_prefill_graphs", "exp1 fused, decode graphs only"),
                        ("transformers_generate_batch", "transformers generate_batch (all at once)"),
                        ("fused_same_prompts", "fused, same prompts all at once")):
        summary = results.get(name, {})
        if "total_s" in summary:
            lines.append(_table_row(label, summary))
    for name in ("off", "on"):
        summary = results.get("prefix_reuse", {}).get(name, {})
        if "total_s" in summary:
            lines.append(_table_row(f"shared-prefix trace, prefix reuse {name}", summary))
    reuse = results.get("prefix_reuse", {})
    if "identical_answers" in reuse:
        lines += ["", f"Prefix reuse: {reuse['identical_answers']} / {reuse['answers']} greedy answers identical on and off"]
    steps = results.get("decode_steps", {})
    if "graphs" in steps:
        captured = f"{len(steps['graph_shapes'])} graphs captured" if "graph_shapes" in steps else "no graphs (CPU)"
        lines += ["", f"Decode iteration (forward inside it), ms; {captured}:", "",
                  "| batch | cuda_graphs=false | cuda_graphs=true | false / true | floor | true / floor |",
                  "|---|---|---|---|---|---|"]
        for eager, graph in zip(steps["eager"], steps["graphs"]):
            lines.append(f"| {eager['batch_size']} | {eager['step_s'] * 1e3:.2f} ({eager['forward_s'] * 1e3:.2f}) | "
                         f"{graph['step_s'] * 1e3:.2f} ({graph['forward_s'] * 1e3:.2f}) | "
                         f"{eager['step_s'] / graph['step_s']:.2f} | {graph['floor_s'] * 1e3:.2f} | {graph['ratio']:.2f} |")
    kernels = results.get("kernels", {}).get("rows", [])
    if kernels:
        lines += ["", "Triton kernels against their torch references (not wired into the model yet):", "",
                  "| kernel | max abs diff | triton (ms) | torch (ms) | torch / triton |", "|---|---|---|---|---|"]
        lines += [f"| {r['kernel']} | {r['max_abs_diff']:.2e} | {r['triton_ms']:.3f} | {r['torch_ms']:.3f} | "
                  f"{r['torch_over_triton']:.2f} |" for r in kernels]
    errors = [f"- {name}: {part['error']}" for name, part in results.items()
              if isinstance(part, dict) and "error" in part]
    return "\n".join(lines + (["", "Failed parts:", *errors] if errors else []))


def prefill_graphs_ab(base: dict, traces: dict, repeats: int, out: Path) -> dict:
    """Fused runs with and without prefill graphs, alternating, `repeats` times each per trace; written to
    `out/prefill_graphs_ab.{json,md}` after every run."""
    results: dict = {name: {"with": [], "without": []} for name in traces}
    for _ in range(repeats):
        for name, trace in traces.items():
            for side in ("with", "without"):
                summary = run_policies(base, trace, f"{name} {side}", ("fused",), prefill_graphs=side == "with")
                results[name][side].append(summary["fused"])
        lines = [("| trace | prefill graphs | total (s) | TTFT p50 (ms) | TTFT p99 (ms) | TPOT p50 (ms) | "
                  "TPOT p99 (ms) | mean latency (s) |"), "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {name} | {side} | {r['total_s']:.3f} | {r['ttft_p50_s'] * 1e3:.1f} | {r['ttft_p99_s'] * 1e3:.1f} | "
                  f"{r['tpot_p50_s'] * 1e3:.2f} | {r['tpot_p99_s'] * 1e3:.2f} | {r['mean_latency_s']:.3f} |"
                  for name, sides in results.items() for side, runs in sides.items() for r in runs]
        out.mkdir(parents=True, exist_ok=True)
        (out / "prefill_graphs_ab.json").write_text(json.dumps(results, indent=2))
        (out / "prefill_graphs_ab.md").write_text("\n".join(lines) + "\n")
    return results


def _table_row(label: str, summary: dict) -> str:
    """One run's row; TTFT and TPOT where the run measured them (transformers' batch call does not)."""
    latencies = [f"{summary[key] * 1e3:.1f}" if key in summary else "-" for key in ("ttft_p50_s", "tpot_p50_s")]
    return f"| {label} | {summary['total_s']:.2f} | {summary['tokens_per_s']:.1f} | {' | '.join(latencies)} |"


def main(argv: list[str] | None = None) -> int:
    """Run every part, most wanted first; print the table last; exit 1 if a part failed."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, few requests: checks the script")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu"))
    parser.add_argument("--prefill-graphs-ab", type=int, default=0, metavar="N",
                        help="only compare fused runs with and without prefill graphs, alternating, N times each")
    args = parser.parse_args(argv)
    if args.smoke:  # the Triton kernels run under the interpreter on this CPU; set before triton is imported
        os.environ["TRITON_INTERPRET"] = "1"
    model, device, dtype = ("builtin:tiny", "cpu", "float32") if args.smoke else ("builtin:1b", "cuda", "bfloat16")
    counts, gen_len = ([1, 4], 8) if args.smoke else ([1, 8, 32], 128)
    requests = counts[-1]
    base = {"model": model, "device": device, "dtype": dtype, "max_num_seqs": 32, "max_model_len": 512}
    results: dict = {"card": torch.cuda.get_device_name() if device == "cuda" else "cpu", "model": model,
                     "dtype": dtype, "requests": requests, "gen_len": gen_len}
    constant = {n: make_trace(n, interval_s=0.01, gen_len=(gen_len,) * 2) for n in counts}
    all_at_once = make_trace(requests, interval_s=0.0, gen_len=(gen_len,) * 2, seed=3)

    if args.prefill_graphs_ab:
        poisson = make_trace(requests, mean_gap_s=0.005, gen_len=(gen_len // 2, gen_len), seed=7)
        prefill_graphs_ab(base, {"exp1": constant[requests], "exp3_gap_5ms": poisson}, args.prefill_graphs_ab, args.out)
        print((args.out / "prefill_graphs_ab.md").read_text())
        return 0
    # Every time, first: a wrong token is worse than any figure below is good.
    equality = {"count": 4, "new_tokens": 8, "max_num_seqs": 4, "dtypes": ("float32",)} if args.smoke else {}
    run_part(results, "graphs_vs_eager", lambda: graphs_equal_eager(device, equality), args.out)
    run_part(results, "kernels", lambda: {"rows": kernel_check.smoke_rows() if args.smoke else kernel_check.gpu_rows()},
             args.out)
    run_part(results, "decode_steps", lambda: decode_steps(base, sorted({1, 8, requests})), args.out)
    # Experiments 1 and 2: constant arrivals, and throughput by requests in flight.
    run_part(results, "exp1", lambda: {str(n): run_policies(base, constant[n], f"exp1 N={n}") for n in counts},
             args.out)
    run_part(results, "exp1_fused_eager", lambda: run_policies({**base, "cuda_graphs": False}, constant[requests],
                                                               f"exp1 N={requests} eager", ("fused",))["fused"],
             args.out)
    run_part(results, "exp1_no_prefill_graphs", lambda: run_policies(
        base, constant[requests], f"exp1 N={requests} no prefill graphs", ("fused",), prefill_graphs=False)["fused"],
        args.out)
    run_part(results, "transformers_generate_batch",
             lambda: transformers_batch(resolve_model_path(model), all_at_once, getattr(torch, dtype), device), args.out)
    run_part(results, "fused_same_prompts",
             lambda: run_policies(base, all_at_once, "same prompts", ("fused",))["fused"], args.out)
    for gap_ms in (5.0, 20.0):  # experiment 3: Poisson arrivals
        trace = make_trace(requests, mean_gap_s=gap_ms / 1000, gen_len=(gen_len // 2, gen_len), seed=7)
        run_part(results, f"exp3_gap_{gap_ms:.0f}ms", lambda trace=trace, gap_ms=gap_ms: run_policies(
            base, trace, f"exp3 gap={gap_ms:.0f}ms"), args.out)
    # Issue 24's trace: 32 requests, Poisson 100 ms, a 320-token shared prefix + 16 own tokens, 64 new.
    shared = (shared_prefix_trace(seed=24, num_requests=4, prefix_len=24, own_len=8, max_tokens=8) if args.smoke
              else shared_prefix_trace(seed=24))
    run_part(results, "prefix_reuse", lambda: prefix_reuse(base, shared), args.out)
    print(summary_table(results))
    if not results["graphs_vs_eager"].get("ok"):
        print("\n" + "!" * 100 + "\nFAILED: CUDA graphs gave other tokens than eager decoding, or the comparison did "
              "not run (graphs_vs_eager above)\n" + "!" * 100, flush=True)
        return 1
    return 1 if any(isinstance(part, dict) and "error" in part for part in results.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
