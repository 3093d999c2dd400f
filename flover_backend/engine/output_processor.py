"""After each forward: append every request's new token, stream its text, and decide whether it ends."""

from __future__ import annotations

from tokenizers import Tokenizer

from flover_backend.engine.detokenizer import IncrementalDetokenizer
from flover_backend.request import Request, RequestStatus


class OutputProcessor:
    """The one place that decides when a request ends: stop token or eos, stop string, or length."""

    def __init__(self, tokenizer: Tokenizer, eos_token_ids: frozenset[int]):
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}

    def add(self, request: Request) -> None:
        """Start following a request that joined the engine."""
        params = request.params
        if params.detokenize:  # without, the request gets token ids only (and has no stop strings)
            self._detokenizers[request.req_id] = IncrementalDetokenizer(
                self.tokenizer, params.stop, skip_special_tokens=params.skip_special_tokens,
                include_stop=params.include_stop_str_in_output)

    def remove(self, req_id: str) -> None:
        """Forget a request that has left the engine."""
        self._detokenizers.pop(req_id, None)

    def append_token(self, request: Request, token_id: int) -> tuple[str, RequestStatus | None]:
        """Record `token_id` for `request`: the text now safe to send, and the finished status if it ends."""
        request.output_token_ids.append(token_id)
        params = request.params
        # Short of min_tokens nothing ends it (min_tokens <= max_tokens): the sampler masks its stop tokens and
        # eos until then, and stop strings are looked for from the min_tokens-th token on, as vLLM does.
        may_stop = request.num_output_tokens >= params.min_tokens
        status = None
        if may_stop and params.ends_on(token_id, self.eos_token_ids):
            status = RequestStatus.FINISHED_STOP
        elif request.num_output_tokens >= params.max_tokens:
            status = RequestStatus.FINISHED_LENGTH
        if request.guide is not None and status is not RequestStatus.FINISHED_STOP:
            # The grammar's end is the request's stop (whatever ignore_eos says), also on its max_tokens-th token;
            # the sampler lets through only tokens it allows, so a refusal is a bug that ends this request alone.
            if not request.guide.accept(token_id):
                request.error = f"the grammar refused token {token_id}"
                status = RequestStatus.FINISHED_ERROR
            elif request.guide.finished:
                status = RequestStatus.FINISHED_STOP
        detokenizer = self._detokenizers.get(request.req_id)
        if detokenizer is None:
            return "", status
        text, hit_stop_string = detokenizer.step(request.output_token_ids, status is not None, find_stops=may_stop)
        return text, RequestStatus.FINISHED_STOP if hit_stop_string else status
