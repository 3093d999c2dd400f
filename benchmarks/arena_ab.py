"""The decode step through the arena object (`kv.layer(i)`) against the old 6-D indexing (`kv[i, 0], kv[i, 1]`).

`python -m benchmarks.arena_ab`: one engine's model and arena; the same decode forward (the engine's kernels,
ForwardBatch and weights) is run alternately through both ways of reaching a layer's keys and values, at 1, 8
and 32 rows, so the machine's noise falls on both; medians and their ratio go to benchmarks/results/arena_ab.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from flover_backend import Engine, EngineConfig
from flover_backend.execution.layers.attention import ForwardBatch


def indexed_forward(model, input_ids: torch.Tensor, batch: ForwardBatch, kv: torch.Tensor) -> torch.Tensor:
    """Llama's forward as it was before the arena object: each layer's views indexed out of the 6-D tensor."""
    cos = model.rope_cos[batch.positions].unsqueeze(1)
    sin = model.rope_sin[batch.positions].unsqueeze(1)
    x = model.model.embed_tokens(input_ids)
    if model.embed_scale is not None:
        x = x * model.embed_scale
    for i, layer in enumerate(model.model.layers):
        x = layer(x, cos, sin, batch, kv[i, 0], kv[i, 1])
    return model.model.norm(x)


def cpu_name() -> str:
    """The CPU's model name, as lscpu gives it."""
    for line in subprocess.run(["lscpu"], check=False, capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def step_times(engine: Engine, rows: int, steps: int, context: int) -> dict[str, list[float]]:
    """Seconds of each decode forward at `rows` rows of `context` positions, the two ways in turns."""
    runner = engine.runner
    model, arena = runner.model, runner.arena
    context_lens = torch.full((rows,), context, dtype=torch.long)
    input_ids = torch.randint(3, model.config.vocab_size, (rows, 1), generator=torch.Generator().manual_seed(0))
    ways = {"indexed": lambda batch: indexed_forward(model, input_ids, batch, arena.tensor),
            "arena": lambda batch: model(input_ids, batch, arena)}
    times: dict[str, list[float]] = {name: [] for name in ways}
    with torch.inference_mode():
        for step in range(steps + 1):  # the first round warms up
            for name, forward in ways.items():
                batch = ForwardBatch.decode(slice(0, rows), context_lens, context + 1, runner.dtype, None,
                                            runner.attention_kernel)
                start = time.perf_counter()
                forward(batch)
                if step:
                    times[name].append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    """Run both ways at each row count, print and write the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:small")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    cpu = cpu_name()
    lines = [f"# Decode forward: arena object against 6-D indexing ({args.model}, {args.context} positions, {cpu})",
             "", (f"Alternating in one process, {args.steps} steps each; medians. Other processes load this machine, "
                  "so single figures are noisy: read the ratio."), "",
             "| rows | indexed (ms) | arena object (ms) | arena / indexed |", "|---|---|---|---|"]
    print(lines[0])
    with Engine(EngineConfig(model=args.model, max_num_seqs=32, max_model_len=args.context + 64)) as engine:
        for rows in (1, 8, 32):
            times = engine.call(lambda rows=rows: step_times(engine, rows, args.steps, args.context))
            old, new = (statistics.median(times[name]) for name in ("indexed", "arena"))
            lines.append(f"| {rows} | {old * 1e3:.2f} | {new * 1e3:.2f} | {new / old:.3f} |")
            print(lines[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    target = args.out / "arena_ab.md"
    target.write_text("\n".join(lines) + "\n")
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
