"""`flover generate`: stream one prompt's completion from an in-process engine."""

from __future__ import annotations

import argparse
import sys
import time

from flover_backend.config import EngineConfig
from flover_backend.engine.engine import Engine
from flover_backend.sampling.params import SamplingParams


def run(args: argparse.Namespace) -> int:
    """Load the model, stream the completion to stdout, then print token counts and speed."""
    config = EngineConfig(model=args.model, max_num_seqs=1, max_model_len=args.max_model_len,
                          num_threads=args.threads, dtype=args.dtype)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop=args.stop or [])
    with Engine(config) as engine:
        start = time.perf_counter()
        print(args.prompt, end="", flush=True)
        for output in engine.generate(args.prompt, params):
            print(output.new_text, end="", flush=True)
        elapsed = time.perf_counter() - start
    print(f"\n[{output.num_output_tokens} tokens in {elapsed:.2f}s, {output.num_output_tokens / elapsed:.1f} tok/s, "
          f"finish_reason={output.finish_reason}]", file=sys.stderr)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `generate` subcommand's options."""
    parser.add_argument("--model", default="builtin:small", help="builtin:tiny, builtin:small or a HF checkpoint dir")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", help="stop string (repeatable)")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=0)
