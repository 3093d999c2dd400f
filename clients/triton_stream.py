"""Streaming calls to a flover model over gRPC (tritonclient) and HTTP (`generate_stream`)."""

from __future__ import annotations

import json
import queue
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import tritonclient.grpc as grpcclient

from flover_backend.frontends.triton.schema import INPUTS, NUMPY_TYPES

# Input name -> the NumPy dtype the flover models declare for it (BYTES inputs are object arrays).
INPUT_DTYPES = {spec.name: NUMPY_TYPES[spec.data_type] for spec in INPUTS if spec.data_type != "TYPE_STRING"}
LIST_INPUTS = {spec.name for spec in INPUTS if spec.is_list}


class ServerError(RuntimeError):
    """The server answered a request with an error."""


@dataclass
class Chunk:
    """One streamed response: new text and ids; the last one also says why generation ended."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    num_output_tokens: int | None = None
    logprobs: list[dict] | None = None  # per token {token id: {logprob, rank, decoded_token}}, if asked for
    cumulative_logprob: float | None = None  # if asked for


def grpc_inputs(fields: dict) -> list[grpcclient.InferInput]:
    """Triton inputs for a request given as {input name: value} (strings, numbers, lists)."""
    import tritonclient.grpc as grpcclient  # here: the HTTP calls run where tritonclient is not installed (GPU image)
    from tritonclient.utils import np_to_triton_dtype

    inputs = []
    for name, value in fields.items():
        if name in INPUT_DTYPES:
            array = np.array(value if name in LIST_INPUTS else [value], dtype=INPUT_DTYPES[name])
        else:  # BYTES inputs: text_input, stop, sampling_parameters
            values = value if name in LIST_INPUTS else [value]
            array = np.array([v.encode() if isinstance(v, str) else v for v in values], dtype=np.object_)
        tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def _chunk(result) -> Chunk | None:
    text = result.as_numpy("text_output")
    if text is None:  # the empty final response that closes a stream
        return None
    reason = result.as_numpy("finish_reason")
    count = result.as_numpy("num_output_tokens")
    logprobs = result.as_numpy("logprobs")
    cumulative = result.as_numpy("cumulative_logprob")
    return Chunk(text=b"".join(text).decode("utf-8"), token_ids=result.as_numpy("output_ids").tolist(),
                 finish_reason=reason[0].decode() if reason is not None else None,
                 num_output_tokens=int(count[0]) if count is not None else None,
                 logprobs=json.loads(logprobs[0]) if logprobs is not None else None,
                 cumulative_logprob=float(cumulative[0]) if cumulative is not None else None)


class GrpcStream:
    """One request over a gRPC bidirectional stream; iterate for chunks, `cancel()` to stop it."""

    def __init__(self, url: str, model: str, fields: dict, timeout_s: float = 300.0):
        import tritonclient.grpc as grpcclient

        self.timeout_s = timeout_s
        self._client = grpcclient.InferenceServerClient(url)
        self._results: queue.SimpleQueue = queue.SimpleQueue()
        self._client.start_stream(callback=lambda result, error: self._results.put((result, error)))
        fields = {"stream": True} | fields  # absent, the model answers in one response (as vllm_backend)
        self._client.async_stream_infer(model, grpc_inputs(fields), request_id=uuid.uuid4().hex,
                                        enable_empty_final_response=True)

    def __iter__(self) -> Iterator[Chunk]:
        finished = False
        try:
            while True:
                result, error = self._results.get(timeout=self.timeout_s)
                if error is not None:
                    finished = True
                    raise ServerError(str(error))
                chunk = _chunk(result)
                finished = result.get_response().parameters["triton_final_response"].bool_param
                if chunk is not None:
                    yield chunk
                if finished:
                    return
        finally:
            # A consumer that stops reading early cancels: closing alone would wait for the whole answer.
            self.close() if finished else self.cancel()

    def cancel(self) -> None:
        """Cancel the request on the server and close the connection."""
        self._client.stop_stream(cancel_requests=True)
        self._client.close()

    def close(self) -> None:
        """Close the stream and the connection."""
        self._client.stop_stream()
        self._client.close()


def stream_grpc(url: str, model: str, **fields) -> Iterator[Chunk]:
    """Stream one request's chunks over gRPC, e.g. `stream_grpc(url, "flover", text_input="Hi", max_tokens=8)`."""
    return iter(GrpcStream(url, model, fields))


def stream_http(url: str, model: str, timeout_s: float = 300.0, **fields) -> Iterator[Chunk]:
    """Stream one request's chunks over HTTP `generate_stream` (server-sent events)."""
    request = urllib.request.Request(f"{url}/v2/models/{model}/generate_stream",
                                     data=json.dumps({"stream": True} | fields).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as exc:
        raise ServerError(_error_text(exc.read())) from None
    with response:
        for line in response:
            if not line.startswith(b"data:"):
                continue
            event = json.loads(line[len(b"data:"):])
            if "error" in event:
                raise ServerError(event["error"])
            chunk = _http_chunk(event)
            yield chunk
            if chunk.finish_reason is not None:
                return
    # urllib ends a chunked body cut short (the server died) as if it were whole: only the missing final says so.
    raise ServerError("the server closed the stream before the final response")


def generate_http(url: str, model: str, timeout_s: float = 300.0, **fields) -> Chunk:
    """One non-streaming request over HTTP `generate` (`stream` false): the whole answer in one response."""
    request = urllib.request.Request(f"{url}/v2/models/{model}/generate",
                                     data=json.dumps({**fields, "stream": False}).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return _http_chunk(json.loads(response.read()))
    except urllib.error.HTTPError as exc:
        raise ServerError(_error_text(exc.read())) from None


def _http_chunk(event: dict) -> Chunk:
    text = event.get("text_output", "")
    ids = event.get("output_ids", [])
    return Chunk(text="".join(text) if isinstance(text, list) else text,
                 token_ids=ids if isinstance(ids, list) else [ids],
                 finish_reason=_scalar(event.get("finish_reason")), num_output_tokens=_scalar(event.get("num_output_tokens")),
                 logprobs=json.loads(_scalar(event["logprobs"])) if "logprobs" in event else None,
                 cumulative_logprob=_scalar(event.get("cumulative_logprob")))


def _scalar(value):
    return value[0] if isinstance(value, list) else value


def _error_text(body: bytes) -> str:
    try:
        return json.loads(body)["error"]
    except (ValueError, KeyError):
        return body.decode(errors="replace")
