"""Arena bookkeeping: which request holds which row, and the row moves that keep live rows dense."""

from __future__ import annotations

from collections import OrderedDict
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

    A finished request's row may be *retained* (up to `max_retained`, least recently used dropped first), so
    a later prompt that starts with the same tokens copies their keys instead of computing them again. A
    retained row is never live: an arrival that finds no free row takes the least recently used retained one,
    and compaction moves a retained row out of the dense span (to the highest free row) or drops it.
    """

    def __init__(self, num_rows: int, compaction: bool = True, max_retained: int = 0):
        self.num_rows = num_rows
        self.compaction = compaction
        self.max_retained = max_retained
        self._owner: list[str | None] = [None] * num_rows
        self._retained: OrderedDict[str, int] = OrderedDict()  # finished req_id -> its row, least recently used first

    @property
    def num_live(self) -> int:
        """Rows held by a running request."""
        return sum(owner is not None for owner in self._owner) - len(self._retained)

    @property
    def num_free(self) -> int:
        """Rows held by nobody, not even a retained prefix."""
        return self.num_rows - self.num_live - len(self._retained)

    @property
    def num_available(self) -> int:
        """Rows an arrival can take: the free ones, and the retained ones, which give their rows up."""
        return self.num_rows - self.num_live

    @property
    def retained(self) -> dict[str, int]:
        """Finished requests whose rows are kept -> the row, least recently used first (a copy)."""
        return dict(self._retained)

    def owner(self, row: int) -> str | None:
        """The request id holding `row` (running, or finished and retained), or None for a free row."""
        return self._owner[row]

    def is_live(self, row: int) -> bool:
        """Whether a running request holds `row`."""
        owner = self._owner[row]
        return owner is not None and owner not in self._retained

    def allocate(self, req_id: str) -> int:
        """Give `req_id` the lowest free row, else the least recently used retained one."""
        if None in self._owner:
            row = self._owner.index(None)
        else:
            _, row = self._retained.popitem(last=False)  # KeyError when full: callers check num_available first
        self._owner[row] = req_id
        return row

    def release(self, row: int) -> None:
        """Mark `row` free; its contents become garbage."""
        owner = self._owner[row]
        if owner is None:
            raise ValueError(f"row {row} is already free")
        self._retained.pop(owner, None)
        self._owner[row] = None

    def retain(self, row: int) -> bool:
        """Keep a finishing request's row as a retained prefix (dropping the least recently used beyond
        `max_retained`); False, and the row freed, when nothing is retained."""
        owner = self._owner[row]
        if owner is None or owner in self._retained:
            raise ValueError(f"row {row} is not held by a running request")
        if self.max_retained == 0:
            self.release(row)
            return False
        while len(self._retained) >= self.max_retained:
            _, oldest = self._retained.popitem(last=False)
            self._owner[oldest] = None
        self._retained[owner] = row
        return True

    def touch(self, req_id: str) -> None:
        """Mark a retained row as just used, so it is dropped last."""
        self._retained.move_to_end(req_id)

    def plan_compaction(self, cached_len: dict[str, int]) -> list[RowMove]:
        """Moves that make the live rows exactly [0, n), updating ownership; [] if already dense. Apply in order.

        Only live rows past n move, each into a hole below n: the fewest moves possible, since each
        such row must leave. A retained row below n first moves out to the highest free row past n (or is
        dropped when there is none). `cached_len` gives each held row's used positions, the bytes to copy.
        """
        if not self.compaction:
            return []
        num_live = self.num_live
        holes = [row for row in range(num_live) if not self.is_live(row)]
        tail = [row for row in range(num_live, self.num_rows) if self.is_live(row)]
        spare = [row for row in reversed(range(num_live, self.num_rows)) if self._owner[row] is None]
        moves = []
        for row in holes:
            owner = self._owner[row]
            if owner is None:
                continue
            if spare:  # before any live row lands on it: the moves run one after another
                dst = spare.pop(0)
                moves.append(RowMove(row, dst, cached_len[owner]))
                self._owner[dst], self._retained[owner] = owner, dst
            else:
                del self._retained[owner]
            self._owner[row] = None
        for dst, src in zip(holes, tail):
            req_id = self._owner[src]
            moves.append(RowMove(src, dst, cached_len[req_id]))
            self._owner[dst], self._owner[src] = req_id, None
        return moves
