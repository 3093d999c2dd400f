"""How fast the launcher copies a server's output into its capped log: a flood of one line, and distinct lines.

A server out of file descriptors writes "[warn] Error from accept() call: Too many open files" as fast as it
can; the copy must keep up (else the server's logging threads block on the pipe) and the disk must not fill.
Both kinds of output go through CappedLog in turns, in one run, and the figures are compared as a ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from flover_backend.server.capped_log import CappedLog

FLOOD = b"[warn] Error from accept() call: Too many open files\n"
DISTINCT = b"I1204 16:02:%02d.%06d 4242 model.py:1] request %d finished: 128 tokens, stop\n"


def cpu_name() -> str:
    """The CPU's model name (lscpu), for the figures."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def copy_rate(data: bytes, folder: Path) -> tuple[float, int]:
    """(MB/s through a CappedLog with a 64 MiB cap, bytes left on disk) for `data` written into its pipe."""
    read_end, write_end = os.pipe()
    log = CappedLog(read_end, folder / "server.log", max_bytes=64 << 20).start()
    started = time.perf_counter()
    writer = threading.Thread(target=lambda: os.fdopen(write_end, "wb").write(data) and None)
    writer.start()
    writer.join()
    log.join(timeout_s=600)
    seconds = time.perf_counter() - started
    on_disk = sum(path.stat().st_size for path in folder.glob("server.log*"))
    return len(data) / seconds / 1e6, on_disk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200, help="megabytes of output per kind and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    size = args.mb * 10**6
    kinds = {
        "flood of one line": FLOOD * (size // len(FLOOD)),
        "distinct lines": b"".join(DISTINCT % (i % 60, i % 10**6, i) for i in range(size // len(DISTINCT % (0, 0, 0)))),
    }
    rates: dict[str, list[float]] = {kind: [] for kind in kinds}
    disk: dict[str, int] = {}
    for _ in range(args.rounds):  # in turns, so a busy neighbour taxes both kinds alike
        for kind, data in kinds.items():
            with tempfile.TemporaryDirectory() as folder:
                rate, disk[kind] = copy_rate(data, Path(folder))
            rates[kind].append(rate)
    best = {kind: max(values) for kind, values in rates.items()}
    result = {"cpu": cpu_name(), "mb_per_kind": args.mb, "rounds": args.rounds, "mb_per_s": rates,
              "bytes_on_disk": disk, "flood_vs_distinct": best["flood of one line"] / best["distinct lines"]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "log_copy.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = [f"| {kind} | {best[kind]:.0f} | {disk[kind]:,} |" for kind in kinds]
    (args.out / "log_copy.md").write_text(
        f"CappedLog copy rate, {args.mb} MB per kind, best of {args.rounds} rounds in turns; CPU: {result['cpu']} "
        "(shared with other work: noisy)\n\n| output | MB/s | bytes left on disk |\n|---|---|---|\n"
        + "\n".join(rows) + "\n")
    print(f"log copy: flood {best['flood of one line']:.0f} MB/s ({disk['flood of one line']} bytes kept), distinct "
          f"lines {best['distinct lines']:.0f} MB/s; ratio {result['flood_vs_distinct']:.1f}x ({result['cpu']})")


if __name__ == "__main__":
    main()
