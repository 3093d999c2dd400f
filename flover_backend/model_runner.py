"""Turns a `SchedulerOutput` into tensors and runs it: compaction, one fused decode forward, prefill, sampling."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from flover_backend.config import EngineConfig
from flover_backend.decode_graphs import DecodeGraphs
from flover_backend.kv_arena import KVArena
from flover_backend.layers.attention import ForwardBatch
from flover_backend.models.loader import load_model
from flover_backend.row_table import RowMove
from flover_backend.sampler import Sampler, SamplerOutput
from flover_backend.scheduler import SchedulerOutput
from flover_backend.tensor_parallel import WorkerGroup, check_gpus, rank_device


@dataclass
class StepTimings:
    """Where one iteration's time went, in seconds."""

    compaction: float = 0.0
    decode: float = 0.0
    prefill: float = 0.0
    sampling: float = 0.0


@dataclass
class StepPlan:
    """One iteration in plain lists: what every tensor-parallel rank needs to run the same forwards."""

    moves: list[RowMove]
    decode_span: int  # the decode forward covers rows [0, decode_span)
    decode_rows: list[int]  # the decoding requests' rows, in the order their tokens come back
    decode_token_ids: list[int]
    decode_context_lens: list[int]
    prefill_rows: list[int]
    prefill_prompts: list[list[int]]

    @classmethod
    def from_output(cls, out: SchedulerOutput) -> StepPlan:
        """The plan for a scheduler decision."""
        return cls(out.moves, out.decode_span, [r.row for r in out.decode], [r.last_token_id for r in out.decode],
                   [r.num_cached_tokens for r in out.decode], [r.row for r in out.prefill],
                   [r.prompt_token_ids for r in out.prefill])


class ModelRunner:
    """The only code that touches both the arena and the model; rank 0 also samples."""

    def __init__(self, config: EngineConfig, model_path: Path, rank: int = 0):
        self.device = rank_device(config.device, rank)
        self.dtype = getattr(torch, config.dtype)
        world = config.tensor_parallel_size
        check_gpus(rank_device(config.device, 0), world)
        self.bind_thread()  # before rank 0 joins the workers: NCCL binds each rank to the current GPU
        # Before any worker starts, so a shape that cannot be split fails first.
        self.model = load_model(model_path, self.dtype, self.device, rank, world)
        self.workers = WorkerGroup(config) if world > 1 and rank == 0 else None
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
        # Graphs hold no collectives: with tensor parallelism every rank decodes eagerly.
        use_graphs = config.cuda_graphs and self.device.type == "cuda" and world == 1
        self.decode_graphs = DecodeGraphs(self.model, self.arena.tensor, config.max_num_seqs, config.max_model_len,
                                          self.dtype) if use_graphs else None
        if self.decode_graphs is not None:
            with torch.inference_mode():
                self.decode_graphs.capture_batch_sizes()

    def bind_thread(self) -> None:
        """Make the runner's GPU the calling thread's current device: CuPy, graph capture and NCCL use it."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def execute(self, out: SchedulerOutput) -> tuple[SamplerOutput, int, StepTimings]:
        """Run one iteration; returns the sampled tokens (aligned with `out.scheduled`, with the rows whose
        sampling failed), compaction bytes, timings."""
        plan = StepPlan.from_output(out)
        try:
            if self.workers is not None:
                self.workers.broadcast(plan)
            hidden, moved_bytes, timings = self.run(plan)
        except Exception:
            if self.workers is not None:
                self.workers.check(grace_s=5.0)  # a collective that failed because a rank died: say so
            raise
        start = time.perf_counter()
        with torch.inference_mode():
            sampled = self.sampler(self.model.compute_logits(hidden), out.scheduled)
        timings.sampling = time.perf_counter() - start
        return sampled, moved_bytes, timings

    @torch.inference_mode()
    def run(self, plan: StepPlan) -> tuple[torch.Tensor, int, StepTimings]:
        """Compact, decode, prefill: the hidden states to sample from (decode rows first), bytes moved, timings."""
        timings = StepTimings()
        start = time.perf_counter()
        moved_bytes = self.arena.apply_moves(plan.moves)
        timings.compaction = self._synced_clock() - start
        hidden = []
        if plan.decode_rows:
            hidden.append(self._decode(plan))
        timings.decode = self._synced_clock() - start - timings.compaction
        if plan.prefill_rows:
            hidden.append(self._prefill(plan))
        timings.prefill = self._synced_clock() - start - timings.compaction - timings.decode
        return (torch.cat(hidden) if len(hidden) > 1 else hidden[0]), moved_bytes, timings

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any."""
        if self.workers is not None:
            self.workers.close()
            self.workers = None

    def _decode(self, plan: StepPlan) -> torch.Tensor:
        """One forward over rows [0, span): the next token's hidden state for every running request."""
        span = plan.decode_span
        token_ids = [0] * span  # holes (compaction off) run a dummy token that attends to position 0
        context_lens = [0] * span
        for row, token_id, context_len in zip(plan.decode_rows, plan.decode_token_ids, plan.decode_context_lens):
            token_ids[row] = token_id
            context_lens[row] = context_len
        if self.decode_graphs is not None:
            hidden = self.decode_graphs(token_ids, context_lens)
        else:
            host = torch.tensor([token_ids, context_lens], device=self.device)  # one host-to-device copy
            batch = ForwardBatch.decode(slice(0, span), host[1], max(context_lens) + 1, self.dtype)
            hidden = self.model(host[0][:, None], batch, self.arena.tensor)[:, 0]  # (span, hidden)
        if span != len(plan.decode_rows):
            hidden = hidden[torch.tensor(plan.decode_rows, device=self.device)]
        return hidden

    def _prefill(self, plan: StepPlan) -> torch.Tensor:
        """Write the admitted prompts into their rows; returns each prompt's last hidden state."""
        prompt_lens = [len(prompt) for prompt in plan.prefill_prompts]
        input_ids = torch.zeros(len(prompt_lens), max(prompt_lens), dtype=torch.long)
        for i, prompt in enumerate(plan.prefill_prompts):
            input_ids[i, : prompt_lens[i]] = torch.tensor(prompt)
        rows_list = plan.prefill_rows
        dense = rows_list == list(range(rows_list[0], rows_list[0] + len(rows_list)))
        rows = slice(rows_list[0], rows_list[-1] + 1) if dense else torch.tensor(rows_list, device=self.device)
        batch = ForwardBatch.prefill(rows, prompt_lens, self.device)
        hidden = self.model(input_ids.to(self.device), batch, self.arena.tensor)  # (B, T, hidden)
        return hidden[torch.arange(len(prompt_lens), device=self.device), batch.last_index]

    def _synced_clock(self) -> float:
        """Wall time after the device has finished queued work, so phases are timed honestly on GPU."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

