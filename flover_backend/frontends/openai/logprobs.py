"""The flover model's logprobs (vLLM's shape, one {token id: {logprob, rank, decoded_token}} per token, the chosen
token first) in OpenAI's two shapes: the legacy completions one and the chat one."""

from __future__ import annotations

MIN_LOGPROB = -9999.0  # JSON has no -inf; vLLM's front sends this instead


def completion_logprobs(steps: list[dict], text_offset: int) -> tuple[dict, int]:
    """`/v1/completions`' shape for these tokens, whose text starts at `text_offset` of the choice's text; and
    where the next token's text starts. `top_logprobs` holds the chosen token and the N most likely, as OpenAI's."""
    shaped = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for step in steps:
        chosen = next(iter(step.values()))
        shaped["tokens"].append(chosen["decoded_token"])
        shaped["token_logprobs"].append(_finite(chosen["logprob"]))
        top: dict[str, float] = {}
        for entry in step.values():  # keyed by text: of tokens with the same text, the chosen or the likelier
            top.setdefault(entry["decoded_token"], _finite(entry["logprob"]))
        shaped["top_logprobs"].append(top)
        shaped["text_offset"].append(text_offset)
        text_offset += len(chosen["decoded_token"])
    return shaped, text_offset


def prompt_completion_logprobs(first_token: str, steps: list[dict], text_offset: int) -> tuple[dict, int]:
    """`/v1/completions`' shape for an echoed prompt: its first token (text `first_token`) has no logprob (null,
    as OpenAI's), the others have theirs (`steps`, from the second token on); and where the next text starts."""
    rest, end = completion_logprobs(steps, text_offset + len(first_token))
    return {"tokens": [first_token, *rest["tokens"]], "token_logprobs": [None, *rest["token_logprobs"]],
            "top_logprobs": [None, *rest["top_logprobs"]], "text_offset": [text_offset, *rest["text_offset"]]}, end


def chat_logprobs(steps: list[dict], num_top: int) -> dict:
    """`/v1/chat/completions`' shape for these tokens, each with its `num_top` most likely tokens, most likely first."""
    content = []
    for step in steps:
        chosen = next(iter(step.values()))
        top = sorted(step.values(), key=lambda entry: entry["rank"])[:num_top]
        content.append(_token(chosen) | {"top_logprobs": [_token(entry) for entry in top]})
    return {"content": content}


def _token(entry: dict) -> dict:
    text = entry["decoded_token"]
    return {"token": text, "logprob": _finite(entry["logprob"]), "bytes": list(text.encode("utf-8"))}


def _finite(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)
