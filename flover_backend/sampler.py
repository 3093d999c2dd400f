"""Token selection for a whole batch: greedy rows by argmax, sampled rows in one batched pass."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from flover_backend.request import Request
from flover_backend.sampling_batch import SamplingBatch
from flover_backend.sampling_pass import sample_rows


@dataclass
class SamplerOutput:
    """One step's token for every row, and the rows that could not be sampled (their token is a placeholder 0)."""

    token_ids: list[int]
    errors: dict[int, str] = field(default_factory=dict)  # row -> why


class Sampler:
    """Picks each row's next token; a sampled request draws its noise from its own generator, so its tokens
    depend on its seed and its logits alone, never on what else shares the batch."""

    def __init__(self, default_seed: int = 0):
        self._seed_source = torch.Generator().manual_seed(default_seed)
        self._generators: dict[str, torch.Generator] = {}

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> SamplerOutput:
        """Next token id for each row of `logits` (N, vocab), row i belonging to requests[i]. A row whose
        logits are not finite fails alone: it is named in `errors` and every other row gets its token."""
        out = SamplerOutput([0] * len(requests))
        greedy = [i for i, request in enumerate(requests) if request.params.greedy]
        sampled = [i for i, request in enumerate(requests) if not request.params.greedy]
        if greedy:
            for i, token_id, value in zip(greedy, *_argmax(logits, greedy)):
                if math.isfinite(value):
                    out.token_ids[i] = token_id
                else:
                    out.errors[i] = f"cannot pick a token: the logits are not finite (the largest is {value})"
        if sampled:
            self._sample(logits, [requests[i] for i in sampled], sampled, out)
        return out

    def release(self, req_id: str) -> None:
        """Forget a finished request's generator."""
        self._generators.pop(req_id, None)

    def _sample(self, logits: torch.Tensor, requests: list[Request], rows: list[int], out: SamplerOutput) -> None:
        """Draw the tokens of `rows` (requests[i] owning rows[i]) in one batched pass, into `out`."""
        picked = logits if len(rows) == len(logits) else logits[torch.tensor(rows, device=logits.device)]
        batch = SamplingBatch.build([r.params for r in requests], [self._generator(r) for r in requests],
                                    logits.shape[-1], logits.device)
        token_ids, failed = sample_rows(picked.float(), batch)
        for row, request, token_id, row_failed in zip(rows, requests, token_ids.tolist(), failed.tolist()):
            if row_failed:
                out.errors[row] = (f"cannot sample: the logits are not finite, or not once divided by the "
                                   f"temperature {request.params.temperature:g}")
            else:
                out.token_ids[row] = token_id

    def _generator(self, request: Request) -> torch.Generator:
        generator = self._generators.get(request.req_id)
        if generator is None:
            seed = request.params.seed
            if seed is None:
                seed = int(torch.randint(2**62, (1,), generator=self._seed_source))
            generator = self._generators[request.req_id] = torch.Generator().manual_seed(seed)
        return generator


def _argmax(logits: torch.Tensor, rows: list[int]) -> tuple[list[int], list[float]]:
    """The most likely token of each of `rows` and its logit (NaN anywhere in a row is what gets picked)."""
    if logits.device.type == "cpu":
        # NumPy's SIMD argmax is ~7x faster than torch's on the CPU (0.18 against 1.37 ms at 32 x 32000); over
        # every row, which costs less than copying the greedy ones out first.
        host = logits.float().numpy()
        token_ids = np.argmax(host, axis=-1)[rows]
        return token_ids.tolist(), host[rows, token_ids].tolist()
    picked = logits[torch.tensor(rows, device=logits.device)] if len(rows) < len(logits) else logits
    token_ids = picked.argmax(dim=-1)
    return token_ids.tolist(), picked.gather(1, token_ids[:, None])[:, 0].float().tolist()
