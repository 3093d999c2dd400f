"""All of a model's matmul weights at 1 / 4 / 8 / 12 / 16 / 32 rows, side by side: MKL (`F.linear`), oneDNN's packed
matmul, the few-row C kernel (native/small_gemm.c), and inductor with frozen weights, default and max-autotune.

`python -m benchmarks.gemm_table`: best of 7 for each, the methods alternating within every repeat, written
to benchmarks/results/gemm_table.md. Random weights of `builtin:small`'s shapes (12 layers and the LM head).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch._inductor.config as inductor_config
import torch.nn.functional as F
from torch import nn

from flover_backend.native import small_gemm
from flover_backend.paths import kernels_dir

SHAPES = [(2304, 768), (768, 768), (4096, 768), (768, 2048)] * 12 + [(32000, 768)]  # (out, in), builtin:small


class Linears(nn.Module):
    """Every weight as a bias-free linear layer, each applied to its own input."""

    def __init__(self, weights: list[torch.Tensor]):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(w.shape[1], w.shape[0], bias=False) for w in weights)
        for layer, weight in zip(self.layers, weights):
            layer.weight.data = weight

    def forward(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each layer on its input."""
        return [layer(x) for layer, x in zip(self.layers, inputs)]


def methods(weights: list[torch.Tensor], rows: int, inputs: list[torch.Tensor]) -> dict[str, Callable]:
    """What to time at `rows`, by name; each runs every weight once."""
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, 32) for w in weights]
    found = {"MKL F.linear": lambda: [F.linear(x, w) for x, w in zip(inputs, weights)],
             "oneDNN packed": lambda: [torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")
                                       for x, p in zip(inputs, packed)]}
    kernel = small_gemm.load(kernels_dir())
    if kernel is not None and rows <= small_gemm.MAX_ROWS:
        panels = [kernel.pack(w) for w in weights]
        found["small_gemm.c"] = lambda: [kernel.linear(x, p, None, w.shape[0])
                                         for x, p, w in zip(inputs, panels, weights)]
    model = Linears(weights).eval()
    for name, mode in (("inductor", None), ("inductor max-autotune", "max-autotune-no-cudagraphs")):
        torch._dynamo.reset()
        compiled = torch.compile(model, mode=mode, dynamic=False)
        compiled(inputs)  # compiles (and autotunes) here, outside the timing
        found[name] = lambda compiled=compiled: compiled(inputs)
    return found


def main(argv: list[str] | None = None) -> int:
    """Time every method at every row count; print and write the table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    inductor_config.freezing = True  # weights as constants: inductor packs them for its own GEMMs
    torch.manual_seed(0)
    weights = [torch.randn(out_features, in_features) * 0.02 for out_features, in_features in SHAPES]
    names = ["MKL F.linear", "oneDNN packed", "small_gemm.c", "inductor", "inductor max-autotune"]
    lines = ["| rows | " + " | ".join(f"{name} (ms)" for name in names) + " |", "|---|" + "---|" * len(names)]
    with torch.no_grad():  # not inference_mode: compiled graphs refuse inference tensors
        for rows in (1, 4, 8, 12, 16, 32):
            inputs = [torch.randn(rows, w.shape[1]) for w in weights]
            timed = methods(weights, rows, inputs)
            best = {name: float("inf") for name in timed}
            for _ in range(args.repeats):
                for name, run in timed.items():
                    run()  # once to warm, once timed: every method starts with the weights out of cache
                    start = time.perf_counter()
                    run()
                    best[name] = min(best[name], time.perf_counter() - start)
            del timed  # the compiled graphs hold their own packed copies of every weight
            torch._dynamo.reset()
            cells = [f"{best[name] * 1e3:.1f}" if name in best else "-" for name in names]
            lines.append(f"| {rows} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    header = (f"# All of builtin:small's matmul weights ({sum(o * i for o, i in SHAPES) * 4 / 1e6:.0f} MB fp32), "
              f"{args.threads} threads, best of {args.repeats}\n\n`python -m benchmarks.gemm_table`\n\n")
    (args.out / "gemm_table.md").write_text(header + "\n".join(lines) + "\n")
    print(f"wrote {args.out / 'gemm_table.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
