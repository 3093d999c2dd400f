"""Markdown tables and plots of the experiments' results."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt

POLICIES = ("fused", "window", "instances")


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows), ""]


OTHER_RESULTS = {  # written by other commands into the same folder
    "inprocess.md": "`make bench-inprocess`: the three policies in-process, the decode step against its floor",
    "sampling.md": "`make bench-sampling`: the sampling step: per-row, batched in torch, batched in the C kernel",
    "soak.md": "`make soak`: 10 minutes of mixed traffic, lost / wrong counts and memory growth",
    "dashboard.png": "`make dashboard-snapshot`: the Grafana dashboard's panels from a recorded run",
    "vs_vllm.md": "experiment 6's table alone (its runs: vs_vllm.json); `--vllm-only` reruns just it",
    "refactor_step_ab.md": "`python -m benchmarks.step_time` from the checkouts before and after issue 25's "
                            "restructuring, in turns: the decode step at 1 / 8 / 32 rows",
    "prefix_vs_vllm.md": "issue 24's prefix-reuse traces against vLLM-CPU (its runs: prefix_vs_vllm.json); "
                         "`--prefix-only` reruns just them",
    "setting_ab_native_attention.md": "`python -m benchmarks.setting_ab --set native_attention=false`: the "
                                      "attention kernel against batched matmuls, steps in turns",
    "setting_ab_native_elementwise.md": "`python -m benchmarks.setting_ab --set native_elementwise=false`: the "
                                        "element-wise kernels against torch's operators, steps in turns",
    "setting_ab_native_small_gemm_1row.md": "`python -m benchmarks.setting_ab --set native_small_gemm=false "
                                            "--rows 1`: the few-row linear kernel against oneDNN's packed matmul",
    "setting_ab_native_small_gemm_4rows.md": "the same at `--rows 4`",
    "setting_ab_native_small_gemm_8rows.md": "the same at `--rows 8`",
    "gemm_table.md": "`python -m benchmarks.gemm_table`: the model's matmuls at 1 / 4 / 8 / 32 rows by MKL, oneDNN, "
                     "the few-row kernel and inductor",
    "server_overhead.md": "the overhead section alone (its runs: server_overhead.json); `--overhead-only` reruns it",
    "arena_ab.md": "`python -m benchmarks.arena_ab`: the decode forward through the arena object against the old 6-D "
                   "indexing, in turns at 1 / 8 / 32 rows",
    "prefix_reuse.md": "`python -m benchmarks.prefix_reuse`: prefix reuse on against off, in turns: issue 24's "
                       "shared-prefix trace, a multi-turn trace, and a copied position's cost against a computed one",
    "shared_prefix_attention.md": "`python -m benchmarks.shared_prefix_ab`: issue 24's shared-prefix trace in turns "
                                  "with `shared_prefix_attention` on and off: what reading a shared prefix once for "
                                  "all rows (a cascade over the arena's copies) pays",
    "prompt_logprobs_cost.md": "`python -m benchmarks.prompt_logprobs_cost`: a prompt's prefill iterations with and "
                               "without prompt logprobs, 8 neighbours decoding",
    "structured_output.json": "`python -m benchmarks.structured_output`: xgrammar against outlines-core (compile "
                              "and mask times), and what constrained rows add to the sampling step and the iteration",
    "log_copy.md": "`python -m benchmarks.log_copy`: the launcher's capped log copying tritonserver's output",
    "gpu/gpu_check.md": "`bash benchmarks/gpu_check.sh` on a lent NVIDIA H200 (`gpu/card.txt`), the fifth session",
    "gpu/run3/gpu_check.md": "the same script on another H200, on the code of the sixth session",
    "gpu/prefill_graphs_ab.md": "`python -m benchmarks.gpu_check --prefill-graphs-ab 3` on the H200: prefill graphs "
                                "on against off, in turns",
}
# The hand-written part of this folder's README (measurement notes, GPU runs, bounds) starts at this line;
# `make bench` rewrites the tables above it and keeps it.
NOTES_MARKER = "<!-- Hand-written below this line: `make bench` keeps it when it rewrites the tables above. -->"


def _kept_notes(readme: Path) -> list[str]:
    """The hand-written part of an existing results README, from NOTES_MARKER on; none without the marker."""
    text = readme.read_text() if readme.exists() else ""
    at = text.find(NOTES_MARKER)
    return [text[at:].rstrip("\n"), ""] if at >= 0 else []


def write_report(results: dict, out_dir: Path, name: str) -> str:
    """Write `README.md` (every table, linking the other results there) and `<name>_*.png` into `out_dir`;
    return a one-line summary."""
    lines = [f"# Experiments ({results['scale']['model']})", "",
             "Written by `make bench` (the seed's experiments through the server, and vLLM-CPU side by side).",
             "Figures vary 10-20% from run to run on this shared 2-core machine: compare ratios within a run.",
             "The notes after the tables (what the figures mean, the GPU runs, what was tried) are hand-written;",
             "each run keeps them.", ""]
    others = [f"- [{file}]({file}): {what}" for file, what in OTHER_RESULTS.items() if (out_dir / file).exists()]
    lines += ["Other results here:", "", *others, ""] if others else []
    exp1 = results["exp1_scaling"]["rows"]
    lines += ["## 1. N requests at a constant interval: total time (s) and speedup of fused", ""]
    lines += _table(["N", *POLICIES, "fused vs window", "fused vs instances"],
                    [[r["num_requests"], *(f"{r['total_s'][p]:.2f}" for p in POLICIES),
                      f"{r['speedup_vs']['window']:.2f}x", f"{r['speedup_vs']['instances']:.2f}x"] for r in exp1])
    exp2 = results["exp2_slowdown"]["rows"]
    lines += ["## 2. Throughput and per-request slowdown against a request alone (fused)", ""]
    lines += _table(["in flight", "tokens/s", "time per token p50 (ms)", "slowdown"],
                    [[r["in_flight"], f"{r['tokens_per_s']:.1f}", f"{r['tpot_p50_s'] * 1e3:.1f}",
                      f"{r['slowdown'] * 100:+.0f}%"] for r in exp2])
    exp3 = results["exp3_poisson"]["rows"]
    lines += ["## 3. Poisson arrivals: iterations, overlap, total time and speedup of fused", ""]
    lines += _table(["mean gap (ms)", *(f"{p} iterations" for p in POLICIES), "fused overlap",
                     *(f"{p} total (s)" for p in POLICIES), "fused vs window", "fused vs instances"],
                    [[f"{r['mean_gap_ms']:.0f}", *(f"{r[p]['iterations']:.0f}" for p in POLICIES),
                      f"{r['fused']['overlap'] * 100:.0f}%", *(f"{r[p]['total_s']:.2f}" for p in POLICIES),
                      f"{r['speedup_vs']['window']:.2f}x", f"{r['speedup_vs']['instances']:.2f}x"] for r in exp3])
    exp4 = results["exp4_uneven_lengths"]["rows"]
    variants = ("fused", "fused_no_compaction", "window")
    lines += ["## 4. Lengths ~ U(a, b): compaction on vs off vs dynamic batching", ""]
    lines += _table(["U(a, b)", *(f"{v} total (s)" for v in variants), *(f"{v} iterations" for v in variants),
                     "bytes moved by compaction"],
                    [[f"U({r['gen_len'][0]}, {r['gen_len'][1]})", *(f"{r[v]['total_s']:.2f}" for v in variants),
                      *(f"{r[v]['iterations']:.0f}" for v in variants), f"{r['fused']['compaction_bytes'] / 1e6:.1f} MB"]
                     for r in exp4])
    over = results["overhead"]
    lines += ["## Triton's own overhead and the decode step against this machine's floor", ""]
    lines += overhead_section(over)
    lines += _table(["batch", "decode step (ms)", "floor (ms)", "step / floor"],
                    [[r["batch_size"], f"{r['step_s'] * 1e3:.1f}", f"{r['floor_s'] * 1e3:.1f}", f"{r['ratio']:.2f}"]
                     for r in over["decode_steps"]])
    if "exp6_vs_vllm" in results:
        lines += peer_section(results["exp6_vs_vllm"])
    lines += ["## perf_analyzer (streaming over gRPC, requests/s)", "",
              ", ".join(f"{m}: {v:.2f}" for m, v in results["perf_analyzer_requests_per_s"].items())
              + " (full reports: `perf_<model>.txt`).", ""]
    heavy = results["exp5_heavy_trace"]
    lines += ["## 5. The heaviest Poisson trace over time", "",
              f"![cumulative tokens]({name}_cumulative_tokens.png) ![in flight]({name}_in_flight.png)", ""]
    _plot_over_time(heavy, out_dir, name)
    _plot_scaling(exp1, out_dir, name)
    lines += [f"![total time vs N]({name}_scaling.png)", ""]
    lines += _kept_notes(out_dir / "README.md")
    (out_dir / "README.md").write_text("\n".join(lines))
    last = exp1[-1]
    return (f"{name}: N={last['num_requests']} fused {last['total_s']['fused']:.1f}s, "
            f"{last['speedup_vs']['instances']:.1f}x faster than instances, {last['speedup_vs']['window']:.1f}x than "
            f"window; results in {out_dir / 'README.md'}")


def overhead_section(over: dict) -> list[str]:
    """The same traces in-process and through Triton, in turns: each round's figures and the median ratios."""
    lines = [(f"All requests at once, in-process, then through the server over gRPC and over HTTP (both streamed), "
              f"{over['rounds']} rounds in turns; server / in-process is the median over rounds."), ""]
    rows = []
    for case in over["cases"]:
        shape = f"{case['streams']} x {case['gen_len']}"
        for number, run in enumerate(case["runs"], 1):
            rows.append([shape, number, *(" / ".join(f"{side[key] * scale:.{digits}f}" for side in run.values())
                                          for key, scale, digits in (("tokens_per_s", 1, 1), ("tpot_p50_s", 1e3, 1),
                                                                     ("ttft_p50_s", 1e3, 0)))])
        ratio = case["server_over_in_process"]
        rows.append([shape, "gRPC / HTTP over in-process", " / ".join(f"{r['tokens_per_s']:.3f}" for r in ratio.values()),
                     " / ".join(f"{r['tpot_p50_s']:.3f}" for r in ratio.values()), ""])
    sides = "in-process / gRPC / HTTP"
    return lines + _table(["streams x tokens", "round", f"tokens/s {sides}", f"TPOT p50 (ms) {sides}",
                           f"TTFT p50 (ms) {sides}"], rows)


def peer_section(peer: dict) -> list[str]:
    """Experiment 6 as Markdown: per trace, each side's best run (by tokens/s) and the ratio of the two."""
    repeats = len(next(iter(peer["cases"].values()))["runs"]["vllm"])
    lines = ["## 6. Against vLLM's CPU build: same checkpoint, same traces, alternating runs", "",
             (f"vLLM: {peer['vllm']}. Each side's best run of {repeats} by tokens/s; ITL is the gap between two "
              "tokens of a stream. Both sides stream server-sent events over HTTP: flover Triton's "
              "`generate_stream`, vLLM `/v1/completions`. Each run sends prompts neither side has seen (the same "
              "arrivals and lengths each run), since vLLM's prefix cache would serve a replayed prompt."), ""]
    rows = []
    for name, case in peer["cases"].items():
        best = {side: max(runs, key=lambda r: r["tokens_per_s"]) for side, runs in case["runs"].items()}
        f, v = best["flover"], best["vllm"]
        rows.append([name, f"{f['tokens_per_s']:.1f}", f"{v['tokens_per_s']:.1f}", f"**{case['flover_over_vllm']:.2f}**",
                     f"{f['ttft_p50_s'] * 1e3:.0f} / {v['ttft_p50_s'] * 1e3:.0f}",
                     f"{f['tpot_p50_s'] * 1e3:.1f} / {v['tpot_p50_s'] * 1e3:.1f}",
                     f"{f['itl_p50_s'] * 1e3:.1f} / {f['itl_p99_s'] * 1e3:.1f}",
                     f"{v['itl_p50_s'] * 1e3:.1f} / {v['itl_p99_s'] * 1e3:.1f}"])
    lines += _table(["trace", "flover tok/s", "vLLM tok/s", "flover / vLLM", "TTFT p50 flover / vLLM (ms)",
                     "TPOT p50 flover / vLLM (ms)", "flover ITL p50 / p99 (ms)", "vLLM ITL p50 / p99 (ms)"], rows)
    lines += [f"- {name}: {case['description']}" for name, case in peer["cases"].items()] + [""]
    mixed = peer["cases"].get("mixed prompts")
    if mixed:
        split = {side: max(runs, key=lambda r: r["tokens_per_s"]) for side, runs in mixed["runs"].items()}
        lines += [("Mixed prompts, TTFT p50 of the best runs: prompts up to 64 tokens "
                   f"{split['flover'].get('ttft_p50_short_prompts_s', float('nan')) * 1e3:.0f} ms flover / "
                   f"{split['vllm'].get('ttft_p50_short_prompts_s', float('nan')) * 1e3:.0f} ms vLLM; from 256 tokens "
                   f"{split['flover'].get('ttft_p50_long_prompts_s', float('nan')) * 1e3:.0f} / "
                   f"{split['vllm'].get('ttft_p50_long_prompts_s', float('nan')) * 1e3:.0f} ms."), ""]
    lines += [f"Flover sampled / greedy (best runs): {peer['flover_sampled_over_greedy']:.2f}.", ""]
    return lines


def _plot_over_time(heavy: dict[str, list[dict]], out_dir: Path, name: str) -> None:
    """The seed's Fig. 6: cumulative tokens over time, and requests in flight over time, per policy."""
    fig_tokens, ax_tokens = plt.subplots(figsize=(6, 4))
    fig_flight, ax_flight = plt.subplots(figsize=(6, 4))
    for policy, timings in heavy.items():
        start = min(t["arrival"] for t in timings)  # each policy replayed the trace on its own clock
        times = sorted(x - start for t in timings for x in t["token_times"])
        ax_tokens.plot(times, range(1, len(times) + 1), label=policy)
        events = sorted([(t["arrival"] - start, 1) for t in timings] + [(t["end"] - start, -1) for t in timings])
        level, xs, ys = 0, [0.0], [0]
        for at, step in events:
            level += step
            xs.append(at)
            ys.append(level)
        ax_flight.step(xs, ys, where="post", label=policy)
    ax_tokens.set(xlabel="seconds", ylabel="tokens generated", title="Cumulative tokens")
    ax_flight.set(xlabel="seconds", ylabel="requests in flight", title="Requests in flight")
    for fig, ax, suffix in ((fig_tokens, ax_tokens, "cumulative_tokens"), (fig_flight, ax_flight, "in_flight")):
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / f"{name}_{suffix}.png", dpi=100)
        plt.close(fig)


def _plot_scaling(rows: list[dict], out_dir: Path, name: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    counts = [r["num_requests"] for r in rows]
    for policy in POLICIES:
        ax.plot(counts, [r["total_s"][policy] for r in rows], marker="o", label=policy)
    ax.set(xlabel="requests (constant interval)", ylabel="total time (s)", xscale="log", yscale="log",
           title="Total time vs number of requests")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / f"{name}_scaling.png", dpi=100)
    plt.close(fig)
