"""Turns a `SchedulerOutput` into tensors and runs it: compaction, one fused decode forward, prefill, sampling."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from flover_backend.config import EngineConfig
from flover_backend.kv_arena import KVArena
from flover_backend.layers.attention import ForwardBatch
from flover_backend.models.loader import load_model
from flover_backend.request import Request
from flover_backend.sampler import Sampler
from flover_backend.scheduler import SchedulerOutput


@dataclass
class StepTimings:
    """Where one iteration's time went, in seconds."""

    compaction: float = 0.0
    decode: float = 0.0
    prefill: float = 0.0
    sampling: float = 0.0


class ModelRunner:
    """The only code that touches both the arena and the model."""

    def __init__(self, config: EngineConfig, model_path: Path):
        self.device = torch.device(config.device)
        self.dtype = getattr(torch, config.dtype)
        self.model = load_model(model_path, self.dtype, self.device)
        if hasattr(self.model, "prepack"):
            self.model.prepack(config.max_num_seqs)
        model_config = self.model.config
        self.arena = KVArena(
            num_layers=model_config.num_layers,
            max_num_seqs=config.max_num_seqs,
            num_kv_heads=model_config.num_kv_heads,
            max_model_len=config.max_model_len,
            head_dim=model_config.head_dim,
            dtype=self.dtype,
            device=self.device,
        )
        self.sampler = Sampler(config.seed)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> tuple[list[int], int, StepTimings]:
        """Run one iteration; returns the sampled ids (aligned with `out.scheduled`), compaction bytes, timings."""
        timings = StepTimings()
        start = time.perf_counter()
        moved_bytes = self.arena.apply_moves(out.moves)
        timings.compaction = self._synced_clock() - start
        hidden = []
        if out.decode:
            hidden.append(self._decode(out.decode, out.decode_span))
        timings.decode = self._synced_clock() - start - timings.compaction
        if out.prefill:
            hidden.append(self._prefill(out.prefill))
        timings.prefill = self._synced_clock() - start - timings.compaction - timings.decode
        logits = self.model.compute_logits(torch.cat(hidden) if len(hidden) > 1 else hidden[0])
        sampled = self.sampler(logits, out.scheduled)
        timings.sampling = time.perf_counter() - start - timings.compaction - timings.decode - timings.prefill
        return sampled, moved_bytes, timings

    def _decode(self, requests: list[Request], span: int) -> torch.Tensor:
        """One forward over rows [0, span): the next token's hidden state for every running request."""
        token_ids = [0] * span  # holes (compaction off) run a dummy token that attends to position 0
        context_lens = [0] * span
        for request in requests:
            token_ids[request.row] = request.last_token_id
            context_lens[request.row] = request.num_cached_tokens
        input_ids = torch.tensor(token_ids, device=self.device)[:, None]
        batch = ForwardBatch.decode(slice(0, span), torch.tensor(context_lens, device=self.device), self.dtype)
        hidden = self.model(input_ids, batch, self.arena.tensor)[:, 0]  # (span, hidden)
        if span != len(requests):
            hidden = hidden[torch.tensor([request.row for request in requests], device=self.device)]
        return hidden

    def _prefill(self, requests: list[Request]) -> torch.Tensor:
        """Write the admitted prompts into their rows; returns each prompt's last hidden state."""
        prompt_lens = [request.num_prompt_tokens for request in requests]
        input_ids = torch.zeros(len(requests), max(prompt_lens), dtype=torch.long)
        for i, request in enumerate(requests):
            input_ids[i, : prompt_lens[i]] = torch.tensor(request.prompt_token_ids)
        rows_list = [request.row for request in requests]
        dense = rows_list == list(range(rows_list[0], rows_list[0] + len(rows_list)))
        rows = slice(rows_list[0], rows_list[-1] + 1) if dense else torch.tensor(rows_list, device=self.device)
        batch = ForwardBatch.prefill(rows, prompt_lens, self.device)
        hidden = self.model(input_ids.to(self.device), batch, self.arena.tensor)  # (B, T, hidden)
        return hidden[torch.arange(len(requests), device=self.device), batch.last_index]

    def _synced_clock(self) -> float:
        """Wall time after the device has finished queued work, so phases are timed honestly on GPU."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()
