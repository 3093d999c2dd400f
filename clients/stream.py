"""Streaming CLI: `python -m clients.stream "prompt"` prints tokens as the server sends them."""

from __future__ import annotations

import argparse
import json
import sys
import time

from clients.triton_stream import ServerError, stream_grpc, stream_http
from flover_backend.param_flags import add_sampling_arguments, sampling_values
from flover_backend.param_table import BY_NAME


def main(argv: list[str] | None = None) -> int:
    """Send one prompt over gRPC or HTTP and print the completion as it streams."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("prompt")
    parser.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    parser.add_argument("--url", help="default 127.0.0.1:8001 (grpc) or http://127.0.0.1:8000 (http)")
    parser.add_argument("--model", default="flover")
    add_sampling_arguments(parser)
    args = parser.parse_args(argv)
    given = sampling_values(args)
    # Parameters with a Triton tensor go as tensors; the others (vLLM's keys) in sampling_parameters.
    fields = {"text_input": args.prompt} | {name: value for name, value in given.items() if BY_NAME[name].triton}
    json_only = {name: value for name, value in given.items() if not BY_NAME[name].triton}
    if json_only:
        fields["sampling_parameters"] = json.dumps(json_only)
    if args.protocol == "grpc":
        chunks = stream_grpc(args.url or "127.0.0.1:8001", args.model, **fields)
    else:
        chunks = stream_http(args.url or "http://127.0.0.1:8000", args.model, **fields)
    start, first, last = time.perf_counter(), None, None
    try:
        for chunk in chunks:
            first = first or time.perf_counter()
            print(chunk.text, end="", flush=True)
            last = chunk
    except ServerError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - start
    summary = {"finish_reason": last.finish_reason, "tokens": last.num_output_tokens,
               "ttft_ms": round((first - start) * 1e3, 1), "seconds": round(elapsed, 2)}
    print(f"\n{json.dumps(summary)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
