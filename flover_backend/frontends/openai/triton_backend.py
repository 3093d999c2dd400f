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
from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE, InferInput
from tritonclient.utils import InferenceServerException, np_to_triton_dtype, triton_to_np_dtype

from flover_backend.admission import AdmissionLimits
from flover_backend.config import EngineConfig
from flover_backend.frontends.openai.errors import APIError, from_triton, triton_unavailable
from flover_backend.triton_env import GRPC_ADMIN_KEY_HEADER

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(EngineConfig)}
# tritonclient's own message limits, and reconnection at most a second apart: after tritonserver restarts
# (the launcher's watchdog restarts it when a backend dies) the front serves, and says ready, within a
# second of it, instead of after gRPC's default backoff, which grows to minutes.
CHANNEL_ARGS = [("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
                ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
                ("grpc.initial_reconnect_backoff_ms", 250), ("grpc.max_reconnect_backoff_ms", 1000)]


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
    num_cached_tokens: int = 0  # prompt tokens whose keys the engine reused (usage.prompt_tokens_details)


@dataclass(frozen=True)
class ModelInfo:
    """A served model and its engine settings (config.pbtxt `parameters`), as Triton reports them."""

    name: str
    settings: dict[str, str]
    inputs: dict[str, tuple[type, bool]] = dataclasses.field(default_factory=dict)  # name: (NumPy dtype, is a list)

    @property
    def checkpoint(self) -> str:
        """The engine's `model` setting: `builtin:<name>` or a checkpoint directory."""
        return self.settings.get("model", _DEFAULTS["model"])

    @property
    def max_model_len(self) -> int:
        """The served model's max_model_len setting."""
        return int(self.settings.get("max_model_len", _DEFAULTS["max_model_len"]))

    @property
    def admission(self) -> AdmissionLimits:
        """The bounds the served model puts on a prompt, checked here before any request is sent."""
        return AdmissionLimits(self.max_model_len, int(self.settings.get("max_prompt_bytes", 0)))


def triton_inputs(fields: dict, declared: dict[str, tuple[type, bool]]) -> list[InferInput]:
    """Triton inputs for {input name: value}, typed as the served model declares them (its config, which the
    model completes from the parameter table): so the front repeats no input's type."""
    inputs = []
    for name, value in fields.items():
        dtype, is_list = declared[name]
        values = value if is_list else [value]
        if dtype == np.object_:
            array = np.array([v.encode("utf-8") for v in values], dtype=np.object_)
        else:
            array = np.array(values, dtype=dtype)
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
        self._client = grpc_aio.InferenceServerClient(self.url, channel_args=CHANNEL_ARGS)

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
            config = config.get("config", {})
            settings = {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}
            inputs = {tensor["name"]: (_numpy_dtype(tensor["data_type"]), [int(d) for d in tensor["dims"]] == [-1])
                      for tensor in config.get("input", [])}
            self._models[name] = ModelInfo(name, settings, inputs)
        return self._models[name]

    async def generate(self, model: ModelInfo, fields: dict, *, request_id: str = "",
                       prompt_param: str = "prompt") -> AsyncIterator[Delta]:
        """Stream one request's responses. Closing the iterator early cancels the gRPC call: Triton then
        marks the request cancelled, and the flover model frees its row at the next iteration boundary."""
        done = asyncio.Event()

        async def requests():
            """The one request this stream carries."""
            yield {"model_name": model.name, "inputs": triton_inputs(fields, model.inputs), "request_id": request_id}
            await done.wait()  # our half of the stream stays open until the answer is complete

        call = self._client.stream_infer(requests())
        finished = False
        try:
            async for result, error in call:
                if error is not None:
                    finished = True
                    failure = from_triton(error.message(), model=model.name, prompt_param=prompt_param)
                    if failure.status == 404:
                        self._models.pop(model.name, None)
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
    # On the final response (the first two on every one if asked).
    for name in ("num_input_tokens", "num_output_tokens", "num_cached_tokens"):
        count = result.as_numpy(name)
        setattr(delta, name, int(count[0]) if count is not None else 0)
    final = result.get_response().parameters.get("triton_final_response")
    if reason is not None or (final is not None and final.bool_param):
        delta.finish_reason = reason[0].decode() if reason is not None else "stop"
    return delta


def _numpy_dtype(data_type: str) -> type:
    """The NumPy dtype of a model config's data type ("TYPE_INT32"; "TYPE_STRING" is BYTES on the wire)."""
    return triton_to_np_dtype(data_type.removeprefix("TYPE_").replace("STRING", "BYTES"))


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
