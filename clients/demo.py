"""`make demo`: start the server, send a burst of requests at random times and lengths, watch the loop fuse them."""

from __future__ import annotations

import argparse
import re
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from clients.loadgen import replay, triton_sender
from clients.workload import RequestTiming, make_trace, summarize
from flover_backend.ports import server_ports
from flover_backend.server.repository import derive_repository
from flover_backend.server.serve import TritonServer

METRIC_LINE = re.compile(r'^(flover_\w+)\{[^}]*model="flover"[^}]*\} (\S+)$', re.MULTILINE)


def read_metrics(url: str) -> dict[str, float]:
    """The flover model's metrics from the server's Prometheus page."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return {name: float(value) for name, value in METRIC_LINE.findall(text)}


def view(timings: list[RequestTiming], metrics: dict[str, float], started: float) -> Table:
    """One frame: the loop's counters and each request's state as a bar."""
    table = Table(title=f"flover: one loop, requests join at every iteration  (t = {time.monotonic() - started:5.1f}s)")
    for column in ("iterations", "in flight", "waiting", "tokens", "arrived", "finished"):
        table.add_column(column, justify="right")
    arrived = sum(t.arrival > 0 for t in timings)
    finished = sum(t.end is not None for t in timings)
    table.add_row(f"{metrics.get('flover_iterations_total', 0):.0f}", f"{metrics.get('flover_requests_running', 0):.0f}",
                  f"{metrics.get('flover_requests_waiting', 0):.0f}",
                  f"{metrics.get('flover_generated_tokens_total', 0):.0f}", f"{arrived}/{len(timings)}",
                  str(finished))
    bars = "".join("·" if t.arrival == 0 else "█" if t.end else "▒" for t in timings)
    table.caption = f"requests  {bars}   (· not yet arrived  ▒ generating  █ done)"
    return table


def main(argv: list[str] | None = None) -> int:
    """Run the demo end to end and print a summary."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="builtin:small")
    parser.add_argument("--num-requests", type=int, default=24)
    parser.add_argument("--mean-gap-ms", type=float, default=150.0)
    parser.add_argument("--gen-len", type=int, nargs=2, default=[16, 96])
    args = parser.parse_args(argv)
    console = Console()
    trace = make_trace(args.num_requests, mean_gap_s=args.mean_gap_ms / 1000, gen_len=tuple(args.gen_len), seed=1)
    with tempfile.TemporaryDirectory(prefix="flover-demo-") as tmp:
        repo = derive_repository(Path(tmp) / "repo", ["flover"], {"model": args.model})
        ports = server_ports()
        console.print(f"starting tritonserver with {args.model} (first start writes the built-in checkpoint)...")
        with TritonServer(repo, **ports, log_path=Path(tmp) / "server.log") as server:
            console.print(f"ready: http {server.http_url}  grpc {server.grpc_url}  metrics {server.metrics_url}")
            timings = [RequestTiming(arrival=0.0) for _ in trace]
            worker = threading.Thread(target=replay, args=(trace, triton_sender(server.grpc_url, "flover")),
                                      kwargs={"show_progress": False, "timings": timings})
            started = time.monotonic()
            worker.start()
            with Live(console=console, refresh_per_second=10) as live:
                while worker.is_alive():
                    live.update(view(timings, read_metrics(server.metrics_url), started))
                    time.sleep(0.1)
                live.update(view(timings, read_metrics(server.metrics_url), started))
    summary = summarize(timings)
    console.print(f"{summary['num_requests']} requests, {summary['total_tokens']} tokens in {summary['total_s']:.1f}s "
                  f"({summary['tokens_per_s']:.1f} tok/s); time to first token p50 {summary['ttft_p50_s'] * 1e3:.0f} ms, "
                  f"p99 {summary['ttft_p99_s'] * 1e3:.0f} ms; time per output token p50 "
                  f"{summary['tpot_p50_s'] * 1e3:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
