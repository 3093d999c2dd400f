"""The median decode-step time of builtin:small at N rows, for comparing two checkouts in turns.

Run from each checkout with PYTHONPATH set to it (so its flover_backend is the one imported), alternating:
`PYTHONPATH=$PWD .venv/bin/python -m benchmarks.step_time 1,8,32` prints {rows: ms} as JSON.
It uses only the public engine API, which is the same before and after the package reorganisation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from flover_backend import Engine, EngineConfig, SamplingParams

PROMPT_TOKENS = 64
TIMED_STEPS = 15


def step_times(rows_list: list[int]) -> dict[int, float]:
    """Median milliseconds of one decode step with each number of rows decoding."""
    out = {}
    engine = Engine(EngineConfig(model="builtin:small", max_num_seqs=32, max_model_len=512, num_threads=2))
    try:
        for rows in rows_list:
            for i in range(rows):  # prompts with no common start, so no prefix is reused
                engine.add_request(prompt_token_ids=[1 + (i * 7 + j) % 900 for j in range(PROMPT_TOKENS)],
                                   params=SamplingParams(max_tokens=200, ignore_eos=True), on_output=lambda o: None)
            for _ in range(rows * 2 + 4):  # every prompt in, every row decoding
                engine.step()
            times = []
            for _ in range(TIMED_STEPS):
                start = time.perf_counter()
                engine.step()
                times.append(time.perf_counter() - start)
            out[rows] = statistics.median(times) * 1e3
            engine.run_until_idle()
    finally:
        engine.stop()
    return out


def main() -> None:
    """Print the step times for the comma-separated row counts as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("rows", help="comma-separated row counts, e.g. 1,8,32")
    print(json.dumps(step_times([int(x) for x in parser.parse_args().rows.split(",")])))


if __name__ == "__main__":
    main()
