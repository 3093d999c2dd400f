"""One engine setting's effect on the decode step: two engines, alike but for it, stepping in turns in one process.

`python -m benchmarks.setting_ab --set native_attention=false`: both engines hold the same `--rows` requests
and step alternately, so the machine's noise falls on both; the median step of each, by context length,
and their ratio are printed and written to benchmarks/results/setting_ab_<key>.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from flover_backend import Engine, EngineConfig, SamplingParams


def step_times(settings: dict[str, str], model: str, rows: int, steps: int, prompt_len: int) -> dict[str, list[float]]:
    """Seconds of each step of an engine with the defaults ("default") and one with `settings` ("changed")."""
    engines = {}
    for name, overrides in (("default", {}), ("changed", settings)):
        engine = Engine(EngineConfig.from_dict({"model": model, "max_num_seqs": str(rows), **overrides}))
        for _ in range(rows):
            engine.add_request(prompt_token_ids=list(range(100, 100 + prompt_len)),
                               params=SamplingParams(max_tokens=steps + 1, ignore_eos=True), on_output=lambda _: None)
        engines[name] = engine
    times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(steps):
        for name, engine in engines.items():
            start = time.perf_counter()
            engine.step()
            times[name].append(time.perf_counter() - start)
    for engine in engines.values():
        engine.stop()
    return times


def main(argv: list[str] | None = None) -> int:
    """Run the comparison, print it by context length, write the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", dest="settings", action="append", required=True, metavar="KEY=VALUE")
    parser.add_argument("--model", default="builtin:small")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    settings = dict(item.split("=", 1) for item in args.settings)
    times = step_times(settings, args.model, args.rows, args.steps, args.prompt_len)
    changed = ", ".join(f"{k}={v}" for k, v in settings.items())
    lines = [f"# Decode step at {args.rows} rows ({args.model}): defaults against {changed}", "",
             "Two engines stepping in turns in one process; medians per span of 50 steps.", "",
             "| context (positions) | defaults (ms) | changed (ms) | changed / defaults |", "|---|---|---|---|"]
    for first in range(0, args.steps, 50):
        default = statistics.median(times["default"][first:first + 50])
        other = statistics.median(times["changed"][first:first + 50])
        context = f"{args.prompt_len + first}-{args.prompt_len + first + 49}"
        lines.append(f"| {context} | {default * 1e3:.1f} | {other * 1e3:.1f} | {other / default:.2f} |")
        print(lines[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    target = args.out / f"setting_ab_{'_'.join(settings)}.md"
    target.write_text("\n".join(lines) + "\n")
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
