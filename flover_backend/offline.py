"""`flover generate`: stream one prompt's completion from an in-process engine."""

from __future__ import annotations

import argparse
import sys
import time

from flover_backend.config import EngineConfig
from flover_backend.engine import Engine
from flover_backend.param_table import PARAMS, Param
from flover_backend.sampling_params import SamplingParams


def run(args: argparse.Namespace) -> int:
    """Load the model, stream the completion to stdout, then print token counts and speed."""
    config = EngineConfig(model=args.model, max_num_seqs=1, max_model_len=args.max_model_len,
                          num_threads=args.threads, dtype=args.dtype)
    params = SamplingParams(**{p.name: getattr(args, p.name) for p in PARAMS
                               if p.cli and getattr(args, p.name) is not None})
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


def add_sampling_arguments(parser: argparse.ArgumentParser, params: tuple[Param, ...] = PARAMS) -> None:
    """One flag per table parameter marked `cli`: --max-tokens, --temperature, ... (lists repeat the flag,
    booleans take --x / --no-x); left out, the engine's default holds."""
    for param in params:
        if not param.cli:
            continue
        flag = f"--{param.name.replace('_', '-')}"
        help_text = f"{param.doc} (default {param.default!r}{', ' + param.bounds if param.bounds else ''})"
        if param.kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif param.is_list:
            parser.add_argument(flag, type=param.kind, action="append", help=f"{help_text}; repeatable")
        else:
            parser.add_argument(flag, type=param.kind, default=None, help=help_text)
