"""`python -m flover_backend.openai_front --triton-grpc-url HOST:PORT --port N`: the front, standalone."""

from __future__ import annotations

import argparse
import os
import sys

from flover_backend.openai_front.protocol import Limits

DEFAULT_PORT = 8003  # beside tritonserver's 8000 (HTTP), 8001 (gRPC) and 8002 (metrics)


def build_parser() -> argparse.ArgumentParser:
    """The standalone front's command line."""
    parser = argparse.ArgumentParser(prog="python -m flover_backend.openai_front", description=__doc__)
    parser.add_argument("--triton-grpc-url", default="127.0.0.1:8001", help="tritonserver's gRPC host:port")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--model-path", help="checkpoint (directory or builtin:NAME) whose chat template every "
                                             "model uses; default: each model's own `model` setting")
    parser.add_argument("--max-body-bytes", type=int, default=Limits.max_body_bytes)
    parser.add_argument("--max-messages", type=int, default=Limits.max_messages)
    parser.add_argument("--max-prompt-chars", type=int, default=Limits.max_prompt_chars)
    parser.add_argument("--max-prompt-tokens", type=int, default=Limits.max_prompt_tokens)
    parser.add_argument("--max-prompts", type=int, default=Limits.max_prompts, help="prompts per completions request")
    parser.add_argument("--max-concurrency", type=int, default=1024,
                        help="open connections past this get 503 from the HTTP server")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return parser


def main(argv: list[str] | None = None) -> int:
    """Serve the front until interrupted."""
    args = build_parser().parse_args(argv)
    import uvicorn  # after parsing: --help stays fast

    from flover_backend.openai_front.app import FrontSettings, create_app

    limits = Limits(max_body_bytes=args.max_body_bytes, max_messages=args.max_messages,
                    max_prompt_chars=args.max_prompt_chars, max_prompt_tokens=args.max_prompt_tokens, max_prompts=args.max_prompts)
    admin_key = os.environ.get("FLOVER_ADMIN_KEY") or None
    app = create_app(FrontSettings(args.triton_grpc_url, args.model_path, admin_key, limits))
    # Headers are bounded by h11 itself (its max incomplete event size); bodies by the app (max_body_bytes).
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, http="h11",
                limit_concurrency=args.max_concurrency, timeout_graceful_shutdown=5, server_header=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
