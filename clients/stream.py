"""Streaming CLI: `python -m clients.stream "prompt"` prints tokens as the server sends them."""

from __future__ import annotations

import argparse
import json
import sys
import time

from clients.triton_stream import ServerError, stream_grpc, stream_http


def main(argv: list[str] | None = None) -> int:
    """Send one prompt over gRPC or HTTP and print the completion as it streams."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("prompt")
    parser.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    parser.add_argument("--url", help="default 127.0.0.1:8001 (grpc) or http://127.0.0.1:8000 (http)")
    parser.add_argument("--model", default="flover")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append", default=[])
    parser.add_argument("--ignore-eos", action="store_true")
    args = parser.parse_args(argv)
    fields = {"text_input": args.prompt, "max_tokens": args.max_tokens, "temperature": args.temperature,
              "top_k": args.top_k, "top_p": args.top_p, "ignore_eos": args.ignore_eos}
    if args.seed is not None:
        fields["seed"] = args.seed
    if args.stop:
        fields["stop"] = args.stop
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
