"""`flover generate`: stream one prompt's completion from an in-process engine."""

from __future__ import annotations

import argparse
import sys
import time

from flover_backend.config import EngineConfig
from flover_backend.engine.engine import Engine
from flover_backend.param_flags import add_sampling_arguments, sampling_values
from flover_backend.sampling.params import SamplingParams


def run(args: argparse.Namespace) -> int:
    """Load the model, stream the completion to stdout, then print token counts and speed."""
    config = EngineConfig(model=args.model, max_num_seqs=1, max_model_len=args.max_model_len,
                          num_threads=args.threads, dtype=args.dtype)
    params = SamplingParams(**sampling_values(args))
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
    add_sampling_arguments(parser)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=0)

