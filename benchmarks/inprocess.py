"""`make bench-inprocess`: the policies compared in-process on one trace, and the decode step against the floor."""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import threading
import time
from pathlib import Path

from benchmarks.floors import decode_floor, linear_rate, matmul_rate, memory_bandwidth, weight_footprint
from clients.workload import RequestTiming, TraceRequest, make_trace, summarize
from flover_backend import Engine, EngineConfig, RequestOutput, SamplingParams


def replay(engine: Engine, trace: list[TraceRequest], answers: list[list[int]] | None = None) -> list[RequestTiming]:
    """Send each trace request at its arrival time to a running engine; wait for all; return timings (and, into
    `answers` where given, each request's tokens)."""
    timings = [RequestTiming(arrival=0.0) for _ in trace]
    if answers is not None:
        answers[:] = [[] for _ in trace]
    remaining = threading.Semaphore(0)

    def recorder(index: int):
        timing = timings[index]

        def on_output(output: RequestOutput) -> None:
            now = time.monotonic()
            timing.token_times.extend([now] * len(output.new_token_ids))
            if answers is not None:
                answers[index].extend(output.new_token_ids)
            if output.finished:
                timing.end, timing.finish_reason = now, output.finish_reason
                remaining.release()
        return on_output

    start = time.monotonic()
    for index, (item, timing) in enumerate(zip(trace, timings)):
        time.sleep(max(0.0, start + item.arrival_s - time.monotonic()))
        timing.arrival = time.monotonic()
        params = SamplingParams(max_tokens=item.max_tokens, ignore_eos=True)
        engine.add_request(prompt_token_ids=list(item.prompt_token_ids), params=params, on_output=recorder(index))
    for _ in trace:
        remaining.acquire()
    return timings


def measure(engine: Engine, trace: list[TraceRequest]) -> dict:
    """Warm the engine up, replay `trace`, and summarize it with the iterations the loop ran for it."""
    replay(engine, make_trace(2, interval_s=0.0, gen_len=(4, 4), prompt_len=len(trace[0].prompt_token_ids)))
    before = engine.stats.num_iterations
    summary = summarize(replay(engine, trace))
    summary["iterations"] = engine.stats.num_iterations - before
    return summary


def decode_step_seconds(engine: Engine, batch_size: int, steps: int = 12) -> tuple[float, float]:
    """Medians of a whole fused iteration with `batch_size` requests decoding (schedule, forward, LM head,
    sampling, detokenizing; the output callbacks come after the clock stops), and of its decode forward
    alone; the difference is the iteration's work around the forward."""
    before = engine.stats.num_iterations
    trace = make_trace(batch_size, interval_s=0.0, gen_len=(steps + 2, steps + 2), seed=batch_size)
    replay(engine, trace)
    records = engine.stats.recent(engine.stats.num_iterations - before)
    pure = [r for r in records if r.num_decode == batch_size and r.num_prefill == 0]
    return statistics.median(r.seconds for r in pure), statistics.median(r.decode_seconds for r in pure)


def run(args: argparse.Namespace) -> dict:
    """Run every policy on the same trace, then the decode-step sweep; print and write the results."""
    trace = make_trace(args.num_requests, interval_s=args.interval_ms / 1000, gen_len=(args.max_tokens,) * 2,
                       prompt_len=args.prompt_len, seed=args.seed)
    base = {"model": args.model, "max_num_seqs": max(args.num_requests, max(args.batch_sizes)),
            "max_model_len": args.prompt_len + max(args.max_tokens, 16) + 16, "num_threads": args.threads}
    results: dict = {"settings": vars(args), "policies": {}}
    for policy in args.policies:
        config = EngineConfig(**base, policy=policy, window_ms=args.window_ms)
        with Engine(config) as engine:
            summary = measure(engine, trace)
            results["policies"][policy] = summary
            print(f"{policy:>7}: total {summary['total_s']:.2f}s  {summary['tokens_per_s']:.1f} tok/s  "
                  f"TTFT p50 {summary['ttft_p50_s'] * 1e3:.0f}ms p99 {summary['ttft_p99_s'] * 1e3:.0f}ms", flush=True)
            if policy == "fused":
                results["decode_steps"] = decode_sweep(engine, args.batch_sizes)
    fused = results["policies"].get("fused")
    if fused:
        results["speedup_of_fused"] = {p: s["total_s"] / fused["total_s"] for p, s in results["policies"].items()}
    _write(results, Path(args.out))
    return results


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.inprocess [options]`: run, and exit 0."""
    run(parse_args(argv))
    return 0


def decode_sweep(engine: Engine, batch_sizes: list[int]) -> list[dict]:
    """Decode step time at each batch size next to this machine's floor for the model, printed and returned."""
    runner = engine.runner
    weight_bytes, num_params = weight_footprint(runner.model)
    # On the engine's thread, like its steps: torch work on this one would slow both (see engine_thread).
    bandwidth = engine.call(lambda: memory_bandwidth(runner.device))
    flops = engine.call(lambda: matmul_rate(runner.device, runner.dtype))
    rows = []
    for batch_size in batch_sizes:
        step, forward = decode_step_seconds(engine, batch_size)
        floor = decode_floor(weight_bytes, num_params, batch_size, bandwidth, flops)
        layers_rate = engine.call(functools.partial(linear_rate, runner.model, batch_size))
        rows.append({"batch_size": batch_size, "step_s": step, "forward_s": forward, "floor_s": floor,
                     "ratio": step / floor, "bandwidth_gb_s": bandwidth / 1e9, "matmul_gflop_s": flops / 1e9,
                     "model_matmuls_gflop_s": layers_rate / 1e9})
        print(f"decode step at batch {batch_size:>2}: {step * 1e3:.2f} ms, forward {forward * 1e3:.2f} ms "
              f"(floor {floor * 1e3:.2f} ms, step {step / floor:.2f}x); the model's matmuls alone "
              f"{layers_rate / 1e9:.0f} GFLOP/s (square GEMM {flops / 1e9:.0f})", flush=True)
    return rows


def _write(results: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "inprocess.json").write_text(json.dumps(results, indent=2))
    lines = ["| policy | total (s) | speedup of fused | tokens/s | TTFT p50 (ms) | TTFT p99 (ms) | iterations |",
             "|---|---|---|---|---|---|---|"]
    for policy, s in results["policies"].items():
        speedup = results.get("speedup_of_fused", {}).get(policy, float("nan"))
        lines.append(f"| {policy} | {s['total_s']:.2f} | {speedup:.2f}x | {s['tokens_per_s']:.1f} | "
                     f"{s['ttft_p50_s'] * 1e3:.0f} | {s['ttft_p99_s'] * 1e3:.0f} | {s['iterations']} |")
    if "decode_steps" in results:
        lines += ["", "| batch | decode step (ms) | floor (ms) | step / floor | the model's matmuls alone (GFLOP/s) |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['batch_size']} | {r['step_s'] * 1e3:.1f} | {r['floor_s'] * 1e3:.1f} | {r['ratio']:.2f} | "
                  f"{r['model_matmuls_gflop_s']:.0f} |" for r in results["decode_steps"]]
        first = results["decode_steps"][0]
        lines.append(f"\nMeasured here: memory bandwidth {first['bandwidth_gb_s']:.1f} GB/s, "
                     f"fp32 square matmul (2048) {first['matmul_gflop_s']:.0f} GFLOP/s.")
    (out_dir / "inprocess.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out_dir / 'inprocess.json'} and {out_dir / 'inprocess.md'}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's options."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="builtin:small")
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--interval-ms", type=float, default=50.0)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--window-ms", type=float, default=100.0)
    parser.add_argument("--policies", nargs="+", default=["fused", "window", "solo"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results")
    return parser.parse_args(argv)


if __name__ == "__main__":
    raise SystemExit(main())
