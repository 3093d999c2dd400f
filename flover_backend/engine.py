"""The engine: ONE inference loop for the life of the server, fed by any thread."""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from flover_backend.config import EngineConfig
from flover_backend.detokenizer import IncrementalDetokenizer
from flover_backend.engine_stats import EngineStats, IterationRecord
from flover_backend.errors import EngineDeadError, InvalidRequestError
from flover_backend.model_runner import ModelRunner
from flover_backend.models.loader import load_tokenizer, resolve_model_path
from flover_backend.request import Request, RequestStatus
from flover_backend.sampling_params import SamplingParams
from flover_backend.scheduler import Scheduler

logger = logging.getLogger(__name__)


@dataclass
class RequestOutput:
    """What one iteration produced for one request: new tokens and text, and on the last, why it ended."""

    req_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    error: str | None = None


OutputCallback = Callable[[RequestOutput], None]


def _until_finished(outputs: queue.SimpleQueue) -> Iterator[RequestOutput]:
    """Outputs from the queue up to and including the final one."""
    while True:
        output = outputs.get()
        yield output
        if output.finished:
            return


class Engine:
    """Admit at every iteration boundary, decode every live request in one forward, compact, repeat."""

    def __init__(self, config: EngineConfig):
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        model_path = resolve_model_path(config.model)
        self.tokenizer = load_tokenizer(model_path)
        self.runner = ModelRunner(config, model_path)
        model_config = self.runner.model.config
        if config.max_model_len > model_config.max_position_embeddings:
            raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's "
                             f"max_position_embeddings {model_config.max_position_embeddings}")
        self.vocab_size = model_config.vocab_size
        eos = model_config.eos_token_id
        self.scheduler = Scheduler(config, eos_token_ids=set(eos if isinstance(eos, list) else [eos]) - {None})
        self.stats = EngineStats()
        self._callbacks: dict[str, OutputCallback] = {}
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._inbox: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.failure: str | None = None  # why the loop died, once it has: the engine then serves nothing more

    # ----- callers (any thread) -----

    def add_request(
        self,
        prompt: str | None = None,
        params: SamplingParams | None = None,
        *,
        prompt_token_ids: list[int] | None = None,
        req_id: str | None = None,
        on_output: OutputCallback,
    ) -> str:
        """Validate and queue a request; `on_output` gets its outputs on the loop thread. Returns its id."""
        if self._stopping:
            raise EngineDeadError("the engine is stopped")
        params = params or SamplingParams()
        token_ids = self._prompt_token_ids(prompt, prompt_token_ids)
        total = len(token_ids) + params.max_tokens
        if len(token_ids) >= self.config.max_model_len:
            raise InvalidRequestError("prompt", f"{len(token_ids)} tokens leave no room in max_model_len "
                                                f"{self.config.max_model_len}")
        if total > self.config.max_model_len:
            raise InvalidRequestError("max_tokens", f"prompt ({len(token_ids)} tokens) + max_tokens "
                                                    f"({params.max_tokens}) exceeds max_model_len "
                                                    f"{self.config.max_model_len}")
        req_id = req_id if req_id is not None else f"req-{next(self._ids)}"
        request = Request(req_id, token_ids, params)
        self._inbox.put(("add", (request, on_output)))
        self._wakeup.set()
        return req_id

    def abort(self, req_id: str) -> None:
        """Stop a request at the next iteration boundary; it ends with finish_reason 'abort'."""
        self._inbox.put(("abort", req_id))
        self._wakeup.set()

    def generate(self, prompt: str | None = None, params: SamplingParams | None = None, *,
                 prompt_token_ids: list[int] | None = None) -> Iterator[RequestOutput]:
        """Submit one request now (errors raise here) and return an iterator over its outputs (needs the loop running)."""
        outputs: queue.SimpleQueue[RequestOutput] = queue.SimpleQueue()
        self.add_request(prompt, params, prompt_token_ids=prompt_token_ids, on_output=outputs.put)
        return _until_finished(outputs)

    def start(self) -> Engine:
        """Start the loop thread."""
        self._thread = threading.Thread(target=self._loop, name="flover-loop", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the loop; requests still in flight end with finish_reason 'abort'."""
        self._stopping = True
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.runner.close()

    def __enter__(self):  # unannotated: typing.Self needs Python 3.11
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def is_alive(self) -> bool:
        """Whether the loop thread is running."""
        return self._thread is not None and self._thread.is_alive()

    def run_until_idle(self) -> None:
        """Run iterations on the calling thread until every queued request has finished (no loop thread)."""
        assert self._thread is None, "the loop thread is running"
        while self.step() or self.scheduler.has_work():
            time.sleep(self.scheduler.seconds_until_admission(time.monotonic()) or 0.0)

    # ----- the loop -----

    def _loop(self) -> None:
        status, error = RequestStatus.FINISHED_ABORT, None
        try:
            self.runner.bind_thread()  # the current GPU is per thread, and this thread runs every forward
            while not self._stopping:
                if not self.step():
                    wait = self.scheduler.seconds_until_admission(time.monotonic())
                    self._wakeup.wait(timeout=wait)
                    self._wakeup.clear()
        except Exception as exc:  # a bug outside the forward: fail everyone clearly rather than hang them
            logger.exception("the inference loop crashed")
            status, error = RequestStatus.FINISHED_ERROR, f"the inference loop crashed: {type(exc).__name__}: {exc}"
        finally:
            self._stopping = True  # from now on add_request refuses
            self.failure = error
            self._drain_inbox()
            for request in list(self.scheduler.waiting) + list(self.scheduler.running.values()):
                request.error = error
                self.scheduler.finish(request, status)
                self._emit(request, [], "")

    def step(self) -> bool:
        """One iteration: take arrivals and aborts, schedule at the boundary, run, emit; False if idle."""
        started = time.perf_counter()
        self._drain_inbox()
        out = self.scheduler.schedule(time.monotonic())
        self._publish_counts()
        for request in out.aborted:
            self._emit(request, [], "")
        if not out.scheduled:
            return bool(out.aborted)
        try:
            sampled, moved_bytes, timings = self.runner.execute(out)
        except EngineDeadError:  # a lost tensor-parallel rank: nothing more can run, so the loop ends
            raise
        except Exception as exc:  # a failed forward fails its batch, never the loop
            logger.exception("iteration failed")
            for request in out.scheduled:
                request.error = f"{type(exc).__name__}: {exc}"
                self.scheduler.finish(request, RequestStatus.FINISHED_ERROR)
            self._publish_counts()
            for request in out.scheduled:
                self._emit(request, [], "")
            return True
        for row, error in sampled.errors.items():  # a row that could not be sampled fails alone
            out.scheduled[row].error = error
            self.scheduler.finish(out.scheduled[row], RequestStatus.FINISHED_ERROR)
        self.scheduler.update_from_output(out, sampled.token_ids)
        texts = [self._detokenize(request) for request in out.scheduled]
        # Totals first, so whoever reads them on hearing of a finished request sees that request gone.
        self.stats.record(IterationRecord(
            time=time.monotonic(), seconds=time.perf_counter() - started, num_decode=len(out.decode),
            decode_span=out.decode_span, num_prefill=len(out.prefill), num_waiting=self.scheduler.num_waiting,
            num_moves=len(out.moves), moved_bytes=moved_bytes, compaction_seconds=timings.compaction,
            decode_seconds=timings.decode, prefill_seconds=timings.prefill,
        ))
        self._publish_counts()
        for request, text in zip(out.scheduled, texts):
            self._emit(request, [] if request.error else request.output_token_ids[-1:], text)
        return True

    def _publish_counts(self) -> None:
        self.stats.num_running = self.scheduler.num_running
        self.stats.num_waiting = self.scheduler.num_waiting

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                request, callback = payload
                self._callbacks[request.req_id] = callback
                self._detokenizers[request.req_id] = IncrementalDetokenizer(self.tokenizer, request.params.stop)
                self.scheduler.add_request(request)
            else:
                self.scheduler.abort(payload)
        self._publish_counts()

    def _detokenize(self, request: Request) -> str:
        """Text of the newest token that is safe to send; ends the request if a stop string appeared."""
        detokenizer = self._detokenizers[request.req_id]
        text, hit_stop = detokenizer.step(request.output_token_ids, request.status.finished)
        if hit_stop:
            self.scheduler.finish(request, RequestStatus.FINISHED_STOP)
        return text

    def _emit(self, request: Request, new_token_ids: list[int], new_text: str) -> None:
        finished = request.status.finished
        output = RequestOutput(request.req_id, new_token_ids, new_text, finished, request.status.finish_reason,
                               request.num_prompt_tokens, request.num_output_tokens, request.error)
        callback = self._callbacks[request.req_id]
        if finished:
            del self._callbacks[request.req_id]
            del self._detokenizers[request.req_id]
            self.runner.sampler.release(request.req_id)
            self.stats.num_finished += 1
        try:
            callback(output)
        except Exception:  # a broken consumer loses its own request, nothing else
            logger.exception("output callback for %s failed; aborting it", request.req_id)
            if not finished:
                self.scheduler.abort(request.req_id)

    def _prompt_token_ids(self, prompt: str | None, prompt_token_ids: list[int] | None) -> list[int]:
        if (prompt is None) == (prompt_token_ids is None):
            raise InvalidRequestError("prompt", "give exactly one of a text prompt or prompt token ids")
        if prompt is not None:
            if not isinstance(prompt, str) or not prompt:
                raise InvalidRequestError("prompt", "must be a non-empty string")
            return self.tokenizer.encode(prompt).ids
        if not prompt_token_ids:
            raise InvalidRequestError("input_ids", "must be a non-empty list of token ids")
        bad = [t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError("input_ids", f"ids must be in [0, {self.vocab_size}), got {bad[:5]}")
        return list(prompt_token_ids)
