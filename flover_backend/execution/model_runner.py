"""Turns a `SchedulerOutput` into tensors and runs it: compaction, one forward of every token, sampling."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flover_backend.config import EngineConfig
from flover_backend.execution.arena_sizing import row_bytes, rows_that_fit
from flover_backend.execution.decode_graphs import DecodeGraphs
from flover_backend.execution.iteration import PrefillChunk, SchedulerOutput
from flover_backend.execution.kv_arena import KVArena
from flover_backend.execution.layers.attention import ForwardBatch
from flover_backend.execution.layers.ops import install_kernels
from flover_backend.execution.models import eos_token_ids
from flover_backend.execution.models.loader import load_model
from flover_backend.execution.prefill_graphs import MAX_GRAPHED_CHUNKS, PrefillGraphs
from flover_backend.execution.row_table import RowMove
from flover_backend.execution.workers import WorkerGroup, check_gpus, rank_device
from flover_backend.native import attention as native_attention
from flover_backend.native import elementwise as native_elementwise
from flover_backend.native import sampling as native_sampling
from flover_backend.native import small_gemm as native_small_gemm
from flover_backend.native.attention import SharedPrefixGroups
from flover_backend.paths import kernels_dir
from flover_backend.sampling.logprobs import TokenLogprobs, prompt_logprobs
from flover_backend.sampling.sampler import Sampler

logger = logging.getLogger(__name__)

# Forwards that write prompts are padded to a multiple of this many positions (eagerly the whole forward, with
# CUDA graphs each chunk): every new input shape leaves per-shape state behind (oneDNN primitives and more), so
# prompts of every length made the backend's memory creep up.
PREFILL_ALIGN = 8
# A chunk joins a longer chunk's forward only if that pads it by at most this many positions; past that, its own
# forward costs less. A forward reads every weight once (~the 1-row decode step, 25 ms for builtin:small on the 2-core AMD EPYC),
# which is the compute of ~27 prompt tokens; padding 16-400-token prompts to the longest computed 1.52x the
# positions they needed.
MAX_PREFILL_PADDING = 32


def _aligned(length: int) -> int:
    return -(-length // PREFILL_ALIGN) * PREFILL_ALIGN


def _joined(states: list[torch.Tensor]) -> torch.Tensor | None:
    """Hidden states to sample from, decode rows first, as one tensor; None if there are none."""
    return torch.cat(states) if len(states) > 1 else states[0] if states else None


def prefill_groups(chunk_lens: list[int]) -> list[list[int]]:
    """The chunks (indices) split into forwards, longest first, each chunk padded by at most
    MAX_PREFILL_PADDING positions to its forward's width."""
    groups: list[list[int]] = []
    for chunk in sorted(range(len(chunk_lens)), key=lambda i: -chunk_lens[i]):
        if groups and _aligned(chunk_lens[groups[-1][0]]) - chunk_lens[chunk] <= MAX_PREFILL_PADDING:
            groups[-1].append(chunk)
        else:
            groups.append([chunk])
    return groups


@dataclass
class StepTimings:
    """Where one iteration's time went, in seconds."""

    compaction: float = 0.0
    decode: float = 0.0  # eagerly, the one forward of decode rows and prompt chunks
    prefill: float = 0.0  # with CUDA graphs, the prompt chunks' own forwards


@dataclass
class StepResult:
    """What one iteration produced: a token per scheduled request (aligned with `scheduled`) and its costs."""

    token_ids: list[int]
    row_errors: dict[int, str]  # index into the scheduled requests -> why that request's token failed
    moved_bytes: int
    timings: StepTimings
    logprobs: dict[int, TokenLogprobs] = field(default_factory=dict)  # index -> its token's, if it asked
    # prompt chunk index -> its prompt tokens' logprobs (each token given those before it), if its request asked
    prompt_logprobs: dict[int, list[TokenLogprobs]] = field(default_factory=dict)
    failure: str | None = None  # the forward itself failed: every request in it ends with this error


@dataclass
class StepPlan:
    """One iteration in plain lists: what every tensor-parallel rank needs to run the same forwards."""

    moves: list[RowMove]
    prefix_copies: list[RowMove]  # after the moves, in order: arrivals' prompt starts copied from other rows
    decode_span: int  # the decode forward covers rows [0, decode_span)
    decode_rows: list[int]  # the decoding requests' rows, in the order their tokens come back
    decode_token_ids: list[int]
    decode_context_lens: list[int]
    prefill_rows: list[int]
    prefill_token_ids: list[list[int]]  # each row's prompt chunk
    prefill_starts: list[int]  # the chunk's first position
    prefill_last: list[bool]  # whether the chunk ends its prompt: only those rows yield a hidden state
    # Per decoding request: the prefix copy its first positions hold (Request.kv_source) and how many of its
    # positions are that copy, so rows holding the same one read it once (the native attention kernel).
    decode_sources: list[int | None] = field(default_factory=list)
    decode_shared: list[int] = field(default_factory=list)

    @classmethod
    def from_output(cls, out: SchedulerOutput) -> StepPlan:
        """The plan for a scheduler decision."""
        chunks, decode = out.prefill, out.decode
        return cls(out.moves, out.prefix_copies, out.decode_span, [r.row for r in decode],
                   [r.last_token_id for r in decode], [r.num_cached_tokens for r in decode],
                   [c.request.row for c in chunks], [c.request.prompt_token_ids[c.start:c.end] for c in chunks],
                   [c.start for c in chunks], [c.is_last for c in chunks], [r.kv_source for r in decode],
                   [min(r.kv_source_len, r.num_cached_tokens) for r in decode])


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
        model_config = self.model.config
        if config.gpu_memory_utilization and self.device.type == "cuda":
            config = dataclasses.replace(config, max_num_seqs=self._rows_that_fit(config))
        self.max_num_seqs = config.max_num_seqs  # the arena's rows: the engine's scheduler takes this many
        # Kernels are built (or found built) now, so the compiler never runs inside a step under load.
        kernel_dir = kernels_dir()
        cpu_float32 = self.device.type == "cpu" and self.dtype == torch.float32  # what the layer kernels take
        small_gemm = native_small_gemm.load(kernel_dir) if config.native_small_gemm and cpu_float32 else None
        self.model.prepack(config.max_num_seqs, small_gemm)
        sampling_kernel = native_sampling.load(kernel_dir) if config.native_sampling and self.device.type == "cpu" \
            else None
        self.eos_token_ids = eos_token_ids(model_config)  # built here once; the engine's outputs read it too
        self.sampler = Sampler(config.seed, self.eos_token_ids, sampling_kernel)
        elementwise_kernels = native_elementwise.load(kernel_dir) if config.native_elementwise and cpu_float32 \
            else None
        if elementwise_kernels is not None:
            install_kernels(self.model, elementwise_kernels)
        self.attention_kernel = (native_attention.load(kernel_dir)
                                 if config.native_attention and native_attention.supports(self.device, self.dtype)
                                 else None)
        self.arena = KVArena(
            num_layers=model_config.num_layers,
            max_num_seqs=config.max_num_seqs,
            num_kv_heads=model_config.num_kv_heads,
            max_model_len=config.max_model_len,
            head_dim=model_config.head_dim,
            dtype=self.dtype,
            device=self.device,
            position_major=self.attention_kernel is not None,
        )
        self.max_model_len = config.max_model_len
        self.shared_prefix_attention = config.shared_prefix_attention
        # Graphs hold no collectives: with tensor parallelism every rank decodes eagerly.
        use_graphs = config.cuda_graphs and self.device.type == "cuda" and world == 1
        self.decode_graphs = DecodeGraphs(self.model, self.arena, config.max_num_seqs, config.max_model_len,
                                          self.dtype) if use_graphs else None
        self.prefill_graphs = None
        if self.decode_graphs is not None:
            # A chunk is at most the iteration's prompt budget, and no prompt outgrows the arena.
            max_width = min(config.max_prefill_tokens or config.max_model_len, config.max_model_len)
            self.prefill_graphs = PrefillGraphs(self.model, self.arena, max_width, self.decode_graphs.pool)
            with torch.inference_mode():
                self.decode_graphs.capture_batch_sizes()
                self.prefill_graphs.capture_widths(free_row=0)

    def _rows_that_fit(self, config: EngineConfig) -> int:
        """Arena rows for config.gpu_memory_utilization of this GPU, with the weights already loaded."""
        c = self.model.config
        free, total = torch.cuda.mem_get_info(self.device)
        per_row = row_bytes(c.num_layers, c.num_kv_heads, c.head_dim, config.max_model_len,
                            torch.empty((), dtype=self.dtype).element_size(), c.vocab_size)
        rows = rows_that_fit(free, total, config.gpu_memory_utilization, per_row, cap=config.max_num_seqs)
        logger.info("gpu_memory_utilization %.2f: %d arena rows of %.1f MiB (%.1f of %.1f GiB free)",
                    config.gpu_memory_utilization, rows, per_row / 2**20, free / 2**30, total / 2**30)
        return rows

    def bind_thread(self) -> None:
        """Make the runner's GPU the calling thread's current device: CuPy, graph capture and NCCL use it."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def execute(self, out: SchedulerOutput) -> StepResult:
        """Run one iteration: compact, decode, prefill, sample a token for every scheduled request."""
        for req_id in out.finished_req_ids:
            self.sampler.release(req_id)
        plan = StepPlan.from_output(out)
        try:
            if self.workers is not None:
                self.workers.broadcast(plan)
            # Every position's hidden state is kept only for the chunks whose request asked for prompt logprobs.
            kept = {i: None for i, chunk in enumerate(out.prefill) if chunk.request.params.prompt_logprobs is not None}
            hidden, moved_bytes, timings = self.run(plan, kept)
        except Exception:
            if self.workers is not None:
                self.workers.check(grace_s=5.0)  # a collective that failed because a rank died: say so
            raise
        with torch.inference_mode():
            chunk_logprobs = {i: self._prompt_logprobs(out.prefill[i], states) for i, states in kept.items()}
            if hidden is None:  # only prompt chunks that end no prompt: nothing to sample
                return StepResult([], {}, moved_bytes, timings, prompt_logprobs=chunk_logprobs)
            sampled = self.sampler(self.model.compute_logits(hidden), out.scheduled)
        return StepResult(sampled.token_ids, sampled.errors, moved_bytes, timings, sampled.logprobs, chunk_logprobs)

    def _prompt_logprobs(self, chunk: PrefillChunk, states: torch.Tensor) -> list[TokenLogprobs]:
        """The logprobs of the prompt tokens that the chunk's positions predict: [start + 1, end], within the prompt."""
        targets = chunk.request.prompt_token_ids[chunk.start + 1:chunk.end + 1]
        return prompt_logprobs(self.model.compute_logits, states, targets, chunk.request.params.prompt_logprobs)

    @torch.inference_mode()
    def run(self, plan: StepPlan, kept: dict[int, torch.Tensor | None] | None = None
            ) -> tuple[torch.Tensor | None, int, StepTimings]:
        """Compact, decode, prefill: the hidden states to sample from (decode rows first, then the chunks that
        end a prompt; None if there are none), bytes moved, timings. `kept`'s keys name prompt chunks (indices)
        whose every position's hidden state the caller wants: each value becomes that chunk's (len, hidden)."""
        kept = {} if kept is None else kept
        timings = StepTimings()
        start = time.perf_counter()
        moved_bytes = self.arena.apply_moves(plan.moves)
        self.arena.apply_moves(plan.prefix_copies)  # timed with compaction: the same kind of copy
        timings.compaction = self._synced_clock() - start
        if self.decode_graphs is None:
            hidden = self._fused(plan, kept)
            timings.decode = self._synced_clock() - start - timings.compaction
            return hidden, moved_bytes, timings
        # CUDA graphs capture the decode step alone, so prompt chunks get forwards of their own.
        states = []
        if plan.decode_rows:
            states.append(self._decode(plan))
        timings.decode = self._synced_clock() - start - timings.compaction
        if plan.prefill_rows:
            last_states = self._prefill(plan, kept)
            if len(last_states):
                states.append(last_states)
        timings.prefill = self._synced_clock() - start - timings.compaction - timings.decode
        return _joined(states), moved_bytes, timings

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any."""
        if self.workers is not None:
            self.workers.close()
            self.workers = None

    def _fused(self, plan: StepPlan, kept: dict[int, torch.Tensor | None]) -> torch.Tensor | None:
        """One forward over every token of the iteration, the decode rows' and each prompt chunk's end to end,
        so the weights are read once: the hidden states to sample from, as `run` returns them."""
        parts, token_ids = [], []
        if plan.decode_rows:
            decode_ids, context_lens, write_pos = self._decode_inputs(plan)
            host = torch.tensor([context_lens, write_pos], device=self.device)
            parts.append(ForwardBatch.decode(slice(0, plan.decode_span), host[0], max(context_lens) + 1, self.dtype,
                                             host[1], self.attention_kernel, self._shared_prefixes(plan)))
            token_ids += decode_ids
        ends_prompt = []  # where each chunk that ends its prompt has its last token
        begins = []  # where each chunk's first token is
        for row, chunk, start, is_last in zip(plan.prefill_rows, plan.prefill_token_ids, plan.prefill_starts,
                                              plan.prefill_last):
            parts.append(ForwardBatch.prefill(slice(row, row + 1), [len(chunk)], self.device, [start]))
            begins.append(len(token_ids))
            token_ids += chunk
            if is_last:
                ends_prompt.append(len(token_ids) - 1)
        # With prompt tokens in it, the forward's length is padded to a multiple of PREFILL_ALIGN (see there).
        num_tokens = _aligned(len(token_ids)) if plan.prefill_rows else len(token_ids)
        input_ids = torch.tensor(token_ids + [0] * (num_tokens - len(token_ids)), device=self.device)[None]
        hidden = self.model(input_ids, ForwardBatch.fused(parts, num_tokens), self.arena)[0]  # (N, hidden)
        for chunk in kept:
            kept[chunk] = hidden[begins[chunk]:begins[chunk] + len(plan.prefill_token_ids[chunk])]
        states = []
        if plan.decode_rows:
            states.append(self._decoding_rows(plan, hidden[:plan.decode_span]))
        if ends_prompt:
            states.append(hidden[torch.tensor(ends_prompt, device=self.device)])
        return _joined(states)

    def _decode_inputs(self, plan: StepPlan) -> tuple[list[int], list[int], list[int]]:
        """Token, context length and write position of every row in the decode span [0, span).

        Rows in the span that are not decoding (holes, prompts still being written) run a dummy token that
        attends to position 0 and writes its key at the scratch position, which no request ever uses.
        """
        span = plan.decode_span
        token_ids, context_lens, write_pos = [0] * span, [0] * span, [self.arena.scratch_position] * span
        for row, token_id, context_len in zip(plan.decode_rows, plan.decode_token_ids, plan.decode_context_lens):
            token_ids[row], context_lens[row], write_pos[row] = token_id, context_len, context_len
        return token_ids, context_lens, write_pos

    def _shared_prefixes(self, plan: StepPlan) -> SharedPrefixGroups | None:
        """The decode span's rows grouped by the prefix copy they hold, for the attention kernel to read each once;
        None without the kernel, with the setting off, or when no two rows hold one."""
        if self.attention_kernel is None or not self.shared_prefix_attention:
            return None
        sources: list[int | None] = [None] * plan.decode_span
        shared = [0] * plan.decode_span
        for row, source, length in zip(plan.decode_rows, plan.decode_sources, plan.decode_shared):
            sources[row], shared[row] = source, length
        return native_attention.group_rows(sources, shared)

    def _decoding_rows(self, plan: StepPlan, hidden: torch.Tensor) -> torch.Tensor:
        """The decoding requests' hidden states, in plan order, out of the whole span's."""
        if plan.decode_span == len(plan.decode_rows):
            return hidden
        return hidden[torch.tensor(plan.decode_rows, device=self.device)]

    def _decode(self, plan: StepPlan) -> torch.Tensor:
        """The decode step replayed from its CUDA graph: each decoding request's next-token hidden state."""
        return self._decoding_rows(plan, self.decode_graphs(*self._decode_inputs(plan)))

    def _prefill(self, plan: StepPlan, kept: dict[int, torch.Tensor | None]) -> torch.Tensor:
        """Write this iteration's prompt chunks into their rows; the last hidden state of each chunk that ends
        its prompt, in plan order (and every state of the `kept` chunks into it). A few first chunks replay
        prefill graphs; the rest share eager forwards."""
        last_states: dict[int, torch.Tensor] = {}
        graphed = self._graphed_chunks(plan)
        for chunk in graphed:
            states = self.prefill_graphs(plan.prefill_rows[chunk], plan.prefill_token_ids[chunk], every=chunk in kept)
            if chunk in kept:
                kept[chunk] = states
            if plan.prefill_last[chunk]:
                last_states[chunk] = states[-1]
        eager = [chunk for chunk in range(len(plan.prefill_rows)) if chunk not in graphed]
        for group in prefill_groups([len(plan.prefill_token_ids[chunk]) for chunk in eager]):
            group = [eager[i] for i in group]
            hidden, last_index = self._prefill_forward(plan, group)
            for position, chunk in enumerate(group):
                if chunk in kept:
                    kept[chunk] = hidden[position, :len(plan.prefill_token_ids[chunk])]
                if plan.prefill_last[chunk]:
                    last_states[chunk] = hidden[position, last_index[position]]
        if not last_states:
            return torch.empty(0, device=self.device)
        return torch.stack([last_states[chunk] for chunk in sorted(last_states)])

    def _graphed_chunks(self, plan: StepPlan) -> list[int]:
        """The chunks (indices) that replay a prefill graph: those that start their prompt and fit a width,
        unless there are more than MAX_GRAPHED_CHUNKS of them (then none)."""
        if self.prefill_graphs is None:
            return []
        chunks = [chunk for chunk, (start, tokens) in enumerate(zip(plan.prefill_starts, plan.prefill_token_ids))
                  if start == 0 and self.prefill_graphs.covers(len(tokens))]
        return chunks if len(chunks) <= MAX_GRAPHED_CHUNKS else []

    def _prefill_forward(self, plan: StepPlan, group: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward over the chunks `group` (indices into the plan's), right-padded to one width; its hidden
        states (len(group), width, hidden) and each chunk's last index."""
        chunks = [plan.prefill_token_ids[i] for i in group]
        chunk_lens = [len(chunk) for chunk in chunks]
        width = min(_aligned(max(chunk_lens)), self.max_model_len)
        input_ids = torch.zeros(len(chunks), width, dtype=torch.long)
        for i, chunk in enumerate(chunks):
            input_ids[i, : chunk_lens[i]] = torch.tensor(chunk)
        rows_list = [plan.prefill_rows[i] for i in group]
        dense = rows_list == list(range(rows_list[0], rows_list[0] + len(rows_list)))
        rows = slice(rows_list[0], rows_list[-1] + 1) if dense else torch.tensor(rows_list, device=self.device)
        batch = ForwardBatch.prefill(rows, chunk_lens, self.device, [plan.prefill_starts[i] for i in group], width)
        return self.model(input_ids.to(self.device), batch, self.arena), batch.last_index

    def _synced_clock(self) -> float:
        """Wall time after the device has finished queued work, so phases are timed honestly on GPU."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

