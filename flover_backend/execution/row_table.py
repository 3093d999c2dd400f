"""Arena bookkeeping: which request holds which row, and the row moves that keep live rows dense."""

from __future__ import annotations

from typing import NamedTuple


class RowMove(NamedTuple):
    """Copy the first `length` cached positions of arena row `src` into row `dst`."""

    src: int
    dst: int
    length: int


class RowTable:
    """Counts rows only; the storage (`KVArena`) applies the moves this plans.

    With compaction on, live rows are always exactly [0, n): a freed row is filled by a live row from
    the tail, so the decode forward covers a dense prefix. With compaction off, freed rows stay as
    holes inside the span until an arrival reuses them, and the forward covers them, masked.
    """

    def __init__(self, num_rows: int, compaction: bool = True):
        self.num_rows = num_rows
        self.compaction = compaction
        self._owner: list[str | None] = [None] * num_rows

    @property
    def num_live(self) -> int:
        """Rows held by a request."""
        return sum(owner is not None for owner in self._owner)

    @property
    def num_free(self) -> int:
        """Rows an arrival can take."""
        return self.num_rows - self.num_live

    def owner(self, row: int) -> str | None:
        """The request id holding `row`, or None for a free row."""
        return self._owner[row]

    def allocate(self, req_id: str) -> int:
        """Give `req_id` the lowest free row."""
        row = self._owner.index(None)  # ValueError when full: callers check num_free first
        self._owner[row] = req_id
        return row

    def release(self, row: int) -> None:
        """Mark `row` free; its contents become garbage."""
        if self._owner[row] is None:
            raise ValueError(f"row {row} is already free")
        self._owner[row] = None

    def plan_compaction(self, cached_len: dict[str, int]) -> list[RowMove]:
        """Moves that make the live rows exactly [0, n), updating ownership; [] if already dense.

        Only live rows past n move, each into a hole below n: the fewest moves possible, since each
        such row must leave. `cached_len` gives each live request's used positions, the bytes to copy.
        """
        if not self.compaction:
            return []
        num_live = self.num_live
        holes = [row for row in range(num_live) if self._owner[row] is None]
        tail = [row for row in range(num_live, self.num_rows) if self._owner[row] is not None]
        moves = []
        for dst, src in zip(holes, tail):
            req_id = self._owner[src]
            moves.append(RowMove(src, dst, cached_len[req_id]))
            self._owner[dst], self._owner[src] = req_id, None
        return moves
