"""The front's side of tritonserver: the served models, their settings, and one generation as an async stream."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import numpy as np
import tritonclient.grpc.aio as grpc_aio
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from flover_backend.config import EngineConfig
from flover_backend.openai_front.errors import APIError, from_triton, triton_unavailable
from flover_backend.triton_env import GRPC_ADMIN_KEY_HEADER

# Input name -> the NumPy dtype model_repository/flover/config.pbtxt declares; the rest are BYTES.
INPUT_DTYPES = {"input_ids": np.int32, "max_tokens": np.int32, "temperature": np.float32, "top_k": np.int32,
                "top_p": np.float32, "seed": np.int64, "ignore_eos": np.bool_, "stream": np.bool_,
                "min_tokens": np.int32, "repetition_penalty": np.float32, "presence_penalty": np.float32,
                "frequency_penalty": np.float32, "return_logprobs": np.bool_}
LIST_INPUTS = {"input_ids", "stop"}
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(EngineConfig)}


@dataclass
class Delta:
    """One streamed response of the flover model; the last also says why it ended and counts tokens."""

    text: str
    token_ids: list[int]
    logprobs: list[dict] | None = None  # per token {token id: {logprob, rank, decoded_token}}, if asked for
    prompt_logprobs: list[dict] | None = None  # the same per prompt token from the second, with the first token
    finish_reason: str | None = None
    num_input_tokens: int = 0
    num_output_tokens: int = 0


@dataclass(frozen=True)
class ModelInfo:
    """A served model and its engine settings (config.pbtxt `parameters`), as Triton reports them."""

    name: str
    settings: dict[str, str]

    @property
    def checkpoint(self) -> str:
        """The engine's `model` setting: `builtin:<name>` or a checkpoint directory."""
        return self.settings.get("model", _DEFAULTS["model"])

    @property
    def max_model_len(self) -> int:
        """The served model's max_model_len setting."""
        return int(self.settings.get("max_model_len", _DEFAULTS["max_model_len"]))


def triton_inputs(fields: dict) -> list[InferInput]:
    """Triton inputs for {input name: value}: scalars, strings and lists (input_ids, stop)."""
    inputs = []
    for name, value in fields.items():
        values = value if name in LIST_INPUTS else [value]
        if name in INPUT_DTYPES:
            array = np.array(values, dtype=INPUT_DTYPES[name])
        else:
            array = np.array([v.encode("utf-8") for v in values], dtype=np.object_)
        tensor = InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


class TritonBackend:
    """One gRPC channel to tritonserver (create it inside the event loop: `await start()`)."""

    def __init__(self, url: str, admin_key: str | None = None):
        self.url = url
        # The repository index is an admin API: listing the served models needs the operator's key.
        self._admin_headers = {GRPC_ADMIN_KEY_HEADER: admin_key} if admin_key else None
        self._client: grpc_aio.InferenceServerClient | None = None
        self._models: dict[str, ModelInfo] = {}

    async def start(self) -> None:
        """Open the channel (inside the event loop)."""
        self._client = grpc_aio.InferenceServerClient(self.url)

    async def close(self) -> None:
        """Close the channel."""
        if self._client is not None:
            await self._client.close()

    async def is_ready(self) -> bool:
        """Whether tritonserver says it is ready."""
        try:
            return bool(await self._client.is_server_ready(client_timeout=5.0))
        except InferenceServerException:
            return False

    async def model_names(self) -> list[str]:
        """The models Triton has loaded and marked READY (its repository index)."""
        index = await self._call(self._client.get_model_repository_index(headers=self._admin_headers, as_json=True,
                                                                        client_timeout=10.0))
        return sorted({entry["name"] for entry in index.get("models", []) if entry.get("state") == "READY"})

    async def model_info(self, name: str) -> ModelInfo | None:
        """The served model `name` with its settings, or None when Triton serves no such model."""
        if name not in self._models:
            if name not in await self.model_names():
                return None
            config = await self._call(self._client.get_model_config(name, as_json=True, client_timeout=10.0))
            parameters = config.get("config", {}).get("parameters", {})
            self._models[name] = ModelInfo(name, {key: value.get("string_value", "")
                                                  for key, value in parameters.items()})
        return self._models[name]

    async def generate(self, model: str, fields: dict, *, request_id: str = "",
                       prompt_param: str = "prompt") -> AsyncIterator[Delta]:
        """Stream one request's responses. Closing the iterator early cancels the gRPC call: Triton then
        marks the request cancelled, and the flover model frees its row at the next iteration boundary."""
        done = asyncio.Event()

        async def requests():
            """The one request this stream carries."""
            yield {"model_name": model, "inputs": triton_inputs(fields), "request_id": request_id}
            await done.wait()  # our half of the stream stays open until the answer is complete

        call = self._client.stream_infer(requests())
        finished = False
        try:
            async for result, error in call:
                if error is not None:
                    finished = True
                    failure = from_triton(error.message(), model=model, prompt_param=prompt_param)
                    if failure.status == 404:
                        self._models.pop(model, None)
                    raise failure
                delta = _delta(result)
                finished = delta.finish_reason is not None
                yield delta
                if finished:
                    return
            finished = True
            raise APIError(500, "the inference server closed the stream before the answer was complete")
        except (InferenceServerException, grpc.aio.AioRpcError) as exc:
            finished = True
            raise _grpc_error(exc) from None
        finally:
            done.set()
            if not finished:
                call.cancel()

    async def _call(self, awaitable):
        try:
            return await awaitable
        except (InferenceServerException, grpc.aio.AioRpcError) as exc:
            raise _grpc_error(exc) from None


def _delta(result) -> Delta:
    text = result.as_numpy("text_output")
    ids = result.as_numpy("output_ids")
    reason = result.as_numpy("finish_reason")
    logprobs = result.as_numpy("logprobs")
    prompt_logprobs = result.as_numpy("prompt_logprobs")
    delta = Delta(text=b"".join(text).decode("utf-8") if text is not None else "",
                  token_ids=ids.tolist() if ids is not None else [],
                  logprobs=json.loads(logprobs[0]) if logprobs is not None else None,
                  # vLLM's shape starts with null (the first prompt token has no logprob): the steps after it
                  prompt_logprobs=json.loads(prompt_logprobs[0])[1:] if prompt_logprobs is not None else None)
    final = result.get_response().parameters.get("triton_final_response")
    if reason is not None or (final is not None and final.bool_param):
        delta.finish_reason = reason[0].decode() if reason is not None else "stop"
        for name in ("num_input_tokens", "num_output_tokens"):
            count = result.as_numpy(name)
            setattr(delta, name, int(count[0]) if count is not None else 0)
    return delta


def _grpc_error(exc: Exception) -> APIError:
    """A failed gRPC call: Triton not reachable (503), or another failure (500)."""
    if isinstance(exc, grpc.aio.AioRpcError):
        status, message = exc.code(), exc.details()
        unavailable = status in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    else:
        status, message = exc.status(), exc.message()
        unavailable = str(status) in ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED")
    if unavailable:
        return triton_unavailable(message)
    return APIError(500, f"inference server call failed ({status}): {message}")
