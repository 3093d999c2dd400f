"""A child process's output copied to a log file that never grows past its cap, whatever the child writes."""

from __future__ import annotations

import os
import select
import threading
import time
from pathlib import Path

CHUNK = 1 << 16  # bytes read from the pipe at a time
REPORT_S = 10.0  # a run of repeated lines still going on is counted in the log this often


class RepeatedLines:
    """Collapses each run of identical lines into the line once and a count of its repeats.

    A server out of file descriptors logs every failed accept() with the very same words ("[warn] Error
    from accept() call: Too many open files", hundreds of thousands a second): the run costs two lines,
    and the lines before it stay in the log instead of being rotated away.
    """

    def __init__(self):
        self._last: bytes | None = None
        self._repeats = 0
        self._partial = b""  # the unfinished line at the end of the data so far

    def feed(self, data: bytes) -> bytes:
        """The lines to write for `data`: runs of repeats held back and counted."""
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > CHUNK:  # a line that never ends is written as it comes
            lines.append(self._partial)
            self._partial = b""
        if lines and lines.count(self._last) == len(lines):  # the whole chunk repeats (a flood): counted in C
            self._repeats += len(lines)
            return b""
        out = []
        for line in lines:
            if line == self._last:
                self._repeats += 1
                continue
            out += self._count()
            out.append(line + b"\n")
            self._last = line
        return b"".join(out)

    def flush(self) -> bytes:
        """The count of the run going on, if any (written now, so a long run shows while it lasts)."""
        return b"".join(self._count())

    def finish(self) -> bytes:
        """What is left at the end of the output: the run's count and an unfinished last line."""
        rest = self.flush() + self._partial
        self._partial = b""
        return rest

    def _count(self) -> list[bytes]:
        if not self._repeats:
            return []
        line = b"[the line above repeated %d more times]\n" % self._repeats
        self._repeats = 0
        return [line]


class CappedLog:
    """Copies everything readable from pipe `fd` into `path`; at `max_bytes` the file moves to `path`.1.

    So at most 2 x max_bytes lie on disk whatever the child writes: tritonserver out of descriptors wrote
    1.2 GB in 30 s into a log it owned. Runs of one repeated line are collapsed (RepeatedLines).
    """

    def __init__(self, fd: int, path: str | Path, max_bytes: int):
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.fd, self.path, self.max_bytes = fd, Path(path), max_bytes
        self.rotated_path = self.path.with_name(self.path.name + ".1")
        self.num_rotations = 0
        self.num_bytes_read = 0
        self._repeats = RepeatedLines()
        self._out = None
        self._size = 0
        self._thread = threading.Thread(target=self._copy, name=f"log-{self.path.name}", daemon=True)

    def start(self) -> CappedLog:
        """Start copying on a thread of its own; it ends when every writer has closed the pipe."""
        self.rotated_path.unlink(missing_ok=True)  # what an earlier run left: not this run's
        self._out = open(self.path, "wb", buffering=0)  # noqa: SIM115 - rotated by _write; closed by _copy
        self._thread.start()
        return self

    def join(self, timeout_s: float) -> None:
        """Wait up to `timeout_s` for the copy to reach the end of the pipe."""
        self._thread.join(timeout_s)

    def _copy(self) -> None:
        next_report = time.monotonic() + REPORT_S
        try:
            while True:
                readable = select.select([self.fd], [], [], REPORT_S)[0]
                if time.monotonic() >= next_report:  # a run going on, or one that ended in silence, is counted
                    self._write(self._repeats.flush())
                    next_report = time.monotonic() + REPORT_S
                if not readable:
                    continue
                chunk = os.read(self.fd, CHUNK)
                if not chunk:
                    self._write(self._repeats.finish())
                    return  # every writer has gone
                self.num_bytes_read += len(chunk)
                self._write(self._repeats.feed(chunk))
        finally:
            self._out.close()
            os.close(self.fd)

    def _write(self, data: bytes) -> None:
        """Append `data`, moving the file aside whenever it is full (so a line may straddle the two)."""
        while data:
            if self._size >= self.max_bytes:
                self._out.close()
                os.replace(self.path, self.rotated_path)
                self._out = open(self.path, "wb", buffering=0)  # noqa: SIM115 - closed by _copy or here
                self._size = 0
                self.num_rotations += 1
            piece, data = data[:self.max_bytes - self._size], data[self.max_bytes - self._size:]
            self._out.write(piece)  # unbuffered: readers of the log see each chunk at once
            self._size += len(piece)
