"""The fused decode forward over fixed-shape buffers, captured once per shape as a CUDA graph and replayed.

An eager decode step of a 22-layer Llama launches about a thousand small kernels, so on a GPU its time
is Python and launch overhead, not the weights' bytes. Replaying a captured graph launches them in one
call. A graph fixes every shape, so the batch is padded up to a bucket size and attention reads a
bucketed number of key positions; padded rows decode a dummy token that writes its key at the scratch
position (the arena's `scratch_position`), which no request ever uses.

Every graph here and in prefill_graphs.py is recorded into one memory pool, and PyTorch only promises a shared
pool is safe if each graph's output is consumed before another graph of the pool replays: a graph captured
later (a decode shape first met under load, past the prefill widths) may place its output in memory another
graph uses as scratch. So a graph's static output is private to `CapturedGraph`, whose `replay` hands back a
copy: no caller can hold pool memory across another replay, whatever order shapes are captured or replayed in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from flover_backend.execution.kv_arena import KVArena
from flover_backend.execution.layers.attention import ForwardBatch

log = logging.getLogger(__name__)

KEY_BLOCK = 256  # key positions are read in multiples of this, so a row's growth re-captures rarely


def batch_buckets(max_num_seqs: int) -> list[int]:
    """Batch sizes that get a shape of their own: 1, 2, 4, then every multiple of 8, and max_num_seqs."""
    sizes = {size for size in (1, 2, 4) if size < max_num_seqs}
    sizes.update(range(8, max_num_seqs, 8))
    sizes.add(max_num_seqs)
    return sorted(sizes)


def key_bucket(longest_context: int, max_model_len: int) -> int:
    """Key positions a step reads: the longest row's length + 1, rounded up to KEY_BLOCK, within the arena."""
    return min(-(-(longest_context + 1) // KEY_BLOCK) * KEY_BLOCK, max_model_len)


class DecodeGraphs:
    """Decode over padded static inputs: CUDA graphs per (batch, keys) shape on a GPU, the same forward eagerly elsewhere."""

    def __init__(self, model: Callable, kv: KVArena, max_num_seqs: int, max_model_len: int, dtype: torch.dtype,
                 recorder: Recorder | None = None):
        self.model, self.kv, self.dtype = model, kv, dtype
        self.max_model_len = max_model_len
        self.buckets = batch_buckets(max_num_seqs)
        device = kv.device
        self.input_ids = torch.zeros(max_num_seqs, 1, dtype=torch.long, device=device)
        self.context_lens = torch.zeros(max_num_seqs, dtype=torch.long, device=device)
        self.write_pos = torch.zeros(max_num_seqs, dtype=torch.long, device=device)
        # A recorder other than CUDA's (tests give one) captures on any device.
        self.record = recorder or record_graph
        self.capture = recorder is not None or device.type == "cuda"
        self.pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None
        self.graphs: dict[tuple[int, int], CapturedGraph] = {}
        self.num_replays = 0

    def capture_batch_sizes(self) -> None:
        """Capture every batch size at the first key bucket now, at start-up, rather than in a step under load.

        Every row is free at start-up, so the dummy rows these runs write to are nobody's.
        """
        if self.capture:
            scratch = self.kv.scratch_position
            for batch in self.buckets:
                self([0] * batch, [0] * batch, [scratch] * batch)

    def __call__(self, token_ids: list[int], context_lens: list[int], write_pos: list[int]) -> torch.Tensor:
        """(len(token_ids), hidden) next-token states for rows [0, len(token_ids)); rows not decoding carry
        token 0, length 0 and the scratch position, as the padding does."""
        span = len(token_ids)
        batch = next(size for size in self.buckets if size >= span)
        num_keys = key_bucket(max(context_lens), self.max_model_len)
        padding = batch - span
        host = torch.tensor([token_ids + [0] * padding, context_lens + [0] * padding,
                             write_pos + [self.kv.scratch_position] * padding], dtype=torch.long)
        self.input_ids[:batch, 0].copy_(host[0])
        self.context_lens[:batch].copy_(host[1])
        self.write_pos[:batch].copy_(host[2])
        if not self.capture:
            return self._forward(batch, num_keys)[:span]
        shape = (batch, num_keys)
        if shape not in self.graphs:
            captured = self._capture(batch, num_keys)
            if captured is None:  # capture failed: every shape runs eagerly from now on
                return self._forward(batch, num_keys)[:span]
            self.graphs[shape] = captured
        self.num_replays += 1
        return self.graphs[shape].replay(slice(0, span))

    def _forward(self, batch: int, num_keys: int) -> torch.Tensor:
        """The decode forward on the first `batch` static rows; only device work, so it can be captured."""
        forward_batch = ForwardBatch.decode(slice(0, batch), self.context_lens[:batch], num_keys, self.dtype,
                                            self.write_pos[:batch])
        return self.model(self.input_ids[:batch], forward_batch, self.kv)[:, 0]

    def _capture(self, batch: int, num_keys: int) -> CapturedGraph | None:
        """Record the shape; None (and eager decoding from now on) if that fails."""
        captured = self.record(lambda: self._forward(batch, num_keys), self.pool)
        if captured is None:
            log.error("CUDA graph capture of decode batch %d x %d keys failed; decoding eagerly", batch, num_keys)
            self.capture = False
        else:
            log.info("captured the decode step for batch %d x %d keys (%d shapes)", batch, num_keys,
                     len(self.graphs) + 1)
        return captured


class CapturedGraph:
    """A recorded graph and its static output, which is read only through `replay`: as a copy."""

    def __init__(self, graph, output: torch.Tensor):
        self._graph, self._output = graph, output

    def replay(self, index=slice(None)) -> torch.Tensor:
        """Run the graph; `output[index]` copied out of the pool, so the next replay of any graph of the
        pool (which may use this output's memory as scratch) cannot change what the caller holds."""
        self._graph.replay()
        return self._output[index].clone()


Recorder = Callable[[Callable[[], torch.Tensor], object], CapturedGraph | None]


def record_graph(forward: Callable[[], torch.Tensor], pool) -> CapturedGraph | None:
    """Warm `forward` up on a side stream, then record it into `pool`: the graph and its output; None on failure."""
    current = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    side.wait_stream(current)
    try:
        with torch.cuda.stream(side):
            # Lazy initialisations (cuBLAS handles, workspaces) must happen outside the capture. The
            # warm-up writes the same keys the replay will, so running it on live inputs is harmless.
            forward()
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            output = forward()
    except RuntimeError:
        log.exception("CUDA graph capture failed")
        return None
    return CapturedGraph(graph, output)
