"""Shared-prefix attention on and off: issue 24's trace replayed in turns by two engines alike but for the setting.

`python -m benchmarks.shared_prefix_ab`: with `shared_prefix_attention` on, decode rows holding copies of one
reused prefix read it once per step; off, every row reads its own copy. Both engines replay the same shared-prefix
trace (32 requests, Poisson 100 ms, a 320-token prefix + 16 own tokens, 64 new) in turns, fresh prompts each
round, so the machine's noise falls on both; medians and their ratios go to
benchmarks/results/shared_prefix_attention.{json,md}, and whether every greedy answer was identical.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from benchmarks.arena_ab import cpu_name
from benchmarks.inprocess import replay
from benchmarks.prefix_reuse import shared_prefix_trace
from clients.workload import summarize
from flover_backend import Engine, EngineConfig

KEYS = ("tokens_per_s", "ttft_p50_s", "tpot_p50_s", "itl_p50_s")


def main(argv: list[str] | None = None) -> int:
    """Replay the trace with the setting on and off in turns; print and write the results."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:small")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    settings = {"off": False, "on": True}
    engines = {name: Engine(EngineConfig(model=args.model, max_num_seqs=32, max_model_len=512,
                                         shared_prefix_attention=on)).start() for name, on in settings.items()}
    runs: dict[str, list[dict]] = {name: [] for name in settings}
    identical = True
    try:
        for round_index in range(args.rounds):
            trace = shared_prefix_trace(seed=300 + round_index)
            answers: dict[str, list[list[int]]] = {name: [] for name in engines}
            for name, engine in engines.items():
                summary = summarize(replay(engine, trace, answers[name]))
                runs[name].append(summary)
                print(f"round {round_index} shared_prefix_attention {name}: {summary['tokens_per_s']:.1f} tok/s, "
                      f"TTFT p50 {summary['ttft_p50_s'] * 1e3:.0f} ms, TPOT p50 {summary['tpot_p50_s'] * 1e3:.1f} ms",
                      flush=True)
            identical &= answers["on"] == answers["off"]
    finally:
        for engine in engines.values():
            engine.stop()
    medians = {name: {key: statistics.median(run[key] for run in side) for key in KEYS} for name, side in runs.items()}
    results = {"cpu": cpu_name(), "model": args.model, "rounds": args.rounds, "runs": runs, "medians": medians,
               "on_over_off": {key: medians["on"][key] / medians["off"][key] for key in KEYS},
               "identical_greedy_outputs": identical}
    lines = [f"# Shared-prefix attention on against off ({args.model}, {results['cpu']})", "",
             ("Two engines alike but for `shared_prefix_attention`, replaying issue 24's shared-prefix trace in turns "
              f"in one process (32 requests, Poisson 100 ms, 320 shared + 16 own prompt tokens, 64 new), {args.rounds} "
              "rounds with fresh prompts; medians. Other processes may load this shared machine: read the ratios."),
             "", "| setting | tokens/s | TTFT p50 (ms) | TPOT p50 (ms) | ITL p50 (ms) |", "|---|---|---|---|---|"]
    for name, m in medians.items():
        lines.append(f"| {name} | {m['tokens_per_s']:.1f} | {m['ttft_p50_s'] * 1e3:.0f} | {m['tpot_p50_s'] * 1e3:.1f} | "
                     f"{m['itl_p50_s'] * 1e3:.1f} |")
    ratio = results["on_over_off"]
    lines += ["", (f"On / off: tokens/s {ratio['tokens_per_s']:.2f}x, TPOT p50 {ratio['tpot_p50_s']:.2f}x. Greedy "
                   f"answers identical on and off: {identical}.")]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "shared_prefix_attention.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "shared_prefix_attention.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
