"""The Triton Python-backend model: a thin, decoupled adapter around one engine and its single loop."""

from __future__ import annotations

import itertools
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import triton_python_backend_utils as pb_utils

from flover_backend.config import EngineConfig
from flover_backend.engine.engine import Engine, RequestOutput
from flover_backend.frontends.triton.logs import configure_logging
from flover_backend.frontends.triton.metrics import EngineMetrics, refusal_reason
from flover_backend.frontends.triton.parsing import ParsedRequest, parse_request
from flover_backend.frontends.triton.schema import INPUTS, OUTPUTS
from flover_backend.sampling.logprobs import TokenLogprobs, vllm_logprobs

logger = logging.getLogger(__name__)
# In-flight requests are checked for client cancellation (and the metrics published) on one tick. Each check
# is a round trip to tritonserver per stream, and on a busy CPU every round trip preempts a thread of the
# forward: the tick stretches with the streams so that checks stay near MAX_CANCEL_CHECKS_PER_S. Measured
# through the server (builtin:small, 2-core AMD EPYC), 32 streams x 128 tokens: a tick of 0.1 s gave 285-317 tok/s,
# of 1 s 333-345.
MAX_CANCEL_CHECKS_PER_S = 32
CANCEL_POLL_MIN_S, CANCEL_POLL_MAX_S = 0.1, 2.0  # so a cancelled request runs on for at most 2 s


def cancel_poll_seconds(num_streams: int) -> float:
    """The tick at which `num_streams` in-flight requests are checked for cancellation."""
    return min(max(CANCEL_POLL_MIN_S, num_streams / MAX_CANCEL_CHECKS_PER_S), CANCEL_POLL_MAX_S)
_STOP = object()


@dataclass
class _Stream:
    """One in-flight Triton request: where its responses go and what it has received so far."""

    req_id: str
    sender: object  # pb_utils.InferenceResponseSender
    parsed: ParsedRequest
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs] | None = None  # kept for the one response of a request not streamed
    cancel_sent: bool = False


class TritonPythonModel:
    """`execute` hands requests to the engine and returns; a response thread sends what the loop makes."""

    @staticmethod
    def auto_complete_config(auto_complete_model_config):
        """Declare the inputs and outputs (schema.py, from the parameter table) to Triton, as vllm_backend does:
        config.pbtxt then holds only a deployment's settings, and a new parameter touches no config file."""
        config = auto_complete_model_config.as_dict()
        for section, specs, add, optional in (("input", INPUTS, auto_complete_model_config.add_input, True),
                                              ("output", OUTPUTS, auto_complete_model_config.add_output, False)):
            declared = {tensor["name"] for tensor in config.get(section, [])}
            for spec in specs:
                if spec.name not in declared:
                    add(spec.as_config(optional))
        return auto_complete_model_config

    def initialize(self, args: dict) -> None:
        """Start the engine with the settings in config.pbtxt `parameters`, and the response thread."""
        model_config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(model_config):
            raise pb_utils.TritonModelException("the flover model must be decoupled (it streams)")
        settings = {key: value["string_value"] for key, value in model_config.get("parameters", {}).items()}
        # The stub process's logging, not the engine's: an engine embedded elsewhere leaves its host's alone.
        configure_logging(settings.pop("log_level", "info"), args["model_instance_name"])
        config = EngineConfig.from_dict(settings)
        self.engine = Engine(config).start()
        self.limits = config.admission
        self.metrics = EngineMetrics(pb_utils, {"model": args["model_name"], "instance": args["model_instance_name"]},
                                     config.max_model_len)
        self._outputs: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._ids = itertools.count()
        self._id_prefix = f"{args['model_instance_name']}-"
        self._model_name = args["model_name"]
        self._unload_asked = False
        self._responder = threading.Thread(target=self._respond_loop, name="flover-responder", daemon=True)
        self._responder.start()

    def execute(self, requests: list) -> None:
        """Queue every request in the engine (or answer it with an error); never waits for generation."""
        for request in requests:
            sender = request.get_response_sender()
            try:
                self._admit(request, sender)
            except Exception as exc:  # noqa: BLE001 - every refusal is answered and counted; bugs are logged
                self._refuse(request, sender, exc)

    def _admit(self, request, sender) -> None:
        parsed = parse_request(_inputs(request), self.limits, request.parameters())
        stream = _Stream(f"{self._id_prefix}{next(self._ids)}", sender, parsed)
        self._streams[stream.req_id] = stream  # before the engine can answer, so cancellation is watched
        try:
            self.engine.add_request(parsed.prompt, parsed.params, prompt_token_ids=parsed.prompt_token_ids,
                                    req_id=stream.req_id, on_output=lambda out: self._outputs.put((stream, out)))
        except Exception:
            del self._streams[stream.req_id]
            raise
        # Wake the response thread: idle, it sleeps until an output comes, and a request waiting for a row
        # (or a window) makes none, yet its cancellation must be watched and the metrics must show it.
        self._outputs.put(None)

    def _refuse(self, request, sender, error: Exception) -> None:
        """Answer a request the engine did not take with an error, and count it by cause."""
        reason = refusal_reason(error)
        self.metrics.count_refused(reason)
        if reason == "internal":  # a bug: the client gets no traceback or server path, the log gets both
            logger.exception("request %s failed before reaching the engine", request.request_id())
            _send_error(sender, "internal error (logged on the server)", pb_utils.TritonError.INTERNAL)
        else:
            code = pb_utils.TritonError.INVALID_ARG if reason == "invalid" else pb_utils.TritonError.UNAVAILABLE
            _send_error(sender, str(error), code)
        self._outputs.put(None)  # wake the response thread, idle perhaps, to publish the count

    def finalize(self) -> None:
        """Stop the loop (in-flight requests end with 'abort'), flush their responses, join the threads."""
        self.engine.stop()
        self._outputs.put(_STOP)
        self._responder.join()

    # ----- response thread -----

    def _respond_loop(self) -> None:
        self.metrics.update(self.engine.stats)  # the arena's capacity is on the page before any request comes
        last_poll = 0.0
        while True:
            # Idle, sleep until the engine says something: an idle model must cost the server nothing,
            # since it shares the CPU with the models that are busy.
            tick = cancel_poll_seconds(len(self._streams))
            timeout = tick if self._streams else None
            try:
                item = self._outputs.get(timeout=timeout)
            except queue.Empty:
                item = None
            if item is _STOP:
                return
            try:
                if item is not None:
                    self._send(*item)
                now = time.monotonic()
                if now - last_poll >= tick or not self._streams:
                    last_poll = now
                    self._poll_cancellations()
                    self.metrics.update(self.engine.stats)
                if self.engine.failure is not None and not self._unload_asked:
                    self._unload_asked = True
                    threading.Thread(target=self._unload_self, name="flover-unload", daemon=True).start()
            except Exception:  # this thread serves every request: log, never die
                logger.exception("response thread error")

    def _unload_self(self) -> None:
        """Have Triton unload this model once its engine is dead, so its ready endpoint says so.

        The Python backend cannot mark a model unready, but it can ask the server (in explicit model
        control mode, which `flover serve` uses) to unload it. From a thread of its own: the unload
        ends in `finalize`, which joins the response thread.
        """
        logger.error("the engine of %s has failed (%s); asking Triton to unload it", self._model_name,
                     self.engine.failure)
        try:
            pb_utils.unload_model(self._model_name)
        except Exception:  # e.g. a server not in explicit mode: the model stays, refusing requests
            logger.exception("could not unload %s", self._model_name)

    def _poll_cancellations(self) -> None:
        for stream in list(self._streams.values()):
            if not stream.cancel_sent and stream.sender.is_cancelled():
                stream.cancel_sent = True
                self.engine.abort(stream.req_id)

    def _send(self, stream: _Stream, output: RequestOutput) -> None:
        try:
            if output.finish_reason == "error":
                _send_error(stream.sender, f"generation failed: {output.error}", pb_utils.TritonError.INTERNAL)
            elif stream.cancel_sent and output.finished:
                stream.sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            elif stream.parsed.stream:
                self._send_delta(stream, output)
            else:
                self._accumulate(stream, output)
        except Exception:  # the client is gone: stop generating for it
            logger.exception("sending to %s failed; aborting it", stream.req_id)
            self.engine.abort(stream.req_id)
        if output.finished:
            self._streams.pop(stream.req_id, None)

    def _send_delta(self, stream: _Stream, output: RequestOutput) -> None:
        tensors = _token_tensors(output.new_text, output.new_token_ids)
        tensors += self._logprob_tensors(stream.parsed, output, output.logprobs)
        tensors += self._prompt_logprob_tensors(output.prompt_logprobs)
        tensors += _status_tensors(stream.parsed, output, len(output.new_token_ids))
        flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if output.finished else 0
        stream.sender.send(pb_utils.InferenceResponse(output_tensors=tensors), flags=flags)

    def _accumulate(self, stream: _Stream, output: RequestOutput) -> None:
        stream.text.append(output.new_text)
        stream.token_ids.extend(output.new_token_ids)
        stream.logprobs.extend(output.logprobs or [])
        if output.prompt_logprobs is not None:
            stream.prompt_logprobs = output.prompt_logprobs
        if not output.finished:
            return
        prefix = "" if stream.parsed.exclude_input_in_output or stream.parsed.prompt is None else stream.parsed.prompt
        tensors = (_token_tensors(prefix + "".join(stream.text), stream.token_ids)
                   + self._logprob_tensors(stream.parsed, output, stream.logprobs)
                   + self._prompt_logprob_tensors(stream.prompt_logprobs)
                   + _status_tensors(stream.parsed, output, len(stream.token_ids)))
        stream.sender.send(pb_utils.InferenceResponse(output_tensors=tensors),
                           flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _logprob_tensors(self, parsed: ParsedRequest, output: RequestOutput, logprobs: list[TokenLogprobs]) -> list:
        """The `logprobs` (JSON) and `cumulative_logprob` outputs, those the request asked for."""
        tensors = []
        if parsed.return_logprobs:
            shaped = vllm_logprobs(logprobs, self._decode_each)
            tensors.append(pb_utils.Tensor("logprobs", np.array([json.dumps(shaped).encode()], dtype=np.object_)))
        if parsed.return_cumulative_logprob:
            tensors.append(pb_utils.Tensor("cumulative_logprob",
                                           np.array([output.cumulative_logprob], dtype=np.float32)))
        return tensors

    def _prompt_logprob_tensors(self, entries: list[TokenLogprobs] | None) -> list:
        """The `prompt_logprobs` output (JSON, vLLM's shape: null for the first prompt token), if these are the
        request's prompt logprobs."""
        if entries is None:
            return []
        shaped = [None, *vllm_logprobs(entries, self._decode_each)]
        return [pb_utils.Tensor("prompt_logprobs", np.array([json.dumps(shaped).encode()], dtype=np.object_))]

    def _decode_each(self, token_ids: list[int]) -> list[str]:
        """Each token's own text, special tokens included (on this thread, not the loop's)."""
        return self.engine.tokenizer.decode_batch([[t] for t in token_ids], skip_special_tokens=False)


def _inputs(request) -> dict[str, np.ndarray]:
    """The request's inputs by name, as NumPy arrays (BYTES become object arrays of bytes)."""
    tensors = {}
    for spec in INPUTS:
        tensor = pb_utils.get_input_tensor_by_name(request, spec.name)
        if tensor is not None:
            tensors[spec.name] = tensor.as_numpy()
    return tensors


def _token_tensors(text: str, token_ids: list[int]) -> list:
    return [pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_)),
            pb_utils.Tensor("output_ids", np.array(token_ids, dtype=np.int32))]


def _status_tensors(parsed: ParsedRequest, output: RequestOutput, num_new_tokens: int) -> list:
    """finish_reason and the token counts. A vllm_backend flag set sends its output on every response, with its
    semantics (finish_reason "None" until the last, num_output_tokens this response's); unset, the final
    response carries the reason and the totals, as the flover models always did; false, it is left out."""
    def wanted(flag: bool | None) -> bool:
        return bool(flag) or (flag is None and output.finished)

    tensors = []
    if wanted(parsed.return_finish_reason):
        tensors.append(pb_utils.Tensor("finish_reason", np.array([str(output.finish_reason).encode()],
                                                                 dtype=np.object_)))
    if wanted(parsed.return_num_input_tokens):
        tensors.append(pb_utils.Tensor("num_input_tokens", np.array([output.num_prompt_tokens], dtype=np.int32)))
    if wanted(parsed.return_num_output_tokens):
        count = num_new_tokens if parsed.return_num_output_tokens else output.num_output_tokens
        tensors.append(pb_utils.Tensor("num_output_tokens", np.array([count], dtype=np.int32)))
    if output.finished:  # prompt tokens whose keys were copied from a cached prefix, not computed
        tensors.append(pb_utils.Tensor("num_cached_tokens", np.array([output.num_cached_tokens], dtype=np.int32)))
    return tensors


def _send_error(sender, message: str, code) -> None:
    response = pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))
    sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
