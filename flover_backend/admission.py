"""Whether a prompt may enter the engine, decided in one function that every front calls before any work."""

from __future__ import annotations

from dataclasses import dataclass

from flover_backend.errors import InvalidRequestError

BYTES_PER_TOKEN = 32  # a token rarely covers more text than this, so a longer prompt cannot fit


@dataclass(frozen=True)
class AdmissionLimits:
    """The bounds a served model puts on one request's prompt and length."""

    max_model_len: int
    max_prompt_bytes: int = 0  # a text prompt's UTF-8 bytes, checked before tokenizing; 0: 32 x max_model_len

    @property
    def prompt_byte_limit(self) -> int:
        """Longest text prompt in UTF-8 bytes."""
        return self.max_prompt_bytes or BYTES_PER_TOKEN * self.max_model_len


def check_admission(limits: AdmissionLimits, *, num_prompt_bytes: int | None = None,
                    num_prompt_tokens: int | None = None, max_tokens: int | None = None,
                    prompt_field: str = "prompt") -> None:
    """Refuse, naming the field, a prompt that cannot be served: too many bytes to tokenize (checked first,
    before tokenizing), empty, no room left in max_model_len, or prompt + max_tokens past max_model_len.

    Each front calls it with what it knows: the text's byte count before tokenizing, the token count (and
    max_tokens) once there are ids. The engine calls it too, for callers that embed it directly.
    """
    if num_prompt_bytes is not None and num_prompt_bytes > limits.prompt_byte_limit:
        raise InvalidRequestError(prompt_field, f"longer than {limits.prompt_byte_limit} bytes: it cannot fit in "
                                                f"max_model_len {limits.max_model_len} tokens")
    if num_prompt_tokens is None:
        return
    if num_prompt_tokens < 1:
        raise InvalidRequestError(prompt_field, "must not be empty")
    if num_prompt_tokens >= limits.max_model_len:
        raise InvalidRequestError(prompt_field, f"{num_prompt_tokens} tokens leave no room in max_model_len "
                                                f"{limits.max_model_len}")
    if max_tokens is not None and num_prompt_tokens + max_tokens > limits.max_model_len:
        raise InvalidRequestError("max_tokens", f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) "
                                                f"exceeds max_model_len {limits.max_model_len}")
