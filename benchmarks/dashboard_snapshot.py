"""The Grafana dashboard's panels drawn with matplotlib from a recorded run: `make dashboard-snapshot`.

No Grafana runs here. This serves `flover` with tritonserver, replays two load generator traces against it
(a gentle Poisson one, then a burst bigger than the arena), reads the metrics page every second, and
evaluates each panel's queries of docker/grafana/dashboards/flover.json over those pages. Rates and
quantiles use a window of `--window-s` seconds where Grafana's `$__rate_interval` is longer.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt

from benchmarks.dashboard_queries import Sample, evaluate, parse_page
from flover_backend.ports import server_ports
from flover_backend.server.repository import derive_repository
from flover_backend.server.serve import TritonServer

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "flover.json"
MODEL = "flover"
# (loadgen arguments, label): the burst holds more requests than the arena's 16 rows, so some wait.
TRACES = [(["--num-requests", "16", "--mean-gap-ms", "600", "--gen-len", "16", "96", "--seed", "1"], "gentle"),
          (["--num-requests", "40", "--mean-gap-ms", "40", "--gen-len", "16", "128", "--seed", "2"], "burst")]
UNITS = {"Bps": ("MB/s", 1e-6), "percentunit": ("%", 100.0), "reqps": ("requests/s", 1.0), "short": ("", 1.0)}


def record(model: str, interval_s: float, idle_tail_s: float) -> list[Sample]:
    """Serve `model`, replay TRACES against it and sample its metrics every `interval_s`; the samples."""
    with tempfile.TemporaryDirectory() as tmp:
        repo = derive_repository(Path(tmp) / "repo", [MODEL], {"model": model, "max_num_seqs": "16"})
        ports = server_ports()
        with TritonServer(repo, **ports, log_path=Path(tmp) / "server.log") as server:
            samples: list[Sample] = []
            done = threading.Event()
            sampler = threading.Thread(target=_sample, args=(server.metrics_url, interval_s, samples, done))
            sampler.start()
            try:
                for args, label in TRACES:
                    print(f"replaying the {label} trace", file=sys.stderr, flush=True)
                    subprocess.run([sys.executable, "-m", "clients.loadgen", "--url", server.grpc_url, "--model",
                                    MODEL, "--prompt-len", "16", *args], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
                time.sleep(idle_tail_s)  # the gauges and rates settle back to idle
            finally:
                done.set()
                sampler.join()
    return samples


def _sample(url: str, interval_s: float, samples: list[Sample], done: threading.Event) -> None:
    start = time.monotonic()
    while not done.wait(max(0.0, start + len(samples) * interval_s - time.monotonic())):
        page = urllib.request.urlopen(url, timeout=10).read().decode()
        samples.append(Sample(time.monotonic() - start, parse_page(page, MODEL)))


def save_samples(samples: list[Sample], path: Path) -> None:
    """Write the samples as JSON, one list of values per series (null where a sample lacks it)."""
    keys = sorted({key for sample in samples for key in sample.values})
    path.write_text(json.dumps({"t": [round(sample.t, 3) for sample in samples],
                                "series": [{"name": name, "labels": dict(labels),
                                            "values": [sample.values.get((name, labels)) for sample in samples]}
                                           for name, labels in keys]}))


def load_samples(path: Path) -> list[Sample]:
    """The samples `save_samples` wrote."""
    data = json.loads(path.read_text())
    series = [((s["name"], tuple(sorted(s["labels"].items()))), s["values"]) for s in data["series"]]
    return [Sample(t, {key: values[i] for key, values in series if values[i] is not None})
            for i, t in enumerate(data["t"])]


def render(samples: list[Sample], dashboard: dict, window_s: float, path: Path) -> None:
    """Draw every panel of `dashboard` where its gridPos puts it, from the samples."""
    panels = dashboard["panels"]
    num_rows = max(panel["gridPos"]["y"] + panel["gridPos"]["h"] for panel in panels)
    figure = plt.figure(figsize=(16, num_rows * 0.55))
    times = [sample.t for sample in samples]
    for panel in panels:
        grid = panel["gridPos"]
        axes = figure.add_axes((grid["x"] / 24 + 0.045, 1 - (grid["y"] + grid["h"]) / num_rows + 0.035,
                                grid["w"] / 24 - 0.07, grid["h"] / num_rows - 0.075))
        lines = [(re.sub(r"\{\{\w+\}\}", group, target["legendFormat"]), values)  # Grafana's {{label}}
                 for target in panel["targets"]
                 for group, values in evaluate(target["expr"], samples, window_s).items()]
        unit, scale = _axis_unit(panel["fieldConfig"]["defaults"]["unit"], lines)
        for label, values in lines:
            axes.plot(times, [v * scale for v in values], label=label, linewidth=1.6)
        axes.set_title(panel["title"], loc="left", fontsize=12, fontweight="bold")
        axes.set_ylabel(unit)
        axes.set_ylim(bottom=0)
        axes.set_xlim(0, times[-1])
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8, loc="best", ncol=2)
    figure.text(0.5, 0.003, f"seconds since the run began (sampled every second; rates over {window_s:.0f} s windows)",
                ha="center", fontsize=10)
    figure.savefig(path, dpi=80)
    plt.close(figure)


def _axis_unit(unit: str, lines: list[tuple[str, list[float]]]) -> tuple[str, float]:
    """The axis label and scale for a panel's unit; durations in ms, or in s once they pass 2 s (as Grafana does)."""
    if unit != "s":
        return UNITS[unit]
    largest = max((v for _, values in lines for v in values if not math.isnan(v)), default=0.0)
    return ("s", 1.0) if largest > 2 else ("ms", 1e3)


def main(argv: list[str] | None = None) -> int:
    """Record a run (or reload one) and draw the dashboard; print a one-line summary last."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:small")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--interval-s", type=float, default=1.0)
    parser.add_argument("--window-s", type=float, default=10.0)
    parser.add_argument("--from-samples", type=Path, help="draw from a run recorded before (its samples JSON)")
    args = parser.parse_args(argv)
    samples_path = args.out / "dashboard_samples.json"
    if args.from_samples:
        samples = load_samples(args.from_samples)
    else:
        samples = record(args.model, args.interval_s, idle_tail_s=3 * args.window_s / 2)
        args.out.mkdir(parents=True, exist_ok=True)
        save_samples(samples, samples_path)
    render(samples, json.loads(DASHBOARD.read_text()), args.window_s, args.out / "dashboard.png")
    tokens = [v for (name, _), v in samples[-1].values.items() if name == "flover_generated_tokens_total"]
    ttft = evaluate('histogram_quantile(0.5, sum by (le) (rate(flover_time_to_first_token_seconds_bucket'
                    '{model=~"$model"}[$__rate_interval])))', samples, samples[-1].t)[""][-1]
    print(f"dashboard: {len(samples)} samples over {samples[-1].t:.0f} s, {sum(tokens):.0f} tokens, "
          f"TTFT p50 {ttft * 1e3:.0f} ms -> {args.out / 'dashboard.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
