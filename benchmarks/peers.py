"""Experiment 6 and perf_analyzer: flover against vLLM's CPU build on the same checkpoint and trace, and
perf_analyzer's own latency/throughput report for every model."""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

from benchmarks.vllm_peer import CACHE_DIR, VllmServer
from clients.loadgen import openai_sender, replay
from clients.perf_analyzer import parse_throughput, perf_analyzer_command, perf_analyzer_env, write_input_data
from clients.workload import make_trace, summarize
from flover_backend.models.builtin import export_builtin

PEER_KEYS = ("tokens_per_s", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "total_s")
MODES = ("greedy", "sampled")


def against_vllm(bench, num_requests: int = 32, gen_len: int = 128, repeats: int = 3) -> dict:
    """The same trace through flover (Triton) and vLLM serving the built-in small checkpoint, alternating,
    greedy and sampled (temperature 0.8, top_p 0.9, a seed per request)."""
    checkpoint = export_builtin("small", CACHE_DIR / "builtin-small-hf")
    trace = make_trace(num_requests, interval_s=0.0, gen_len=(gen_len, gen_len), seed=11)
    runs: dict[str, list[dict]] = {f"{server} {mode}": [] for mode in MODES for server in ("flover", "vllm")}
    with VllmServer(checkpoint, "builtin-small", max_model_len=512, max_num_seqs=32) as vllm:
        replay(make_trace(2, interval_s=0.0, gen_len=(4, 4)), openai_sender(vllm.base_url, "builtin-small"),
               show_progress=False)  # warm-up
        for attempt in range(repeats):
            for mode in MODES:
                sampled = mode == "sampled"
                label = f"exp6 {mode} run {attempt + 1}"
                runs[f"flover {mode}"].append(_pick(bench.run("flover", trace, f"{label} flover", sampled)[1]))
                summary = summarize(replay(trace, openai_sender(vllm.base_url, "builtin-small", sampled),
                                           label=f"{label} vllm"))
                print(f"  {label + ' vllm':<28} total {summary['total_s']:7.2f}s  "
                      f"{summary['tokens_per_s']:7.1f} tok/s  TTFT p50 {summary['ttft_p50_s'] * 1e3:6.0f} ms", flush=True)
                runs[f"vllm {mode}"].append(_pick(summary))
    best = {name: max(r["tokens_per_s"] for r in side) for name, side in runs.items()}
    return {"num_requests": num_requests, "gen_len": gen_len, "runs": runs,
            "flover_over_vllm": {mode: best[f"flover {mode}"] / best[f"vllm {mode}"] for mode in MODES},
            "flover_sampled_over_greedy": best["flover sampled"] / best["flover greedy"]}


def _pick(summary: dict) -> dict:
    return {key: summary[key] for key in PEER_KEYS}


def perf_reports(grpc_url: str, models: list[str], out_dir: Path, max_tokens: int, concurrency: int,
                 request_count: int) -> dict:
    """Run perf_analyzer (streaming, gRPC) against each model; save each report; return requests/s."""
    input_data = write_input_data(out_dir / "perf_input.json", [
        {"text_input": ["The quick brown fox"], "max_tokens": [max_tokens], "ignore_eos": [True]}])
    throughput = {}
    for model in models:
        command = perf_analyzer_command(model, grpc_url, concurrency, input_data, 5000, request_count=request_count)
        done = subprocess.run(command, env=perf_analyzer_env(), capture_output=True, text=True, check=False,
                              timeout=600)
        (out_dir / f"perf_{model}.txt").write_text(f"$ {' '.join(command)}\n\n{done.stdout}{done.stderr}")
        if done.returncode != 0:
            raise RuntimeError(f"perf_analyzer failed on {model} ({done.returncode}):\n{done.stdout[-2000:]}")
        throughput[model] = parse_throughput(done.stdout)[0]
        print(f"  perf_analyzer {model:<14} {throughput[model]:.2f} requests/s at concurrency {concurrency}",
              flush=True)
    return throughput


def main(argv: list[str] | None = None) -> int:
    """`make perf`: perf_analyzer against a running server (`make serve`), reports in benchmarks/results."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--url", default="127.0.0.1:8001")
    parser.add_argument("--models", nargs="+", default=["flover"])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--request-count", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    perf_reports(args.url, args.models, args.out, args.max_tokens, args.concurrency, args.request_count)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
