"""A child process's output copied to a log file that never grows past its cap, whatever the child writes."""

from __future__ import annotations

import os
import threading
from pathlib import Path

CHUNK = 1 << 16  # bytes read from the pipe at a time


class CappedLog:
    """Copies everything readable from pipe `fd` into `path`; at `max_bytes` the file moves to `path`.1.

    So at most 2 x max_bytes lie on disk: a server out of file descriptors logs every failed accept()
    (tritonserver wrote 1.2 GB in 30 s), and a log file the server wrote itself would fill the disk.
    Bytes, not log records: the copy costs one read and one write per 64 KiB, whatever the lines hold.
    """

    def __init__(self, fd: int, path: str | Path, max_bytes: int):
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.fd, self.path, self.max_bytes = fd, Path(path), max_bytes
        self.chunk_bytes = min(CHUNK, max_bytes)
        self.rotated_path = self.path.with_name(self.path.name + ".1")
        self.num_rotations = 0
        self._thread = threading.Thread(target=self._copy, name=f"log-{self.path.name}", daemon=True)

    def start(self) -> CappedLog:
        """Start copying on a thread of its own; it ends when every writer has closed the pipe."""
        self.rotated_path.unlink(missing_ok=True)  # what an earlier run left: not this run's
        self._thread.start()
        return self

    def join(self, timeout_s: float) -> None:
        """Wait up to `timeout_s` for the copy to reach the end of the pipe."""
        self._thread.join(timeout_s)

    def _copy(self) -> None:
        chunk = b""
        try:
            while True:
                # Unbuffered: readers of the log see each chunk at once. A chunk is at most max_bytes long.
                with open(self.path, "wb", buffering=0) as out:
                    out.write(chunk)
                    size = len(chunk)
                    while (chunk := os.read(self.fd, self.chunk_bytes)) and size + len(chunk) <= self.max_bytes:
                        out.write(chunk)
                        size += len(chunk)
                if not chunk:
                    return  # every writer has gone
                os.replace(self.path, self.rotated_path)
                self.num_rotations += 1
        finally:
            os.close(self.fd)
