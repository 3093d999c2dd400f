"""Prefix reuse on and off, in turns in one process: what a copied position costs against a computed one, and two
traces (issue 24's shared system prompt, and multi-turn conversations).

`python -m benchmarks.prefix_reuse`: two engines alike but for `prefix_caching` replay each trace in turns
(off, on, off, on, ...), so the machine's noise falls on both; medians over the rounds, their ratios, and whether
the greedy outputs were identical go to benchmarks/results/prefix_reuse.{json,md}. What reading a shared prefix once
for all rows saves: benchmarks/shared_prefix_ab.py.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import threading
import time
from pathlib import Path

import torch

from benchmarks.arena_ab import cpu_name
from benchmarks.inprocess import replay
from clients.workload import PROMPT_TOKEN_RANGE, RequestTiming, TraceRequest, make_trace, summarize
from flover_backend import Engine, EngineConfig, RequestOutput, SamplingParams
from flover_backend.execution.layers.attention import ForwardBatch
from flover_backend.execution.row_table import RowMove


def shared_prefix_trace(seed: int, num_requests: int = 32, prefix_len: int = 320, own_len: int = 16,
                        max_tokens: int = 64, mean_gap_s: float = 0.1) -> list[TraceRequest]:
    """Issue 24's trace: Poisson arrivals, each prompt one shared prefix then its own tokens; fresh tokens per seed."""
    rng = random.Random(seed)
    prefix = tuple(rng.randint(*PROMPT_TOKEN_RANGE) for _ in range(prefix_len))
    base = make_trace(num_requests, mean_gap_s=mean_gap_s, gen_len=(max_tokens, max_tokens), prompt_len=own_len,
                      seed=seed)
    return [TraceRequest(r.index, r.arrival_s, prefix + r.prompt_token_ids, r.max_tokens) for r in base]


def conversations(engine: Engine, seed: int, num_conversations: int = 8, num_turns: int = 4, system_len: int = 64,
                  message_len: int = 16, max_tokens: int = 32, mean_gap_s: float = 0.1) -> tuple[list, list]:
    """Multi-turn chats, closed loop: each turn's prompt is the previous prompt, its answer and a new message; the
    conversations start at Poisson gaps and share a system prompt. Timings and every answer's tokens."""
    rng = random.Random(seed)
    system = [rng.randint(*PROMPT_TOKEN_RANGE) for _ in range(system_len)]
    messages = [[[rng.randint(*PROMPT_TOKEN_RANGE) for _ in range(message_len)] for _ in range(num_turns)]
                for _ in range(num_conversations)]
    starts = [0.0]
    for _ in range(num_conversations - 1):
        starts.append(starts[-1] + rng.expovariate(1.0 / mean_gap_s))
    timings: list[RequestTiming] = []
    answers: list[list[int]] = []
    done = threading.Semaphore(0)
    lock = threading.Lock()

    def send(conversation: int, turn: int, history: list[int]) -> None:
        prompt = history + messages[conversation][turn]
        with lock:
            timing = RequestTiming(arrival=time.monotonic())
            timings.append(timing)
            answer: list[int] = []
            answers.append(answer)

        def on_output(output: RequestOutput) -> None:
            now = time.monotonic()
            timing.token_times.extend([now] * len(output.new_token_ids))
            answer.extend(output.new_token_ids)
            if output.finished:
                timing.end, timing.finish_reason = now, output.finish_reason
                if turn + 1 < num_turns:
                    send(conversation, turn + 1, prompt + answer)
                else:
                    done.release()

        engine.add_request(prompt_token_ids=prompt, params=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                           on_output=on_output)

    clock = time.monotonic()
    for conversation, start in enumerate(starts):
        time.sleep(max(0.0, clock + start - time.monotonic()))
        send(conversation, 0, list(system))
    for _ in range(num_conversations):
        done.acquire()
    return timings, answers


def copy_and_prefill_per_position(engine: Engine, length: int, repeats: int) -> dict:
    """Median seconds per position of a prefix copy (one RowMove of `length` positions, every layer) and of
    computing the same positions (one prompt forward into a row), on the engine's thread."""
    runner = engine.runner

    def measure() -> dict:
        copies, prefills = [], []
        ids = torch.randint(*PROMPT_TOKEN_RANGE, (1, length), generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            for _ in range(repeats):
                start = time.perf_counter()
                runner.arena.apply_moves([RowMove(0, 1, length)])
                copies.append(time.perf_counter() - start)
                start = time.perf_counter()
                runner.model(ids, ForwardBatch.prefill(slice(2, 3), [length], runner.device), runner.arena)
                prefills.append(time.perf_counter() - start)
        copy, prefill = statistics.median(copies) / length, statistics.median(prefills) / length
        return {"positions": length, "copy_s_per_position": copy, "prefill_s_per_position": prefill,
                "prefill_over_copy": prefill / copy,
                "copy_bytes_per_position": runner.arena.bytes_per_position}

    return engine.call(measure)


def main(argv: list[str] | None = None) -> int:
    """Run both traces in turns with reuse off and on; print and write the results."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:small")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    settings = {"off": False, "on": True}
    engines = {name: Engine(EngineConfig(model=args.model, max_num_seqs=32, max_model_len=512, prefix_caching=on))
               for name, on in settings.items()}
    for engine in engines.values():
        engine.start()
    results: dict = {"cpu": cpu_name(), "model": args.model, "rounds": args.rounds}
    try:
        results["copy_vs_prefill"] = copy_and_prefill_per_position(engines["on"], 320, repeats=5)
        print(json.dumps(results["copy_vs_prefill"]), flush=True)
        runs: dict = {trace: {name: [] for name in settings} for trace in ("shared_prefix", "multi_turn")}
        identical = True  # the multi-turn trace's greedy answers, reuse on against off
        for round_index in range(args.rounds):
            for trace_name in runs:
                outputs = {}
                for name, engine in engines.items():
                    hits_before = engine.stats.prefix_hit_tokens
                    if trace_name == "shared_prefix":
                        trace = shared_prefix_trace(seed=100 + round_index)
                        timings = replay(engine, trace)
                        outputs[name] = None  # replay keeps no tokens: tests/test_prefix_cache.py checks exactness
                    else:
                        timings, outputs[name] = conversations(engine, seed=200 + round_index)
                    summary = summarize(timings)
                    summary["prefix_hit_tokens"] = engine.stats.prefix_hit_tokens - hits_before
                    runs[trace_name][name].append(summary)
                    print(f"round {round_index} {trace_name} reuse {name}: {summary['tokens_per_s']:.1f} tok/s, "
                          f"TTFT p50 {summary['ttft_p50_s'] * 1e3:.0f} ms, TPOT p50 {summary['tpot_p50_s'] * 1e3:.0f} "
                          f"ms, hits {summary['prefix_hit_tokens']}", flush=True)
                if outputs["on"] is not None:
                    identical &= sorted(outputs["on"]) == sorted(outputs["off"])
    finally:
        for engine in engines.values():
            engine.stop()
    results["runs"], results["identical_greedy_outputs"] = runs, identical
    lines = [f"# Prefix reuse on against off ({args.model}, {results['cpu']})", "",
             ("Two engines alike but for `prefix_caching`, replaying each trace in turns in one process, "
             f"{args.rounds} rounds, fresh prompts each round; medians. Other processes load this machine "
             "(8 helpers share 2 cores), so single figures are noisy: read the ratios."), "",
             "| trace | reuse | tokens/s | TTFT p50 (ms) | TPOT p50 (ms) | prompt tokens copied |", "|---|---|---|---|---|---|"]
    ratios = {}
    for trace_name, by_setting in runs.items():
        medians = {}
        for name, summaries in by_setting.items():
            medians[name] = {key: statistics.median(s[key] for s in summaries)
                             for key in ("tokens_per_s", "ttft_p50_s", "tpot_p50_s", "prefix_hit_tokens")}
            m = medians[name]
            lines.append(f"| {trace_name} | {name} | {m['tokens_per_s']:.1f} | {m['ttft_p50_s'] * 1e3:.0f} | "
                         f"{m['tpot_p50_s'] * 1e3:.0f} | {m['prefix_hit_tokens']:.0f} |")
        ratios[trace_name] = {"tokens_per_s_on_over_off": medians["on"]["tokens_per_s"] / medians["off"]["tokens_per_s"],
                              "ttft_p50_off_over_on": medians["off"]["ttft_p50_s"] / medians["on"]["ttft_p50_s"]}
    results["ratios"] = ratios
    copy = results["copy_vs_prefill"]
    lines += ["", "| trace | tokens/s on / off | TTFT p50 off / on |", "|---|---|---|"]
    lines += [f"| {name} | {r['tokens_per_s_on_over_off']:.2f} | {r['ttft_p50_off_over_on']:.2f} |"
              for name, r in ratios.items()]
    lines += ["", (f"Greedy outputs of the multi-turn trace identical with reuse on and off: "
                  f"{identical}."), "",
              (f"Copy against compute, {copy['positions']} positions: a copied position "
              f"{copy['copy_s_per_position'] * 1e6:.2f} us ({copy['copy_bytes_per_position']} bytes), a computed one "
              f"{copy['prefill_s_per_position'] * 1e6:.0f} us: computing costs {copy['prefill_over_copy']:.0f}x "
              "copying.")]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prefix_reuse.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "prefix_reuse.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
