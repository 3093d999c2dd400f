"""What a request asking for prompt logprobs costs its neighbours: `python -m benchmarks.prompt_logprobs_cost`.

In one in-process engine, `--neighbours` requests decode while, in turns, a request with a `--prompt-len`-token
prompt (max_tokens 1) comes in asking for prompt logprobs (top `--top`) or not. The figure is the time of the
iterations that write its prompt, which every neighbour waits out: median over `--rounds` turns of each, the
two kinds alternating so a busy machine slows both alike. Writes benchmarks/results/prompt_logprobs_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

from flover_backend import Engine, EngineConfig, SamplingParams


def cpu_name() -> str:
    """The CPU's model name, as lscpu prints it."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def prompt_window(engine: Engine, prompt_ids: list[int], params: SamplingParams) -> float:
    """Seconds of the iterations from the prompt's arrival to its one token (the neighbours decode meanwhile)."""
    done: list = []
    engine.add_request(prompt_token_ids=prompt_ids, params=params, on_output=done.append)
    start = time.perf_counter()
    while not (done and done[-1].finished):
        engine.step()
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> dict:
    """Both kinds of prompt in turns beside the decoding neighbours; the figures as one dict."""
    config = EngineConfig(model=args.model, max_num_seqs=args.neighbours + 1, max_model_len=args.max_model_len,
                          num_threads=args.threads)
    engine = Engine(config)
    try:
        vocab = engine.vocab_size
        prompt_ids = [(7 * i + 3) % (vocab - 1) + 1 for i in range(args.prompt_len)]
        steps_needed = 2 * (args.rounds + 1) * (args.prompt_len // (config.max_prefill_tokens or args.prompt_len) + 2)
        for i in range(args.neighbours):
            engine.add_request(prompt_token_ids=[i + 1, i + 2], params=SamplingParams(
                max_tokens=min(args.max_model_len - 3, steps_needed + 16), ignore_eos=True), on_output=lambda o: None)
        engine.step()
        kinds = {"plain": SamplingParams(max_tokens=1), "prompt_logprobs": SamplingParams(max_tokens=1,
                                                                                          prompt_logprobs=args.top)}
        times: dict[str, list[float]] = {kind: [] for kind in kinds}
        for turn in range(-1, args.rounds):  # turn -1 warms up
            for kind, params in kinds.items():
                seconds = prompt_window(engine, prompt_ids, params)
                if turn >= 0:
                    times[kind].append(seconds)
        assert engine.scheduler.num_running == args.neighbours, "a neighbour finished before the turns did"
    finally:
        engine.stop()
    median = {kind: statistics.median(values) * 1e3 for kind, values in times.items()}
    return {"model": args.model, "vocab_size": vocab, "neighbours": args.neighbours, "prompt_len": args.prompt_len,
            "top": args.top, "rounds": args.rounds, "threads": args.threads, "cpu": cpu_name(),
            "median_ms": median, "ratio": median["prompt_logprobs"] / median["plain"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:small")
    parser.add_argument("--neighbours", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prompt_logprobs_cost.json").write_text(json.dumps(result, indent=2))
    ms = result["median_ms"]
    table = ("| prompt request | its prefill iterations, median ms | ratio |\n|---|---|---|\n"
             f"| plain | {ms['plain']:.1f} | 1.00 |\n"
             f"| prompt_logprobs={args.top} | {ms['prompt_logprobs']:.1f} | {result['ratio']:.2f} |\n\n"
             f"{args.model} (vocab {result['vocab_size']}), {args.neighbours} neighbours decoding, "
             f"{args.prompt_len}-token prompt, {args.rounds} rounds, {args.threads} threads, CPU: {result['cpu']}; "
             "other work shared the machine, so the figures are noisy.\n")
    (args.out / "prompt_logprobs_cost.md").write_text(table)
    print(table)
    print(f"prompt logprobs: the neighbours' iterations take {result['ratio']:.2f}x as long while the prompt goes in")


if __name__ == "__main__":
    main()
