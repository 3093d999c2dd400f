"""`python -m flover_backend.frontends.openai --triton-grpc-url HOST:PORT --port N`: the front, standalone."""

from __future__ import annotations

import argparse
import copy
import os
import sys

from flover_backend.frontends.openai.protocol import Limits

DEFAULT_PORT = 8003  # beside tritonserver's 8000 (HTTP), 8001 (gRPC) and 8002 (metrics)
MAX_HEAD_BYTES = 16 << 10  # a request line and headers past this get 400 (h11's bound, made explicit)
KEEP_ALIVE_S = 5.0  # an idle kept-alive connection is closed after this


def build_parser() -> argparse.ArgumentParser:
    """The standalone front's command line."""
    parser = argparse.ArgumentParser(prog="python -m flover_backend.frontends.openai", description=__doc__)
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
    parser.add_argument("--header-timeout", type=float, default=10.0,
                        help="seconds a connection has to send its request line and headers (408, closed)")
    parser.add_argument("--body-timeout", type=float, default=60.0,
                        help="seconds a request body has to arrive in full (408, closed)")
    parser.add_argument("--special-tokens-in-messages", action="store_true",
                        help="tokenize special-token text in chat messages (e.g. '<|im_start|>') into special ids, "
                             "as vLLM does; off by default, because then a user can forge turns of the template")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return parser


def main(argv: list[str] | None = None) -> int:
    """Serve the front until interrupted."""
    args = build_parser().parse_args(argv)
    import uvicorn  # after parsing: --help stays fast

    from flover_backend.frontends.openai.app import FrontSettings, create_app
    from flover_backend.frontends.openai.http_protocol import bounded_h11

    limits = Limits(max_body_bytes=args.max_body_bytes, max_messages=args.max_messages,
                    max_prompt_chars=args.max_prompt_chars, max_prompt_tokens=args.max_prompt_tokens,
                    max_prompts=args.max_prompts)
    admin_key = os.environ.get("FLOVER_ADMIN_KEY") or None
    app = create_app(FrontSettings(args.triton_grpc_url, args.model_path, admin_key, limits,
                                   special_tokens_in_messages=args.special_tokens_in_messages,
                                   body_timeout_s=args.body_timeout))
    # What a stranger's connection may hold: its head's bytes (h11) and time (the protocol), its body's bytes
    # and time (the app), idle time between requests (keep-alive), and a share of `limit_concurrency`.
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                log_config=log_config(args.log_level), http=bounded_h11(args.header_timeout, args.body_timeout),
                h11_max_incomplete_event_size=MAX_HEAD_BYTES, timeout_keep_alive=KEEP_ALIVE_S,
                limit_concurrency=args.max_concurrency, timeout_graceful_shutdown=5, server_header=False)
    return 0


def log_config(level: str) -> dict:
    """uvicorn's logging setup, with the front's own loggers (`flover_backend.*`) on its stderr handler."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["flover_backend"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return config


if __name__ == "__main__":
    sys.exit(main())
