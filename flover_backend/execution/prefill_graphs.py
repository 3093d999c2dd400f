"""A prompt's first chunk as one row's forward over a few fixed widths, captured as CUDA graphs and replayed.

With CUDA graphs the decode step replays in ~3 ms on an H200, but each prompt chunk still ran an eager
forward of its own, ~19 ms of Python and kernel launches on that host (benchmarks/results/gpu), and requests
arriving every 10 ms queued behind them. A chunk that starts its prompt is right-padded to a width bucket
and replayed into its row. The padding's keys land in the same row past the chunk, where the prompt's next
chunk or first decode step writes before anything reads them, as with the eager forwards' padding.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from flover_backend.execution.decode_graphs import CapturedGraph, Recorder, record_graph
from flover_backend.execution.kv_arena import KVArena
from flover_backend.execution.layers.attention import ForwardBatch

log = logging.getLogger(__name__)

MIN_WIDTH = 16
# Replays run one chunk each: past this many first chunks in one iteration, one batched eager forward of them
# all costs less (on the H200: an eager forward ~19 ms whatever its batch, a replayed 1-row step ~3 ms).
MAX_GRAPHED_CHUNKS = 4


def width_buckets(max_width: int) -> list[int]:
    """Chunk widths that get a graph: powers of two from MIN_WIDTH below `max_width`, and `max_width`."""
    widths = []
    width = MIN_WIDTH
    while width < max_width:
        widths.append(width)
        width *= 2
    return widths + [max_width]


class PrefillGraphs:
    """One row's first prompt chunk over padded static inputs: a CUDA graph per width on a GPU, the same
    forward eagerly elsewhere."""

    def __init__(self, model: Callable, kv: KVArena, max_width: int, pool=None, recorder: Recorder | None = None):
        self.model, self.kv = model, kv
        self.widths = width_buckets(max_width)
        device = kv.device
        self.input_ids = torch.zeros(1, max_width, dtype=torch.long, device=device)
        self.row = torch.zeros(1, dtype=torch.long, device=device)
        self.record = recorder or record_graph
        self.capture = recorder is not None or device.type == "cuda"
        self.pool = pool if pool is not None or device.type != "cuda" else torch.cuda.graph_pool_handle()
        # Built outside any capture: a prefill batch copies its chunks' last indices from the host.
        self.batches = {width: ForwardBatch.prefill(self.row, [width], device) for width in self.widths}
        self.graphs: dict[int, CapturedGraph] = {}
        self.num_replays = 0

    def covers(self, length: int) -> bool:
        """Whether a chunk of `length` tokens fits a width bucket."""
        return length <= self.widths[-1]

    def capture_widths(self, free_row: int) -> None:
        """Capture every width now, at start-up, writing into `free_row`, which no request holds yet."""
        if self.capture:
            for width in self.widths:
                self(free_row, [0] * width)

    def __call__(self, row: int, token_ids: list[int], every: bool = False) -> torch.Tensor:
        """Write the chunk's keys into `row` from position 0; the (1, hidden) state of its last token, or with
        `every` the (len, hidden) states of all its tokens."""
        width = next(size for size in self.widths if size >= len(token_ids))
        self.input_ids[0, :width].copy_(torch.tensor(token_ids + [0] * (width - len(token_ids))))
        self.row.fill_(row)
        if self.capture and width not in self.graphs:
            captured = self.record(lambda: self._forward(width), self.pool)
            if captured is None:
                log.error("CUDA graph capture of a %d-token prompt chunk failed; prompts run eagerly", width)
                self.capture = False
            else:
                self.graphs[width] = captured
        states = (0, slice(0 if every else len(token_ids) - 1, len(token_ids)))
        if self.capture:
            self.num_replays += 1
            return self.graphs[width].replay(states)  # a copy: see decode_graphs' docstring
        return self._forward(width)[states]

    def _forward(self, width: int) -> torch.Tensor:
        """The prefill forward of the static inputs' first `width` tokens into the static row; only device work."""
        return self.model(self.input_ids[:, :width], self.batches[width], self.kv)
