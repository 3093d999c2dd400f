"""Errors in OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`), and Triton's mapped onto them."""

from __future__ import annotations

import re

from starlette.responses import JSONResponse

from flover_backend.param_table import PARAMS

# Fields the flover model names at the start of its error messages ("top_p: must be in (0, 1]"), and the
# request parameter each one comes from (the table's OpenAI name). `prompt` and `input_ids` are the messages
# of a chat request; `logprobs` is chat's `top_logprobs`, named alike by both endpoints' `logprobs`.
TRITON_FIELDS = {"text_input": "prompt", "input_ids": "prompt", "prompt": "prompt", "logprobs": "logprobs"} | {
    param.name: param.openai for param in PARAMS if param.openai}
TRITON_FIELDS |= {name: "response_format" for name in ("guided_json", "guided_regex", "guided_choice")}  # structured output
_FIELD_ERROR = re.compile(r"(\w+): ")


class APIError(Exception):
    """A request that ends with an HTTP error status and an OpenAI-shaped body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        """The JSON body OpenAI's clients parse."""
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        if self.status == 503:
            kind = "service_unavailable"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        """This error as an HTTP response in OpenAI's shape."""
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(param: str | None, message: str, code: str | None = None) -> APIError:
    """A 400 naming the request parameter at fault; the message starts with its name, as the engine's do."""
    return APIError(400, f"{param}: {message}" if param else message, param=param, code=code)


def model_not_found(model: str) -> APIError:
    """The 404 for a model Triton does not serve."""
    return APIError(404, f"The model {model!r} does not exist; GET /v1/models lists the served models",
                    param="model", code="model_not_found")


def triton_unavailable(detail: str) -> APIError:
    """The 503 for a tritonserver that cannot be reached."""
    return APIError(503, f"the inference server is unavailable: {detail}", code="triton_unavailable")


def from_triton(message: str, *, model: str, prompt_param: str = "prompt") -> APIError:
    """The API error for an error message a Triton response carried (the gRPC stream has no status code).

    The flover model prefixes request errors with the input at fault, so those are the client's (400);
    "unknown model" is a 404; an engine that has stopped is 503; anything else is ours (500).
    """
    match = _FIELD_ERROR.match(message)
    if match and match.group(1) in TRITON_FIELDS:
        param = TRITON_FIELDS[match.group(1)]
        if param == "response_format":  # the client never wrote guided_json: name what it did write
            message = f"{param}: {message[match.end():]}"
        return APIError(400, message, param=prompt_param if param == "prompt" else param)
    if "unknown model" in message.lower():
        return model_not_found(model)
    if "engine is stopped" in message or "has failed" in message:
        return APIError(503, f"model {model!r} is not serving: {message}", code="model_unavailable")
    return APIError(500, f"inference failed: {message}")
