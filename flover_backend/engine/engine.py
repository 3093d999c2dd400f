"""The engine: ONE inference loop for the life of the server, fed by any thread."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flover_backend.admission import check_admission
from flover_backend.config import EngineConfig
from flover_backend.engine.output_processor import OutputProcessor
from flover_backend.engine.scheduler import Scheduler
from flover_backend.engine.stats import EngineStats, FinishedRecord, IterationRecord
from flover_backend.engine.thread import EngineThread, run_into
from flover_backend.errors import EngineBusyError, EngineDeadError, InvalidRequestError
from flover_backend.execution.iteration import SchedulerOutput
from flover_backend.execution.model_runner import ModelRunner, StepResult, StepTimings
from flover_backend.execution.models.loader import load_tokenizer, resolve_model_path
from flover_backend.request import Request, RequestStatus
from flover_backend.sampling.grammar import GrammarCompiler
from flover_backend.sampling.logprobs import TokenLogprobs
from flover_backend.sampling.params import SamplingParams

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
    num_cached_tokens: int = 0  # prompt tokens whose keys were copied from another row, not computed
    logprobs: list[TokenLogprobs] | None = None  # one per new token, if the request asked for logprobs
    cumulative_logprob: float | None = None  # of every token so far, if the request asked for logprobs
    # With its first token, if the request asked for prompt logprobs: one per prompt token after the first.
    prompt_logprobs: list[TokenLogprobs] | None = None


OutputCallback = Callable[[RequestOutput], None]
# What one iteration hands a request's callback: its new token ids, text and (if it asked) their logprobs.
Emitted = tuple[Request, list[int], str, list[TokenLogprobs]]


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
        model_path = resolve_model_path(config.model)
        self.tokenizer = load_tokenizer(model_path)
        # Every torch call of this engine runs on this one thread (see engine_thread for why).
        self._torch_thread = EngineThread()
        try:
            self.runner = self._torch_thread.call(lambda: self._load_runner(model_path))
        except BaseException:
            self._torch_thread.close()
            raise
        if self.runner.max_num_seqs != config.max_num_seqs:  # sized from free GPU memory (gpu_memory_utilization)
            config = self.config = dataclasses.replace(config, max_num_seqs=self.runner.max_num_seqs)
        model_config = self.runner.model.config
        if config.max_model_len > model_config.max_position_embeddings:
            raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's "
                             f"max_position_embeddings {model_config.max_position_embeddings}")
        self.vocab_size = model_config.vocab_size
        self.scheduler = Scheduler(config)
        self.outputs = OutputProcessor(self.tokenizer, self.runner.eos_token_ids)
        self.grammars = GrammarCompiler(self.tokenizer, self.vocab_size, self.runner.eos_token_ids)
        arena, world = self.runner.arena, config.tensor_parallel_size
        self._kv_bytes_per_position = arena.bytes_per_position * world  # each rank holds 1/world of the heads
        self.stats = EngineStats(num_rows=config.max_num_seqs, kv_bytes_allocated=arena.nbytes * world)
        self._callbacks: dict[str, OutputCallback] = {}
        self._inbox: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._ids = itertools.count()
        self._loop_done: Future | None = None  # the loop's, while it runs
        # Orders add_request's check-and-queue against shutdown's last drain, so no request slips in unanswered.
        self._lock = threading.Lock()
        self._stopping = False
        self._num_queued = 0  # in the inbox or waiting for a row: bounded by max_num_waiting
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
        arrival_time = time.monotonic()  # before tokenizing: that is part of the request's latency
        if self._stopping:
            raise EngineDeadError("the engine is stopped")
        params = params or SamplingParams()
        token_ids = self._prompt_token_ids(prompt, prompt_token_ids)
        check_admission(self.config.admission, num_prompt_tokens=len(token_ids), max_tokens=params.max_tokens)
        # Compiled here, on the caller's thread: the loop only ever steps guides that are ready.
        guide = self.grammars.compile(params.guided) if params.guided is not None else None
        request = Request(req_id if req_id is not None else f"req-{next(self._ids)}", token_ids, params,
                          arrival_time=arrival_time, guide=guide)
        with self._lock:
            if self._stopping:
                raise EngineDeadError("the engine is stopped")
            if self._num_queued >= self.config.max_num_waiting:
                raise EngineBusyError(f"server busy: {self._num_queued} requests are already waiting; retry later")
            self._num_queued += 1
            self._inbox.put(("add", (request, on_output)))
        self._wakeup.set()
        return request.req_id

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

    def call(self, function: Callable[[], Any]) -> Any:
        """Run `function()` on the engine's thread, between two iterations once the loop runs, and return its
        result: torch work timed beside the engine must run there (a second OpenMP team throttles both)."""
        with self._lock:
            if self._stopping:
                raise EngineDeadError("the engine is stopped")
            if self._loop_done is None or self._torch_thread.is_current:  # e.g. from an output callback
                return self._torch_thread.call(function)
            done: Future = Future()
            self._inbox.put(("call", (function, done)))
        self._wakeup.set()
        return done.result()

    def start(self) -> Engine:
        """Start the loop on the engine's thread."""
        self._loop_done = self._torch_thread.submit(self._loop)
        return self

    def stop(self) -> None:
        """Stop the loop; requests still in flight end with finish_reason 'abort'. A second call does nothing."""
        if self._torch_thread.closed:
            return
        self._stopping = True
        self._wakeup.set()
        if self._loop_done is not None:
            self._loop_done.result()  # the loop ends what is in flight on its way out
            self._loop_done = None
        else:
            self._shutdown(RequestStatus.FINISHED_ABORT, None)  # driven by hand: end it here
        self._torch_thread.call(self.runner.close)
        self._torch_thread.close()

    def __enter__(self):  # unannotated: typing.Self needs Python 3.11
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def run_until_idle(self) -> None:
        """Run iterations until every queued request has finished (the loop not started)."""
        assert self._loop_done is None, "the loop is running"
        while self.step() or self.scheduler.has_work():
            time.sleep(self.scheduler.seconds_until_admission(time.monotonic()) or 0.0)

    # ----- the loop -----

    def step(self) -> bool:
        """One iteration: schedule at the boundary, execute, postprocess, emit; False if there was nothing to do.
        Runs on the engine's thread (callers wait for it); for driving an engine whose loop is not started."""
        return self._torch_thread.call(self._step)

    def _step(self) -> bool:
        started = time.perf_counter()
        self._drain_inbox()
        out = self.scheduler.schedule(time.monotonic())
        result = self._execute(out) if out.has_forward else None
        emitted = self._postprocess(out, result, started)
        self._emit(emitted)
        return bool(emitted) or out.has_forward

    def _loop(self) -> None:
        status, error = RequestStatus.FINISHED_ABORT, None
        try:
            self.runner.bind_thread()  # the current GPU is per thread, and this thread runs every forward
            while not self._stopping:
                if not self._step():
                    wait = self.scheduler.seconds_until_admission(time.monotonic())
                    self._wakeup.wait(timeout=wait)
                    self._wakeup.clear()
        except Exception as exc:  # a bug outside the forward: fail everyone clearly rather than hang them
            logger.exception("the inference loop crashed")
            status, error = RequestStatus.FINISHED_ERROR, f"the inference loop crashed: {type(exc).__name__}: {exc}"
        finally:
            self._shutdown(status, error)

    def _load_runner(self, model_path: Path) -> ModelRunner:
        if self.config.num_threads:
            torch.set_num_threads(self.config.num_threads)
        return ModelRunner(self.config, model_path)

    def _shutdown(self, status: RequestStatus, error: str | None) -> None:
        """End every request in flight or queued with `status`; from now on add_request refuses."""
        with self._lock:
            self._stopping = True
        self.failure = error
        self._drain_inbox()
        ended = list(self.scheduler.waiting) + list(self.scheduler.running.values())
        for request in ended:
            request.error = error
            self.scheduler.finish(request, status)
        self._emit([(request, [], "", []) for request in ended])

    def _execute(self, out: SchedulerOutput) -> StepResult:
        """The runner's result; a failed forward fails every request in it, never the loop."""
        try:
            return self.runner.execute(out)
        except EngineDeadError:  # a lost tensor-parallel rank: nothing more can run, so the loop ends
            raise
        except Exception as exc:
            logger.exception("iteration failed")
            return StepResult([], {}, 0, StepTimings(), failure=f"{type(exc).__name__}: {exc}")

    def _postprocess(self, out: SchedulerOutput, result: StepResult | None, started: float) -> list[Emitted]:
        """Append each request's token, end the finished ones, count the iteration; what to emit."""
        emitted: list[Emitted] = [(request, [], "", []) for request in out.aborted]
        with self._lock:
            self._num_queued -= len(out.admitted) + sum(request.row < 0 for request in out.aborted)
        if result is not None and result.failure is not None:
            # Prompts part-way through too: their rows never got this iteration's chunk. Arrivals given a prefix copy
            # too, though they got no chunk: the copy ran in the failed step, perhaps not at all.
            failed = out.decode + [chunk.request for chunk in out.prefill]
            failed += [request for request in out.admitted if request.num_prefix_cached_tokens and request not in failed]
            for request in failed:
                request.error = result.failure
                self.scheduler.finish(request, RequestStatus.FINISHED_ERROR)
                emitted.append((request, [], "", []))
        elif result is not None:
            for i, entries in result.prompt_logprobs.items():
                out.prefill[i].request.prompt_logprobs += entries
            now = time.monotonic()
            for i, request in enumerate(out.scheduled):
                if i in result.row_errors:
                    request.error = result.row_errors[i]
                    self.scheduler.finish(request, RequestStatus.FINISHED_ERROR)
                    emitted.append((request, [], "", []))
                    continue
                text, status = self.outputs.append_token(request, result.token_ids[i])
                request.record_token_time(now)
                if status is not None:
                    self.scheduler.finish(request, status)
                logprobs = result.logprobs.get(i)
                if logprobs is not None:
                    request.cumulative_logprob += logprobs.logprob
                emitted.append((request, [result.token_ids[i]], text, [logprobs] if logprobs else []))
            self.stats.record(IterationRecord(
                seconds=time.perf_counter() - started, decode_seconds=result.timings.decode,
                num_decode=len(out.decode), decode_span=out.decode_span, num_prefill=len(out.scheduled) - len(out.decode),
                num_waiting=self.scheduler.num_waiting,
                # Copied prompt tokens count too, as vLLM counts cached ones: the total is every prompt's length.
                num_prompt_tokens=sum(chunk.end - chunk.start for chunk in out.prefill)
                + sum(request.num_prefix_cached_tokens for request in out.admitted),
                moved_bytes=result.moved_bytes, compaction_seconds=result.timings.compaction,
                prefix_queried_tokens=sum(request.num_prompt_tokens for request in out.admitted)
                if self.scheduler.prefixes is not None else 0,
                prefix_hit_tokens=sum(request.num_prefix_cached_tokens for request in out.admitted)))
        return emitted

    def _publish_counts(self) -> None:
        running = self.scheduler.running.values()
        self.stats.num_running = len(running)
        self.stats.num_waiting = self.scheduler.num_waiting
        positions = sum(request.num_cached_tokens for request in running)
        self.stats.kv_bytes_in_use = positions * self._kv_bytes_per_position
        if self.scheduler.prefixes is not None:
            retained = self.scheduler.prefixes.lengths()
            self.stats.num_retained_rows = len(retained)
            self.stats.kv_bytes_retained = sum(retained.values()) * self._kv_bytes_per_position

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                request, callback = payload
                self._callbacks[request.req_id] = callback
                self.outputs.add(request)
                self.scheduler.add_request(request)
            elif kind == "call":
                run_into(*payload)
            else:
                self.scheduler.abort(payload)

    def _emit(self, emitted: list[Emitted]) -> None:
        """Count the finished requests, then hand each output to its callback; a finished request is forgotten."""
        # Before any callback, so whoever hears of a finished request finds it counted and gone from the gauges.
        for request, *_ in emitted:
            if request.status.finished:
                self._record_finished(request)
        self._publish_counts()
        for request, new_token_ids, new_text, logprobs in emitted:
            finished = request.status.finished
            output = RequestOutput(request.req_id, new_token_ids, new_text, finished, request.status.finish_reason,
                                   request.num_prompt_tokens, request.num_output_tokens, request.error,
                                   request.num_prefix_cached_tokens)
            if request.params.logprobs is not None:
                output.logprobs, output.cumulative_logprob = logprobs, request.cumulative_logprob
            if request.params.prompt_logprobs is not None and new_token_ids and request.num_output_tokens == 1:
                output.prompt_logprobs = request.prompt_logprobs
            callback = self._callbacks[request.req_id]
            if finished:
                del self._callbacks[request.req_id]
                self.outputs.remove(request.req_id)
            try:
                callback(output)
            except Exception:  # a broken consumer loses its own request, nothing else
                logger.exception("output callback for %s failed; aborting it", request.req_id)
                if not finished:
                    self.scheduler.abort(request.req_id)

    def _record_finished(self, request: Request) -> None:
        """Stamp a request's end, count it, and log one line for it (its prompt only if `log_prompts` is set)."""
        request.finished_time = time.monotonic()
        record = FinishedRecord.of(request)
        self.stats.record_finished(record)
        if logger.isEnabledFor(logging.INFO):
            error = f" error={request.error!r}" if request.error else ""
            prompt = f" prompt={self.tokenizer.decode(request.prompt_token_ids)!r}" if self.config.log_prompts else ""
            logger.info("finished %s: %s%s%s", request.req_id, record.describe(), error, prompt)

    def _prompt_token_ids(self, prompt: str | None, prompt_token_ids: list[int] | None) -> list[int]:
        """The prompt as token ids, each input bounded before any work is done on it."""
        if (prompt is None) == (prompt_token_ids is None):
            raise InvalidRequestError("prompt", "give exactly one of a text prompt or prompt token ids")
        if prompt is not None:
            if not isinstance(prompt, str) or not prompt:
                raise InvalidRequestError("prompt", "must be a non-empty string")
            # len(str) <= UTF-8 bytes <= 4 len(str): only prompts near the limit pay for encoding.
            limit = self.config.prompt_byte_limit
            near = len(prompt) <= limit < 4 * len(prompt)
            num_bytes = len(prompt.encode("utf-8", "replace")) if near else len(prompt)
            check_admission(self.config.admission, num_prompt_bytes=num_bytes)
            # encode_batch releases the GIL (encode does not): the loop thread keeps stepping meanwhile.
            return self.tokenizer.encode_batch([prompt])[0].ids
        if not prompt_token_ids:
            raise InvalidRequestError("input_ids", "must be a non-empty list of token ids")
        check_admission(self.config.admission, num_prompt_tokens=len(prompt_token_ids))  # before scanning them
        bad = [t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError("input_ids", f"ids must be in [0, {self.vocab_size}), got {bad[:5]}")
        return list(prompt_token_ids)
