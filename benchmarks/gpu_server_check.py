"""The real server on the GPU: tritonserver from the bundle (gpu_server_bundle.py), 1 and 32 streams through HTTP
`generate_stream` beside the same requests in-process; what the server costs per token.

Run by benchmarks/gpu_check.sh on the lent GPU (its bundle built here first, benchmarks/results/README.md "On a lent GPU"); on a CPU with
the tiny model it is the same path (tests/test_gpu_server_bundle.py). Writes server_gpu.json and server_gpu.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from benchmarks.gpu_server_bundle import archive_name, unpack_bundle
from benchmarks.inprocess import measure
from clients.loadgen import replay, triton_http_sender
from clients.triton_stream import stream_http
from clients.workload import make_trace, summarize
from flover_backend import Engine, EngineConfig
from flover_backend.execution.arena_sizing import row_bytes, rows_that_fit
from flover_backend.ports import server_ports
from flover_backend.server.repository import derive_repository
from flover_backend.server.serve import TritonServer

KEYS = ("tokens_per_s", "tpot_p50_s", "ttft_p50_s")


def device_name(device: str) -> str:
    """The GPU's name, or the CPU's model name (as lscpu gives it)."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    try:
        lines = subprocess.run(["lscpu"], check=False, capture_output=True, text=True, timeout=10).stdout.splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name"))
    except (OSError, StopIteration, subprocess.SubprocessError):
        return platform.processor() or "unknown CPU"


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Set `values` in os.environ for the block, then put back what was there."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def measure_in_turns(settings: dict, streams: list[int], gen_len: int, prompt_len: int, rounds: int, tmp: Path,
                     ready_timeout_s: float) -> dict:
    """tritonserver (whatever FLOVER_TRITON_DIST names) and an in-process engine of the same settings side by side:
    per round and stream count the trace in-process, then over HTTP, in turns so the machine's noise falls on both."""
    repo = derive_repository(tmp / "repo", ["flover"], {k: str(v) for k, v in settings.items()})
    ports = server_ports()
    log = tmp / "server.log"
    runs: dict[int, list[dict]] = {n: [] for n in streams}
    with TritonServer(repo, **ports, log_path=log, ready_timeout_s=ready_timeout_s) as server, \
            Engine(EngineConfig(**settings)) as engine:
        # A text input first: with NumPy 2 in the stub, exactly this request killed it (README "GPUs").
        chunks = list(stream_http(server.http_url, "flover", text_input="Temporal fusion", max_tokens=4,
                                  ignore_eos=True, timeout_s=120))
        if not chunks or chunks[-1].finish_reason != "length":
            raise RuntimeError(f"the first text request ended wrongly: {chunks}")
        send = triton_http_sender(server.http_url, "flover")
        for _ in range(rounds):
            for n in streams:
                trace = make_trace(n, interval_s=0.0, gen_len=(gen_len, gen_len), prompt_len=prompt_len, seed=3)
                local = measure(engine, trace)  # warms the engine up first, as the next line does the server
                replay(make_trace(2, interval_s=0.0, gen_len=(4, 4), prompt_len=prompt_len), send, show_progress=False)
                served = summarize(replay(trace, send, show_progress=False))
                _print("in-process", n, gen_len, local)
                _print("HTTP", n, gen_len, served)
                runs[n].append({"in_process": {k: local[k] for k in KEYS}, "http": {k: served[k] for k in KEYS}})
        rows = engine.call(lambda: rows_for(engine, 0.9)) if engine.runner.device.type == "cuda" else None
        binary = server.command()[0]
    arena = next((line.strip() for line in log.read_text(errors="replace").splitlines() if "KV arena" in line), "")
    return {"tritonserver": binary, "arena": arena, "gpu_memory_utilization_0.9_rows": rows,
            "rows": [compare(n, pairs) for n, pairs in runs.items()]}


def _print(side: str, streams: int, gen_len: int, summary: dict) -> None:
    print(f"  {side:<10} {streams:>3} x {gen_len}: {summary['tokens_per_s']:8.1f} tok/s  "
          f"TPOT p50 {summary['tpot_p50_s'] * 1e3:6.2f} ms  TTFT p50 {summary['ttft_p50_s'] * 1e3:6.1f} ms", flush=True)


def compare(streams: int, pairs: list[dict]) -> dict:
    """One stream count's rounds, and the medians over them of the server's cost per token (ms): added time per
    output token, and added ms per token of throughput; with HTTP / in-process tokens/s."""
    def median(key: str, side: str) -> float:
        return statistics.median(pair[side][key] for pair in pairs)

    return {"streams": streams, "rounds": pairs,
            "in_process": {k: median(k, "in_process") for k in KEYS}, "http": {k: median(k, "http") for k in KEYS},
            "tpot_added_ms": statistics.median((p["http"]["tpot_p50_s"] - p["in_process"]["tpot_p50_s"]) * 1e3
                                               for p in pairs),
            "ms_per_token_added": statistics.median(
                (1 / p["http"]["tokens_per_s"] - 1 / p["in_process"]["tokens_per_s"]) * 1e3 for p in pairs),
            "tokens_per_s_ratio": statistics.median(p["http"]["tokens_per_s"] / p["in_process"]["tokens_per_s"]
                                                    for p in pairs)}


def rows_for(engine: Engine, utilization: float) -> int:
    """The arena rows gpu_memory_utilization would give this engine's model beside what it holds now (uncapped);
    the arena it has counts as free, since that setting would size it instead."""
    import torch

    c, runner = engine.runner.model.config, engine.runner
    free, total = torch.cuda.mem_get_info(runner.device)
    per_row = row_bytes(c.num_layers, c.num_kv_heads, c.head_dim, engine.config.max_model_len,
                        runner.arena.tensor.element_size(), c.vocab_size)
    rows = rows_that_fit(free + runner.arena.nbytes, total, utilization, per_row, cap=10**9)
    print(f"  gpu_memory_utilization {utilization}: {rows} rows of max_model_len {engine.config.max_model_len} "
          f"({per_row / 2**20:.1f} MiB each; {free / 2**30:.1f} of {total / 2**30:.1f} GiB free now)", flush=True)
    return rows


def sizing_on_card(device: str, cap: int = 64) -> dict:
    """The engine's own gpu_memory_utilization path on the card: builtin:tiny at 0.9 must take `cap` rows (an
    H200 holds far more); an error is recorded, not raised, so the server's figures above still get written."""
    try:
        config = EngineConfig(model="builtin:tiny", device=device, max_num_seqs=cap, max_model_len=256,
                              gpu_memory_utilization=0.9)
        with Engine(config) as engine:
            rows = engine.config.max_num_seqs
            ok = rows == engine.runner.arena.tensor.shape[2] == engine.stats.num_rows == cap
    except Exception as exc:  # noqa: BLE001 - reported in the results and on stdout
        print(f"  gpu_memory_utilization sizing FAILED: {exc!r}", flush=True)
        return {"error": repr(exc)}
    print(f"  gpu_memory_utilization 0.9, max_num_seqs {cap}, builtin:tiny: {rows} rows "
          f"({'as expected' if ok else f'FAILED: expected {cap}'})", flush=True)
    return {"rows": rows, "expected": cap, "ok": ok}


def markdown(results: dict) -> str:
    """The results as a table, with the device and the settings."""
    s = results["settings"]
    lines = [f"# The server on {results['device_name']}: HTTP generate_stream against in-process", "",
             (f"{s['model']} {s['dtype']} on {s['device']}, max_num_seqs {s['max_num_seqs']}, all streams at once, "
              f"prompt {results['prompt_len']} tokens, {results['gen_len']} new tokens each, greedy; medians of "
              f"{results['rounds']} rounds, in-process and HTTP in turns. Stub arena: {results['arena'] or 'not logged'}."), "",
             ("| streams | tok/s in-process / HTTP | TPOT p50 ms in-process / HTTP | TTFT p50 ms in-process / HTTP | "
              "server's TPOT added (ms) | server's ms per token of throughput |"), "|---|---|---|---|---|---|"]
    for r in results["rows"]:
        i, h = r["in_process"], r["http"]
        lines.append(f"| {r['streams']} | {i['tokens_per_s']:.1f} / {h['tokens_per_s']:.1f} | "
                     f"{i['tpot_p50_s'] * 1e3:.2f} / {h['tpot_p50_s'] * 1e3:.2f} | "
                     f"{i['ttft_p50_s'] * 1e3:.1f} / {h['ttft_p50_s'] * 1e3:.1f} | {r['tpot_added_ms']:+.3f} | "
                     f"{r['ms_per_token_added']:+.4f} |")
    if results.get("gpu_memory_utilization_0.9_rows"):
        lines.append(f"\n`gpu_memory_utilization` 0.9 would give this model {results['gpu_memory_utilization_0.9_rows']} "
                     f"rows of max_model_len {s['max_model_len']} on this card.")
    if "sizing_check" in results:
        lines.append(f"\nThe engine's own sizing (builtin:tiny, 0.9, cap 64): {results['sizing_check']}.")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> dict:
    """Unpack, serve, measure both sides, write the files; return the results."""
    settings = {"model": args.model, "device": args.device, "dtype": args.dtype, "max_num_seqs": max(args.streams),
                "max_model_len": args.prompt_len + args.gen_len + 16}
    if not args.bundle.is_file():
        raise SystemExit(f"no {args.bundle}: build it on a machine with pytriton first (benchmarks/results/README.md, 'The Triton server on a lent GPU'): "
                         "python -m benchmarks.gpu_server_bundle --python 3.12 --download-numpy")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="flover-gpu-server-") as tmp:
        env = unpack_bundle(args.bundle, Path(tmp) / "bundle")
        print(f"unpacked {args.bundle} in {time.monotonic() - started:.1f}s: {env}", flush=True)
        with environment(env):  # the launcher and the stub's prefix read them
            measured = measure_in_turns(settings, args.streams, args.gen_len, args.prompt_len, args.rounds,
                                        Path(tmp), args.ready_timeout_s)
    if args.device.startswith("cuda"):
        measured["sizing_check"] = sizing_on_card(args.device)
    results = {"device_name": device_name(args.device), "settings": settings, "gen_len": args.gen_len,
               "prompt_len": args.prompt_len, "rounds": args.rounds, **measured,
               "seconds": time.monotonic() - started}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "server_gpu.json").write_text(json.dumps(results, indent=2))
    (args.out / "server_gpu.md").write_text(markdown(results))
    for r in results["rows"]:
        print(f"server cost at {r['streams']} streams: TPOT {r['tpot_added_ms']:+.3f} ms, "
              f"{r['ms_per_token_added']:+.4f} ms per token of throughput "
              f"(HTTP / in-process tok/s {r['tokens_per_s_ratio']:.3f}) on {results['device_name']}", flush=True)
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The check's options; the defaults are the GPU run's."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=Path(".gpu_bundle") / archive_name("3.12"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu"))
    parser.add_argument("--model", default="builtin:1b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--gen-len", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ready-timeout-s", type=float, default=180.0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the check; a failure raises, so the exit status says so."""
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
